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

A reference is saved as a zarr (v3) store and loaded back whole (:mod:`symphony_dask._reference.store`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd

from symphony_dask._embedding.neighbors import Method, NeighborIndex
from symphony_dask._embedding.umap_layout import Placement, UmapModel
from symphony_dask._harmony.settings import HarmonySettings
from symphony_dask._io.validation import pass_option


def no_per_cell_data() -> str:
    """Error of annotation transfer from a reference saved without its cells."""
    return (
        "this reference was saved without its per-cell embedding and obs, which label transfer needs; "
        f"rebuild it ({pass_option('keep_embedding', True)})"
    )


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
        obsm
            Per-cell matrices of the reference cells (e.g. protein levels), one row per embedding row.
        pca_moments
            R-weighted moments of the pre-Harmony PCs per cluster (for the per-cell mapping metric).
        params
            Build parameters to record (e.g. ``seed``, which seeds the neighbor index).
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
    def harmony_settings(self) -> HarmonySettings:
        """The Harmony settings the reference was built with, as its ``params`` record them."""
        return HarmonySettings.from_params(self.params)

    @property
    def umap(self) -> np.ndarray | None:
        """UMAP coordinates of the reference cells (cells x 2), if the reference has a UMAP."""
        return None if self.umap_layout is None else self.umap_layout.coords

    def to_anndata(self) -> ad.AnnData:
        """The reference cells as an AnnData for scanpy and other AnnData tools.

        ``obs``, ``obsm['X_symphony']`` (corrected embedding), ``obsm['X_umap']`` (if the reference has a
        UMAP) and the reference's own ``obsm`` matrices; no expression matrix (``X`` is None) and the build
        parameters in ``uns['symphony']``.
        """
        if self.embedding is None or self.obs is None:
            raise ValueError(no_per_cell_data().replace("label transfer needs", "to_anndata needs"))
        obsm = {"X_symphony": np.asarray(self.embedding), **self.obsm}
        if self.umap is not None:
            obsm["X_umap"] = self.umap
        adata = ad.AnnData(obs=self.obs.copy(), obsm=obsm)
        adata.uns["symphony"] = {"params": jsonable(self.params), "genes": np.asarray(self.genes, dtype=str)}
        return adata

    def to_xarray(self):
        """The reference's elements as one labeled ``xarray.Dataset``.

        ``mean``, ``std`` (gene), ``loadings`` (gene x pc), ``centroids`` (pc x cluster; Y_cos),
        ``cluster_sizes`` (cluster; N_r), ``compression`` (cluster x pc; C) and, with the reference cells,
        ``embedding`` (cell x pc) and ``umap`` (cell x umap_axis); the build parameters as JSON in
        ``attrs['params']``. Select by name (``ds.loadings.sel(gene='CD3E')``) or write it with
        ``ds.to_netcdf`` / ``ds.to_zarr``.
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
        return xr.Dataset(data, coords=coords, attrs={"params": json.dumps(jsonable(self.params))})

    def umap_placement(self, n_cells: int = 1) -> Placement | None:
        """What placing ``n_cells`` query cells into the reference UMAP needs, or None without a UMAP.

        Parameters
        ----------
        n_cells
            Query cells placed together (it sets the number of optimization epochs, as umap-learn's
            ``transform`` does).
        """
        if self.umap_layout is None or self.embedding is None:
            return None
        return self.umap_layout.placement(np.asarray(self.embedding), n_cells)

    def neighbor_index(self, *, method: Method = "auto", seed: int | None = None) -> NeighborIndex:
        """The k-NN index over the corrected reference embedding, built on first use and kept.

        Exact for references up to 20,000 cells, HNSW above.

        Parameters
        ----------
        method
            ``'auto'``, or ``'exact'`` / ``'hnsw'`` to force one.
        seed
            Seeds the HNSW graph; default the build's seed, so that an index built here is the one the
            build would have made.
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
        from symphony_dask._reference.store import save_reference

        return save_reference(self, path, overwrite=overwrite)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


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
