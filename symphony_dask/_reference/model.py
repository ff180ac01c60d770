"""The Symphony reference: the minimal elements needed to map queries, plus optional per-cell parts.

Minimal reference elements (paper, Table 2), whose size does not depend on the number of cells:

============== ============ ======================================================================
attribute      symbol       shape
============== ============ ======================================================================
genes                       (g,) variable genes, the order of every gene axis
mean           mu           (g,) gene means used for scaling
std            sigma        (g,) gene standard deviations used for scaling (n - 1)
loadings       U            (g, d) PCA gene loadings
centroids      Y_cos        (d, k) L2-normalized cluster centroids in the corrected embedding
cluster_sizes  N_r          (k,) ``rowSums(R)``
compression    C            (k, d) ``R Z_corr^T``
============== ============ ======================================================================

Optional parts: ``embedding`` (corrected reference cells, n x d), ``obs`` and ``obsm`` (their
annotations: labels, pseudotimes, protein levels), needed to transfer annotations, with the k-NN
index over the embedding (HNSW for large references, saved); ``pca_moments`` (R-weighted moments of
the pre-Harmony PCs per cluster), needed for the per-cell mapping metric.

A reference is stored as a zarr (v3) group; every element is written with anndata's element
encoding, so the store can be read by any AnnData-aware tool. Saving is atomic: the store is written
beside the target and renamed into place, and an existing store is replaced only with
``overwrite=True``, and only if it is a reference store. The store records a checksum of every
element's files and of its root metadata (the build parameters), which loading verifies (see
:mod:`symphony_dask._io.atomic`); a store is read whole from one save even while another process saves
over it.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import zarr

from symphony_dask._embedding.neighbors import INDEX_FORMAT, Method, NeighborIndex
from symphony_dask._embedding.umap_layout import Placement, UmapModel, UmapParams
from symphony_dask._io.atomic import (
    check_element_name,
    element_checksums,
    json_digest,
    refuse_overlap,
    verify_checksums,
    write_atomically,
)
from symphony_dask._io.validation import pass_option


def no_per_cell_data() -> str:
    """Error of annotation transfer from a reference saved without its cells."""
    return (
        "this reference was saved without its per-cell embedding and obs, which label transfer needs; "
        f"rebuild it ({pass_option('keep_embedding', True)})"
    )


STORE_FORMAT = "symphony_dask._reference.model"
#: 3: checksums of the elements and of the root metadata (parameters), and a generation per save;
#: 2: checksums of the elements only (read with a warning); 1: no checksums (refused).
STORE_VERSION = 3
#: Reads of a store that another process replaces meanwhile are started again this many times.
LOAD_ATTEMPTS = 5
_REQUIRED = ("genes", "mean", "std", "loadings", "centroids", "cluster_sizes", "compression")


@dataclass
class ClusterMoments:
    """R-weighted moments of the pre-Harmony reference PCs per cluster (for mapping metrics).

    ``weight_sq = sum_i R_ik^2`` (k,), ``first = sum_i R_ik z_i`` (k x d) and
    ``second = sum_i R_ik z_i z_i^T`` (k x d x d); the weights ``sum_i R_ik`` are the cluster sizes.
    """

    weight_sq: np.ndarray
    first: np.ndarray
    second: np.ndarray


@dataclass
class Reference:
    """A Symphony reference (see the module docstring for the elements and their shapes).

    Build one with :func:`symphony_dask.build_reference`, load one with :func:`load_reference`, or
    assemble one from given elements with :meth:`Reference.from_arrays`.
    """

    genes: pd.Index
    mean: np.ndarray
    std: np.ndarray
    loadings: np.ndarray
    centroids: np.ndarray
    cluster_sizes: np.ndarray
    compression: np.ndarray
    embedding: np.ndarray | da.Array | None = None
    obs: pd.DataFrame | None = None
    obsm: dict[str, np.ndarray | pd.DataFrame] = field(default_factory=dict)
    pca_moments: ClusterMoments | None = None
    params: dict[str, Any] = field(default_factory=dict)
    #: Per-group VST table of the build (group, symbol, rank, mean, variance, ...); not saved.
    variable_gene_table: pd.DataFrame | None = field(default=None, repr=False, compare=False)
    #: k-NN index over ``embedding`` (an HNSW index is saved with the reference).
    neighbors: NeighborIndex | None = field(default=None, repr=False, compare=False)
    #: The reference UMAP (coordinates, fitted rows, parameters); see :attr:`umap`.
    umap_layout: UmapModel | None = field(default=None, repr=False)
    #: Inverse document frequency of each gene (peak) of a TF-IDF reference (``normalize='tfidf'``),
    #: applied to queries; ``None`` for log-normalized references.
    idf: np.ndarray | None = None
    #: Paths this reference was built from, or whose store its lazy embedding still reads; saving
    #: onto, over or into them is refused.
    sources: tuple[Path, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        self.genes = pd.Index(np.asarray(self.genes, dtype=object).astype(str), name=None)
        for name in ("mean", "std", "loadings", "centroids", "cluster_sizes", "compression"):
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=np.float64))
        _check_elements(self)

    @classmethod
    def from_arrays(
        cls,
        genes,
        mean,
        std,
        loadings,
        centroids,
        cluster_sizes,
        compression,
        embedding=None,
        obs: pd.DataFrame | None = None,
        *,
        obsm: dict | None = None,
        pca_moments: ClusterMoments | None = None,
        params: dict[str, Any] | None = None,
        idf: np.ndarray | None = None,
    ) -> Reference:
        """Make a reference from given elements (e.g. exported from R Symphony).

        Parameters
        ----------
        genes
            Variable gene names (g,).
        mean, std
            Scaling means and standard deviations (g,).
        loadings
            ``U`` (g x d).
        centroids
            ``Y_cos`` (d x k); columns are L2-normalized here if they are not already.
        cluster_sizes
            ``N_r`` (k,).
        compression
            ``C`` (k x d).
        embedding
            Corrected reference embedding (cells x d), optional.
        obs
            Reference cell annotations, one row per embedding row, optional.
        idf
            Per-gene inverse document frequency of a TF-IDF reference (queries are then normalized
            with it), optional.
        """
        return cls(
            genes=pd.Index(genes),
            mean=mean,
            std=std,
            loadings=loadings,
            centroids=centroids,
            cluster_sizes=np.ravel(cluster_sizes),
            compression=compression,
            embedding=embedding,
            obs=obs,
            obsm=dict(obsm or {}),
            pca_moments=pca_moments,
            params=dict(params or {}),
            idf=idf,
        )

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def n_pcs(self) -> int:
        return int(self.loadings.shape[1])

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def n_cells(self) -> int | None:
        """Number of reference cells, if the per-cell embedding is kept."""
        return None if self.embedding is None else int(self.embedding.shape[0])

    @property
    def umap(self) -> np.ndarray | None:
        """UMAP coordinates of the reference cells (cells x 2), if the reference has a UMAP."""
        return None if self.umap_layout is None else self.umap_layout.coords

    def to_anndata(self) -> ad.AnnData:
        """The reference cells as an AnnData for scanpy and other AnnData tools: ``obs``,
        ``obsm['X_symphony']`` (corrected embedding), ``obsm['X_umap']`` (if the reference has a UMAP)
        and the reference's own ``obsm`` matrices; no expression matrix (``X`` is None) and the build
        parameters in ``uns['symphony']``.
        """
        if self.embedding is None or self.obs is None:
            raise ValueError(no_per_cell_data().replace("label transfer needs", "to_anndata needs"))
        obsm = {"X_symphony": np.asarray(self.embedding), **self.obsm}
        if self.umap is not None:
            obsm["X_umap"] = self.umap
        adata = ad.AnnData(obs=self.obs.copy(), obsm=obsm)
        adata.uns["symphony"] = {"params": _jsonable(self.params), "genes": np.asarray(self.genes, dtype=str)}
        return adata

    def to_xarray(self):
        """The reference's elements as one labelled ``xarray.Dataset``: ``mean``, ``std`` (gene),
        ``loadings`` (gene x pc), ``centroids`` (pc x cluster; Y_cos), ``cluster_sizes`` (cluster; N_r),
        ``compression`` (cluster x pc; C) and, with the reference cells, ``embedding`` (cell x pc) and
        ``umap`` (cell x umap_axis); the build parameters as JSON in ``attrs['params']``. Select by
        name (``ds.loadings.sel(gene='CD3E')``) or write it with ``ds.to_netcdf`` / ``ds.to_zarr``.
        """
        import xarray as xr

        pcs = np.arange(1, self.n_pcs + 1)
        data = {
            "mean": ("gene", self.mean),
            "std": ("gene", self.std),
            "loadings": (("gene", "pc"), self.loadings),
            "centroids": (("pc", "cluster"), self.centroids),
            "cluster_sizes": ("cluster", self.cluster_sizes),
            "compression": (("cluster", "pc"), self.compression),
        }
        coords = {"gene": np.asarray(self.genes, dtype=str), "pc": pcs, "cluster": np.arange(self.n_clusters)}
        if self.embedding is not None:
            data["embedding"] = (("cell", "pc"), np.asarray(self.embedding))
            if self.obs is not None:
                coords["cell"] = np.asarray(self.obs.index, dtype=str)
            if self.umap is not None:
                data["umap"] = (("cell", "umap_axis"), self.umap)
                coords["umap_axis"] = ["UMAP1", "UMAP2"]
        return xr.Dataset(data, coords=coords, attrs={"params": json.dumps(_jsonable(self.params))})

    def umap_placement(self, n_cells: int = 1) -> Placement | None:
        """What placing ``n_cells`` query cells into the reference UMAP needs, or None without a UMAP."""
        if self.umap_layout is None or self.embedding is None:
            return None
        return self.umap_layout.placement(np.asarray(self.embedding), n_cells)

    def neighbor_index(self, *, method: Method = "auto", seed: int | None = None) -> NeighborIndex:
        """The k-NN index over the corrected reference embedding, built on first use and kept.

        Exact for references up to 20,000 cells, HNSW above (``method`` forces one). ``seed``
        defaults to the build's seed, so that an index built here is the one the build would have made.
        """
        if seed is None:
            seed = int(self.params.get("seed", 0))
        if self.embedding is None:
            raise ValueError(no_per_cell_data())
        wanted = {"auto": None, "exact": "exact", "hnsw": "hnsw"}[method]
        if self.neighbors is None or (wanted and self.neighbors.method != wanted):
            self.neighbors = NeighborIndex.build(np.asarray(self.embedding), method=method, seed=seed)
        return self.neighbors

    def __repr__(self) -> str:
        cells = "no per-cell embedding" if self.embedding is None else f"{self.n_cells} cells"
        obs = "" if self.obs is None else f", obs: {list(self.obs.columns)}"
        return f"Reference({self.n_genes} genes, {self.n_pcs} PCs, {self.n_clusters} clusters, {cells}{obs})"

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the reference to a zarr store at ``path``, atomically.

        The store is written beside ``path`` and moved into place in one rename (an exchange with
        the old store for ``overwrite=True`` on Linux): ``path`` holds the old store or the new
        one, complete, whenever the process stops. Leftovers of saves that were killed are removed
        by the next save to ``path``. The store records a checksum of every element, which
        :func:`load_reference` verifies.

        Parameters
        ----------
        path
            Target folder (conventionally ending in ``.zarr``).
        overwrite
            Replace an existing reference store. Without it an existing path is an error (also when
            it appears while this store is written) and is left untouched; with it, anything other
            than a reference store saved by symphony_dask is still refused, untouched.

        Returns
        -------
        Path
            The store path.
        """
        path = Path(path)
        refuse_overlap(path, self.sources, flag="the save target")
        return write_atomically(
            path,
            lambda tmp: _write_store(self, tmp),
            overwrite=overwrite,
            ours=is_reference_store,
            what="reference store",
        )


def _write_store(ref: Reference, path: Path) -> None:
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        group.attrs["symphony_dask"] = {"format": STORE_FORMAT, "version": STORE_VERSION}
        group.attrs["params"] = _jsonable(ref.params)
        ad.io.write_elem(group, "genes", np.asarray(ref.genes, dtype=object))
        for name in ("mean", "std", "loadings", "centroids", "cluster_sizes", "compression"):
            ad.io.write_elem(group, name, getattr(ref, name))
        if ref.idf is not None:
            ad.io.write_elem(group, "idf", np.asarray(ref.idf, dtype=np.float64))
        if ref.pca_moments is not None:
            moments = group.create_group("pca_moments")
            for name in ("weight_sq", "first", "second"):
                ad.io.write_elem(moments, name, getattr(ref.pca_moments, name))
        if ref.embedding is not None:
            _write_embedding(group, ref.embedding)
        if ref.obs is not None:
            ad.io.write_elem(group, "obs", ref.obs)
        if ref.obsm:
            ad.io.write_elem(group, "obsm", ref.obsm)
        if ref.neighbors is not None and ref.neighbors.method == "hnsw":
            index = group.create_array(
                "neighbor_index", data=np.frombuffer(ref.neighbors.to_bytes(), dtype=np.uint8), chunks=(64 * 2**20,)
            )
            index.attrs.update(
                {
                    "method": "hnsw",
                    "format": INDEX_FORMAT,
                    "n_cells": ref.neighbors.n_cells,
                    "dim": ref.neighbors.dim,
                    "seed": ref.neighbors.seed,
                }
            )
        if ref.umap_layout is not None:
            layout = group.create_group("umap")
            layout.attrs["params"] = ref.umap_layout.params.to_dict()
            layout.create_array("coords", data=np.asarray(ref.umap_layout.coords, dtype=np.float64))
            layout.create_array("fitted", data=np.asarray(ref.umap_layout.fitted, dtype=np.int64))
        elements = sorted(p.name for p in path.iterdir() if p.name != "zarr.json")
        checksums = element_checksums(path, elements)
    root = _root_without_marker(json.loads((path / "zarr.json").read_text()))
    group.attrs["symphony_dask"] = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "generation": uuid.uuid4().hex,
        "root": json_digest(root),
        "checksums": checksums,
    }


def _root_without_marker(meta: dict) -> dict:
    """The store's root metadata (``zarr.json``) without the marker, which the marker's ``root``
    digest covers: the build parameters and zarr's own fields.
    """
    meta = dict(meta)
    attributes = dict(meta.get("attributes") or {})
    attributes.pop("symphony_dask", None)
    meta["attributes"] = attributes
    return meta


def is_reference_store(path: Path) -> bool:
    """Whether ``path`` is a folder whose root metadata carries symphony_dask's reference marker
    (what :meth:`Reference.save` may replace with ``overwrite=True``).
    """
    meta = Path(path) / "zarr.json"
    if Path(path).is_symlink() or not Path(path).is_dir() or meta.is_symlink() or not meta.is_file():
        return False
    try:
        marker = json.loads(meta.read_text()).get("attributes", {}).get("symphony_dask")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(marker, dict) and marker.get("format") == STORE_FORMAT


def _write_embedding(group: zarr.Group, embedding: np.ndarray | da.Array) -> None:
    """Write the per-cell embedding chunk by chunk with the active dask scheduler (on the workers of
    a distributed cluster, which then need the store's file system), in anndata's array encoding.
    """
    rows = int(max(embedding.chunks[0])) if isinstance(embedding, da.Array) else max(1, min(len(embedding), 100_000))
    target = group.create_array("embedding", shape=embedding.shape, dtype="float64", chunks=(rows, embedding.shape[1]))
    target.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    if isinstance(embedding, da.Array):
        da.store(embedding.astype(np.float64).rechunk((rows, -1)), target, lock=False)
    else:
        target[:] = np.asarray(embedding, dtype=np.float64)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def load_reference(path: str | os.PathLike, *, lazy_embedding: bool = False) -> Reference:
    """Load a reference saved with :meth:`Reference.save`.

    The store's checksums are verified first (every element and the root metadata; an element they
    do not list is refused), and the whole store is read from one save: if another process saves
    over ``path`` meanwhile, the read starts again, so a load never mixes two stores.

    Parameters
    ----------
    path
        The reference store.
    lazy_embedding
        Keep the per-cell embedding on disk as a dask array instead of reading it into memory. It
        is read from ``path`` when used, so the store must not be replaced meanwhile; saving the
        reference onto ``path`` is refused.

    Raises
    ------
    ValueError
        If ``path`` is not a symphony_dask reference store, or the store is damaged, incomplete or
        inconsistent.
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        raise FileNotFoundError(f"no reference store at {path}")
    for _ in range(LOAD_ATTEMPTS):
        before = _root_bytes(path)
        try:
            ref = _load_once(path, before, lazy_embedding=lazy_embedding)
        except (ValueError, OSError, KeyError):
            if _root_bytes(path) != before:  # replaced while it was read: read the new store
                continue
            raise
        if _root_bytes(path) == before:
            return ref
    raise ValueError(
        f"{path} was replaced by other saves {LOAD_ATTEMPTS} times while it was read; load it again "
        "once they have finished"
    )


def _root_bytes(path: Path) -> bytes | None:
    """The store's root metadata as stored (``None`` where there is none): it holds the
    generation of the save, so equal bytes before and after a read mean one store was read.
    """
    try:
        return (path / "zarr.json").read_bytes()
    except OSError:
        return None


def _load_once(path: Path, root: bytes | None, *, lazy_embedding: bool) -> Reference:
    marker = _read_marker(path, root)
    version = marker.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(
            f"{path}: the store's version attribute is {version!r}, not a version number; "
            "the store is damaged (symphony_dask/version in its zarr.json)"
        )
    if version > STORE_VERSION:
        raise ValueError(f"{path} was written by a newer symphony_dask (store version {version}); upgrade to read it")
    _verify_store(path, marker, version, root)
    group = zarr.open_group(str(path), mode="r")
    missing = [name for name in _REQUIRED if name not in group]
    if missing:
        raise ValueError(f"{path} is an incomplete reference store: missing {', '.join(missing)}")
    try:
        elems = {name: ad.io.read_elem(group[name]) for name in _REQUIRED}
        moments = None
        if "pca_moments" in group:
            moments = ClusterMoments(
                **{n: ad.io.read_elem(group["pca_moments"][n]) for n in ("weight_sq", "first", "second")}
            )
        embedding = None
        if "embedding" in group:
            node = group["embedding"]
            embedding = ad.experimental.read_elem_lazy(node) if lazy_embedding else ad.io.read_elem(node)
        obs = ad.io.read_elem(group["obs"]) if "obs" in group else None
        idf = ad.io.read_elem(group["idf"]) if "idf" in group else None
        obsm = dict(ad.io.read_elem(group["obsm"])) if "obsm" in group else {}
        layout = None
        if "umap" in group:
            node = group["umap"]
            layout = UmapModel(node["coords"][:], node["fitted"][:], UmapParams(**dict(node.attrs["params"])))
        neighbors = None
        if "neighbor_index" in group and group["neighbor_index"].attrs.get("format") != INDEX_FORMAT:
            warnings.warn(
                f"{path} holds a neighbour index from an older version (hnswlib); it is ignored and a "
                "new one is built at the first label transfer (save the reference again to keep it)",
                stacklevel=3,
            )
        elif "neighbor_index" in group:
            node = group["neighbor_index"]
            meta = dict(node.attrs)
            neighbors = NeighborIndex.from_bytes(
                node[:].tobytes(), n_cells=meta["n_cells"], dim=meta["dim"], seed=meta["seed"]
            )
    except Exception as err:
        raise ValueError(f"{path} is a corrupt reference store: {err}") from err
    return Reference(
        genes=pd.Index(elems["genes"]),
        mean=elems["mean"],
        std=elems["std"],
        loadings=elems["loadings"],
        centroids=elems["centroids"],
        cluster_sizes=elems["cluster_sizes"],
        compression=elems["compression"],
        embedding=embedding,
        obs=obs,
        obsm=obsm,
        pca_moments=moments,
        params=dict(group.attrs.get("params", {})),
        neighbors=neighbors,
        umap_layout=layout,
        idf=idf,
        sources=(path,) if lazy_embedding and embedding is not None else (),
    )


def _verify_store(path: Path, marker: dict, version: int, root: bytes | None) -> None:
    """Every element the store holds is listed by its checksums and matches them, and the root
    metadata matches its digest (version 3); names that could reach outside the store are refused
    before anything is read.
    """
    checksums = marker.get("checksums")
    if checksums is None:
        raise ValueError(
            f"{path} carries no checksums (store version {version}), so damage to it cannot be "
            "detected and it is not read; build the reference again (stores saved by symphony_dask "
            "since version 2 carry checksums)"
        )
    if not isinstance(checksums, dict):
        raise ValueError(f"{path} is a damaged store: the checksums in its root metadata are not a table")
    for name in checksums:
        try:
            check_element_name(name)
        except ValueError as err:
            raise ValueError(
                f"{path} is refused: its checksums name {name!r}, which is not an element inside the "
                "store (the store's root metadata is damaged or was crafted)"
            ) from err
    unlisted = sorted(
        entry.name
        for entry in os.scandir(path)
        if entry.name != "zarr.json" and not entry.name.startswith(".") and entry.name not in checksums
    )
    if unlisted:
        raise ValueError(
            f"{path} holds {', '.join(unlisted)}, which its checksums do not list (added after it was "
            "saved); it is refused: remove what was added, or restore the store from a copy"
        )
    damaged = verify_checksums(path, checksums)
    if version >= 3:
        meta = json.loads(root)
        if json_digest(_root_without_marker(meta)) != marker.get("root"):
            damaged.insert(0, "zarr.json (the root metadata: parameters or zarr fields altered)")
    else:
        warnings.warn(
            f"{path} was saved by an earlier symphony_dask (store version {version}), whose checksums do "
            "not cover the build parameters in its root metadata; load it and save it again to cover them",
            UserWarning,
            stacklevel=4,
        )
    if damaged:
        raise ValueError(
            f"reference store {path} is damaged: {'; '.join(damaged)} do not match the checksums recorded "
            "when it was saved (a file was deleted, truncated or changed); restore the store from a copy "
            "or build the reference again"
        )


def _read_marker(path: Path, root: bytes | None) -> dict:
    """The ``symphony_dask`` marker of a store's root metadata ``root`` (the bytes of its
    ``zarr.json``), with clear errors for what is not a readable reference store.
    """
    if path.is_dir() and root is not None:
        try:
            attrs = json.loads(root).get("attributes", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise ValueError(
                f"{path} is a damaged store: its root metadata {path / 'zarr.json'} is not valid JSON "
                f"({err}); restore the store from a copy or build the reference again"
            ) from err
    else:
        try:
            attrs = dict(zarr.open_group(str(path), mode="r").attrs)
        except Exception as err:  # zarr raises several types for something that is not a store
            raise ValueError(f"{path} is not a symphony_dask reference store (not a zarr group: {err})") from err
    marker = attrs.get("symphony_dask") if isinstance(attrs, dict) else None
    if not isinstance(marker, dict) or marker.get("format") != STORE_FORMAT:
        raise ValueError(
            f"{path} is a zarr store but not a symphony_dask reference (no '{STORE_FORMAT}' marker); "
            "save references with Reference.save"
        )
    return marker


def _check_elements(ref: Reference) -> None:
    """Shapes agree and values are usable; the message names the inconsistent element."""
    g = len(ref.genes)
    if ref.loadings.ndim != 2 or ref.loadings.shape[0] != g:
        raise ValueError(f"loadings must be genes x d with {g} genes, got shape {ref.loadings.shape}")
    d = ref.loadings.shape[1]
    if ref.centroids.ndim != 2 or ref.centroids.shape[0] != d:
        raise ValueError(f"centroids (Y_cos) must be d x k with d={d}, got shape {ref.centroids.shape}")
    k = ref.centroids.shape[1]
    checks = {
        "mean": (ref.mean.shape, (g,)),
        "std": (ref.std.shape, (g,)),
        "cluster_sizes": (ref.cluster_sizes.shape, (k,)),
        "compression": (ref.compression.shape, (k, d)),
    }
    for name, (got, want) in checks.items():
        if got != want:
            raise ValueError(f"{name} must have shape {want} for {g} genes, {d} PCs and {k} clusters, got {got}")
    if not ref.genes.is_unique:
        raise ValueError("reference genes are not unique")
    for name in ("mean", "std", "loadings", "centroids", "cluster_sizes", "compression"):
        if not np.all(np.isfinite(getattr(ref, name))):
            raise ValueError(f"reference element {name} holds NaN or infinite values")
    if np.any(ref.std <= 0):
        raise ValueError(f"{int((ref.std <= 0).sum())} reference gene(s) have a standard deviation <= 0")
    norms = np.linalg.norm(ref.centroids, axis=0)
    if np.any(norms == 0):
        raise ValueError("a reference centroid is the zero vector")
    if np.abs(norms - 1.0).max() > 1e-12:  # Y_cos columns must be unit vectors
        ref.centroids = ref.centroids / norms
    if ref.idf is not None:
        ref.idf = np.ascontiguousarray(ref.idf, dtype=np.float64)
        if ref.idf.shape != (g,) or not np.all(np.isfinite(ref.idf)) or np.any(ref.idf < 0):
            raise ValueError(f"idf must hold one finite, non-negative value per gene ({g}), got shape {ref.idf.shape}")
    if ref.embedding is not None:
        if ref.embedding.ndim != 2 or ref.embedding.shape[1] != d:
            raise ValueError(f"embedding must be cells x {d}, got shape {ref.embedding.shape}")
        if ref.obs is not None and len(ref.obs) != ref.embedding.shape[0]:
            raise ValueError(f"obs has {len(ref.obs)} rows but the embedding has {ref.embedding.shape[0]} cells")
        for key, values in ref.obsm.items():
            if len(values) != ref.embedding.shape[0]:
                raise ValueError(
                    f"obsm[{key!r}] has {len(values)} rows but the embedding has {ref.embedding.shape[0]} cells"
                )
    if ref.umap_layout is not None:
        layout = ref.umap_layout
        n = None if ref.embedding is None else ref.embedding.shape[0]
        if layout.coords.ndim != 2 or layout.coords.shape[1] != 2 or (n is not None and len(layout.coords) != n):
            raise ValueError(f"the UMAP coordinates must be cells x 2 for {n} cells, got shape {layout.coords.shape}")
        if (
            layout.fitted.ndim != 1
            or len(layout.fitted) <= layout.params.n_neighbors
            or (len(layout.fitted) and not 0 <= layout.fitted.min() <= layout.fitted.max() < len(layout.coords))
        ):
            raise ValueError("the UMAP's fitted rows are not rows of its coordinates")
        if not np.all(np.isfinite(layout.coords)):
            raise ValueError("the UMAP coordinates hold NaN or infinite values")
    if ref.pca_moments is not None:
        m = ref.pca_moments
        if m.weight_sq.shape != (k,) or m.first.shape != (k, d) or m.second.shape != (k, d, d):
            raise ValueError("pca_moments shapes do not match the reference's clusters and PCs")
