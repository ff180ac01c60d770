"""The reference store: a zarr (v3) group written atomically and read back whole.

Every element is written with anndata's element encoding, so the store can be read by any
AnnData-aware tool. Saving is atomic (:func:`symphony_dask._io.atomic.write_atomically`): the store
is written beside the target and renamed into place, and an existing store is replaced only with
``overwrite=True``, and only if it is a reference store. The store records a checksum of every
element's files and of its root metadata (the build parameters, :mod:`symphony_dask._reference.checksums`),
which loading verifies; a store is read whole from one save even while another process saves over it.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from pathlib import Path

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import zarr

from symphony_dask._embedding.neighbors import INDEX_FORMAT, NeighborIndex
from symphony_dask._embedding.umap_layout import UmapModel, UmapParams
from symphony_dask._io.atomic import refuse_overlap, write_atomically
from symphony_dask._reference.checksums import check_element_name, element_checksums, json_digest, verify_checksums
from symphony_dask._reference.model import ClusterMoments, Reference, jsonable

STORE_FORMAT = "symphony_dask.reference"
#: 3: checksums of the elements and of the root metadata (parameters), and a generation per save;
#: 2: checksums of the elements only (read with a warning); 1: no checksums (refused).
STORE_VERSION = 3
#: Reads of a store that another process replaces meanwhile are started again this many times.
LOAD_ATTEMPTS = 5
_REQUIRED = ("genes", "mean", "std", "loadings", "centroids", "cluster_sizes", "compression")


def save_reference(ref: Reference, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``ref`` to a zarr store at ``path``, atomically (see :meth:`Reference.save`)."""
    path = Path(path)
    refuse_overlap(path, ref.sources, flag="the save target")
    return write_atomically(
        path, lambda tmp: _write_store(ref, tmp), overwrite=overwrite, ours=is_reference_store, what="reference store"
    )


def _write_store(ref: Reference, path: Path) -> None:
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        group.attrs["symphony_dask"] = {"format": STORE_FORMAT, "version": STORE_VERSION}
        group.attrs["params"] = jsonable(ref.params)
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
    """The store's root metadata (``zarr.json``) without the marker, which the marker's ``root`` digest covers.

    The build parameters and zarr's own fields.
    """
    meta = dict(meta)
    attributes = dict(meta.get("attributes") or {})
    attributes.pop("symphony_dask", None)
    meta["attributes"] = attributes
    return meta


def is_reference_store(path: Path) -> bool:
    """Whether ``path`` is a folder whose root metadata carries symphony_dask's reference marker.

    Such a store is what :meth:`Reference.save` may replace with ``overwrite=True``.
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
    """Write the per-cell embedding chunk by chunk with the active dask scheduler.

    On a distributed cluster the workers write (they then need the store's file system); the array is in
    anndata's array encoding.
    """
    rows = int(max(embedding.chunks[0])) if isinstance(embedding, da.Array) else max(1, min(len(embedding), 100_000))
    target = group.create_array("embedding", shape=embedding.shape, dtype="float64", chunks=(rows, embedding.shape[1]))
    target.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    if isinstance(embedding, da.Array):
        da.store(embedding.astype(np.float64).rechunk((rows, -1)), target, lock=False)
    else:
        target[:] = np.asarray(embedding, dtype=np.float64)


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
    """The store's root metadata as stored (``None`` where there is none).

    It holds the generation of the save, so equal bytes before and after a read mean one store was read.
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
                f"{path} holds a neighbor index from an older version (hnswlib); it is ignored and a "
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
    """Check that every element is listed by the checksums and matches them, and so does the root metadata.

    The root metadata has its digest from store version 3 on. Names that could reach outside the store
    are refused before anything is read.
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
    """The ``symphony_dask`` marker of a store's root metadata ``root`` (the bytes of its ``zarr.json``).

    What is not a readable reference store gets a clear error.
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
