"""Reading expression data as dask arrays of row chunks of cells.

Inputs may be an in-memory :class:`anndata.AnnData` (dense or sparse ``X``), a backed AnnData, or a
path to an ``.h5ad`` file or an AnnData ``.zarr`` store. Whatever the input, the expression matrix
comes back as a cells x genes dask array whose chunks span all genes and hold a slice of cells
(scipy CSR blocks for sparse data), and ``obs``/``var`` come back without touching ``X``.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import dask
import dask.array as da
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from symphony_dask._io.validation import option

logger = logging.getLogger("symphony_dask")

#: Most cells per chunk by default (a dense scaled chunk of 10,000 cells x 2,000 genes is 160 MB);
#: fewer where the memory of a task would not hold them (:func:`default_chunk_size`).
DEFAULT_CHUNK_SIZE = 10_000
#: An in-memory matrix of more cells than this is read in chunks of this many cells by default.
IN_MEMORY_CHUNK = 10_000
#: Fewest cells per chunk chosen by default.
MIN_DEFAULT_CHUNK_SIZE = 1_000
#: Peak memory of a pass per cell of a chunk, measured on a 20,000-gene store (first pass): about
#: 8 bytes per gene, or 72 bytes per stored value, whichever is more; a quarter more for safety.
BYTES_PER_GENE, BYTES_PER_VALUE, MEMORY_MARGIN = 8, 72, 1.25
#: Memory of a worker beside its chunk: the process with the library loaded (~0.5 GB) and the PCA's
#: tree reduction of Gram matrices (~0.45 GB at 2,000 genes), measured on one worker of 1 GiB.
WORKER_BASE_BYTES = 950 * 2**20

AnnDataLike = ad.AnnData | str | os.PathLike


@dataclass
class Expression:
    """An expression matrix read lazily: ``X`` (cells x genes, row-chunked), ``obs`` and ``var``."""

    X: da.Array
    obs: pd.DataFrame
    var: pd.DataFrame
    source: str
    obsm: dict = field(default_factory=dict)
    #: Names of the AnnData's layers (other matrices of the same cells and genes).
    layers: tuple[str, ...] = ()

    @property
    def genes(self) -> pd.Index:
        return self.var.index

    @property
    def in_memory(self) -> bool:
        """Whether the matrix came from an AnnData held in memory (not a file or a lazy array)."""
        return self.source == "AnnData"

    @property
    def n_cells(self) -> int:
        return int(self.X.shape[0])


def read_expression(data: AnnDataLike, *, chunk_size: int | None = None, layer: str | None = None) -> Expression:
    """Read ``data`` as an :class:`Expression` with row chunks of ``chunk_size`` cells.

    Parameters
    ----------
    data
        AnnData (in memory or backed) or a path to ``.h5ad`` / ``.zarr``.
    chunk_size
        Cells per chunk; ``None`` keeps an in-memory matrix of up to :data:`IN_MEMORY_CHUNK` cells
        as one chunk and splits a larger one into chunks of that many (views, not copies: never
        the whole matrix in one task, and every core busy), and for data on disk takes as many cells
        (at most :data:`DEFAULT_CHUNK_SIZE`) as the memory of a task holds (:func:`default_chunk_size`).
    layer
        Read this layer instead of ``X``.
    """
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if isinstance(data, ad.AnnData):
        expr = _backed(data, chunk_size, layer) if data.isbacked else _from_memory(data, chunk_size, layer)
    elif isinstance(data, (str, os.PathLike)):
        expr = _read_store(Path(data), chunk_size, layer)
    else:
        raise TypeError(f"expected an AnnData or a path to .h5ad/.zarr, got {type(data).__name__}")
    expr.X = _supported_chunks(expr.X)
    return expr


def _layer_names(adata: ad.AnnData) -> tuple[str, ...]:
    return tuple(adata.layers.keys())


def _backed(adata: ad.AnnData, chunk_size: int | None, layer: str | None) -> Expression:
    """A backed AnnData (or a view of one).

    The matrix read lazily from its file, only the cells and genes of the view; ``obs``, ``var`` and ``obsm``
    as the AnnData holds them in memory.
    """
    path = Path(adata.filename)
    expr = _read_store(path, chunk_size, layer)
    if not adata.is_view and adata.shape == expr.X.shape:
        return Expression(expr.X, adata.obs, adata.var, expr.source, dict(adata.obsm), expr.layers)
    rows = _positions(expr.obs.index, adata.obs_names, "cells", "obs_names", path)
    cols = _positions(expr.var.index, adata.var_names, "genes", "var_names", path)
    x = expr.X
    if len(cols) != x.shape[1] or np.any(cols != np.arange(x.shape[1])):
        x = x.map_blocks(
            _take_columns,
            cols,
            chunks=(x.chunks[0], (len(cols),)),
            dtype=x.dtype,
            meta=x._meta[:, :0] if x._meta.ndim == 2 else x._meta,
        )
    keep = np.zeros(x.shape[0], dtype=bool)
    keep[rows] = True
    subset = keep_cells(Expression(x, expr.obs, expr.var, expr.source), keep)
    return Expression(subset.X, adata.obs, adata.var, expr.source, dict(adata.obsm), expr.layers)


def _positions(stored: pd.Index, wanted: pd.Index, what: str, names: str, path: Path) -> np.ndarray:
    """Positions in the file of a view's cells or genes, which must keep the file's order."""
    how = "load the view with .to_memory(), or write it to its own file and pass that path"
    if not stored.is_unique:
        raise ValueError(
            f"a view of the backed AnnData {path} cannot be matched to its file: the file's {names} "
            f"are not unique; {how}"
        )
    positions = stored.get_indexer(wanted)
    if np.any(positions < 0):
        raise ValueError(
            f"a view of the backed AnnData {path} has {what} that are not in its file (renamed {names}?); {how}"
        )
    if np.any(np.diff(positions) <= 0):
        raise ValueError(
            f"a view of the backed AnnData {path} takes its {what} in another order than the file (or twice); {how}"
        )
    return positions


def _take_columns(block, cols: np.ndarray):
    return block[:, cols]


#: Chunk types the kernels take as they are; others are converted chunk by chunk.
_FLOAT_KINDS = {np.dtype(np.float32), np.dtype(np.float64)}


def _supported_chunks(x: da.Array) -> da.Array:
    """Chunks the kernels can use: NumPy arrays or scipy CSR matrices of integers, float32 or float64.

    Other sparse formats (COO, CSC, pydata ``sparse``) become CSR and other floats (float16, long double)
    float32/float64, chunk by chunk; anything else is refused here, with what was found, rather than deep
    inside a kernel.
    """
    meta = x._meta
    dtype = np.dtype(x.dtype)
    if dtype.kind == "f" and dtype not in _FLOAT_KINDS:
        target = np.float32 if dtype.itemsize < 4 else np.float64
        x = x.map_blocks(_as_dtype, target, dtype=target, meta=_as_dtype(meta, target))
        meta = x._meta
    elif dtype.kind not in "iufb":
        raise TypeError(f"the expression matrix holds {dtype} values; expected numbers (counts or log values)")
    if isinstance(meta, np.ndarray) or (sp.issparse(meta) and meta.format == "csr"):
        return x
    if sp.issparse(meta) or hasattr(meta, "tocsr"):
        return x.map_blocks(_to_csr, dtype=x.dtype, meta=sp.csr_matrix((0, 0), dtype=x.dtype))
    raise TypeError(
        f"the expression matrix's chunks are {type(meta).__module__}.{type(meta).__name__}; expected NumPy arrays "
        "or scipy sparse matrices (convert them first, e.g. x.map_blocks(lambda b: b.tocsr()))"
    )


def _as_dtype(block, dtype):
    return block.astype(dtype)


def _to_csr(block) -> sp.csr_matrix:
    return sp.csr_matrix(block.tocsr() if not sp.issparse(block) else block)


def _checked_chunk(block):
    """A chunk of a user's dask array as the kernels take it (see :func:`_supported_chunks`)."""
    if isinstance(block, np.ndarray) or (sp.issparse(block) and block.format == "csr"):
        return block
    if sp.issparse(block) or hasattr(block, "tocsr"):
        return _to_csr(block)
    if hasattr(block, "__array__"):
        return np.asarray(block)
    raise TypeError(
        f"a chunk of the expression matrix is a {type(block).__module__}.{type(block).__name__}; "
        "expected NumPy arrays or scipy sparse matrices"
    )


def _from_memory(adata: ad.AnnData, chunk_size: int | None, layer: str | None) -> Expression:
    if layer is not None and layer not in adata.layers:
        raise ValueError(
            f"the AnnData has no layer {layer!r}; its layers are: {', '.join(map(repr, adata.layers.keys())) or 'none'}"
        )
    x = adata.X if layer is None else adata.layers[layer]
    if x is None:
        raise ValueError(
            f"the AnnData has no X; pass {option('layer')} to name the matrix to use "
            f"(its layers: {', '.join(map(repr, adata.layers.keys())) or 'none'})"
        )
    if isinstance(x, da.Array):
        arr = x if chunk_size is None else x.rechunk({0: chunk_size})
        arr = _single_column_chunk(arr)
        # a dask array's meta may not say what its chunks are: look at each chunk
        meta = sp.csr_matrix((0, 0), dtype=arr.dtype) if sp.issparse(arr._meta) else arr._meta
        arr = arr.map_blocks(_checked_chunk, dtype=arr.dtype, meta=meta)
        return Expression(arr, adata.obs, adata.var, "AnnData (dask)", dict(adata.obsm), _layer_names(adata))
    n = adata.n_obs
    rows = chunk_size or (n if n <= IN_MEMORY_CHUNK else IN_MEMORY_CHUNK)
    if sp.issparse(x):
        x = sp.csr_matrix(x)
        meta = sp.csr_matrix((0, 0), dtype=x.dtype)
    else:
        x = np.asarray(x)
        meta = np.empty((0, 0), dtype=x.dtype)
    # name=False: no hashing of the whole matrix for a graph key
    arr = da.from_array(_InMemoryRows(x), chunks=(max(rows, 1), -1), asarray=False, meta=meta, name=False)
    return Expression(arr, adata.obs, adata.var, "AnnData", dict(adata.obsm), _layer_names(adata))


class _InMemoryRows:
    """An in-memory matrix as ``da.from_array`` sees it.

    Shape, dtype and row chunks, but no ``copy`` (from_array copies what has one: a whole query, to guard
    against later changes we do not make). A chunk of rows is a view of the matrix (CSR: views of its values
    and column indices).
    """

    def __init__(self, x: np.ndarray | sp.csr_matrix) -> None:
        self.x, self.shape, self.dtype, self.ndim = x, x.shape, x.dtype, 2

    def __getitem__(self, key: tuple[slice, slice]):
        rows, cols = key
        if cols != slice(0, self.shape[1], None):
            return self.x[key]
        start, stop, _ = rows.indices(self.shape[0])
        if start == 0 and stop == self.shape[0]:
            return self.x
        if not sp.issparse(self.x):
            return self.x[start:stop]
        indptr = self.x.indptr[start : stop + 1]
        first, last = indptr[0], indptr[-1]
        # set the arrays after construction: scipy's constructor copies views of much larger arrays
        chunk = sp.csr_matrix((stop - start, self.shape[1]), dtype=self.dtype)
        chunk.data, chunk.indices, chunk.indptr = self.x.data[first:last], self.x.indices[first:last], indptr - first
        return chunk


def _single_column_chunk(arr: da.Array) -> da.Array:
    """Chunks must hold all genes of their cells: a matrix chunked along genes is rechunked."""
    if arr.numblocks[1] != 1:
        warnings.warn(
            f"the expression matrix is chunked along genes ({arr.numblocks[1]} chunks); rechunking it to "
            "chunks of whole cells, which costs a shuffle: chunk it by cells to avoid this",
            UserWarning,
            stacklevel=4,
        )
        arr = arr.rechunk({1: -1})
    return arr


def default_chunk_size(n_genes: int, values_per_cell: float) -> int:
    """Cells per chunk that one task can hold.

    90% of the memory per task (a distributed worker's memory limit over its threads; on threads, the
    machine's memory over the threads), less :data:`WORKER_BASE_BYTES`, over the bytes per cell of a pass,
    between :data:`MIN_DEFAULT_CHUNK_SIZE` and :data:`DEFAULT_CHUNK_SIZE`.
    """
    per_cell = max(BYTES_PER_GENE * n_genes, BYTES_PER_VALUE * values_per_cell) * MEMORY_MARGIN
    budget = 0.9 * memory_per_task() - WORKER_BASE_BYTES
    return int(np.clip(budget / max(per_cell, 1.0), MIN_DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE))


def memory_per_task() -> float:
    """Bytes of memory a task may use.

    The smallest worker memory limit over its threads on a distributed cluster (the machine's memory for
    workers without a limit), else the machine's memory over dask's threads.
    """
    import psutil

    from symphony_dask._dask.chunked import distributed_client

    total = float(psutil.virtual_memory().total)
    client = distributed_client()
    if client is None:
        return total / (dask.config.get("num_workers", None) or os.cpu_count() or 1)
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    limits = [(w.get("memory_limit") or total) / max(w.get("nthreads", 1), 1) for w in workers]
    return min(limits, default=total)


def _values_per_cell(elem, shape: tuple[int, int]) -> float:
    """Stored values per cell of a matrix element: its nonzeros if sparse, else all genes."""
    if hasattr(elem, "shape") or "indptr" not in elem:
        return float(shape[1])
    return float(elem["indptr"][-1]) / max(shape[0], 1)


def _read_store(path: Path, chunk_size: int | None, layer: str | None) -> Expression:
    if not path.exists():
        raise FileNotFoundError(f"no such file or store: {path}")
    group = open_anndata_group(path)
    key = "X" if layer is None else f"layers/{layer}"
    layers = tuple(group["layers"].keys()) if "layers" in group else ()
    if layer is not None and layer not in layers:
        raise ValueError(f"{path} has no layer {layer!r}; its layers are: {', '.join(map(repr, layers)) or 'none'}")
    if key not in group:
        raise ValueError(
            f"{path} has no {key!r}: it is not an AnnData with an expression matrix "
            f"(its layers: {', '.join(map(repr, layers)) or 'none'})"
        )
    obs = ad.io.read_elem(group["obs"])
    var = ad.io.read_elem(group["var"])
    elem = group[key]
    if dict(elem.attrs).get("encoding-type") == "csc_matrix":
        raise ValueError(
            f"{path}: {key} is stored by gene (CSC), which cannot be read in chunks of cells; write it by cell "
            "(CSR) once, e.g. adata.X = adata.X.tocsr(); adata.write_zarr(...)"
        )
    shape = _stored_shape(elem)
    if shape[0] != len(obs) or shape[1] != len(var):
        raise ValueError(
            f"{path}: {key} has shape {shape} but obs has {len(obs)} rows and var {len(var)} rows; "
            "the store is corrupt or was written inconsistently"
        )
    rows = chunk_size or default_chunk_size(shape[1], _values_per_cell(elem, shape))
    arr = ad.experimental.read_elem_lazy(elem, chunks=(min(rows, max(shape[0], 1)), -1))
    arr = _single_column_chunk(arr)
    obsm = dict(ad.io.read_elem(group["obsm"])) if "obsm" in group else {}
    return Expression(arr, obs, var, str(path), obsm, layers)


def keep_cells(expr: Expression, keep: np.ndarray) -> Expression:
    """The cells where ``keep`` is true, chunk by chunk (chunks left empty are dropped)."""
    blocks = expr.X.to_delayed().ravel()
    take = dask.delayed(_take_rows, pure=True)
    parts, start = [], 0
    for block, size in zip(blocks, expr.X.chunks[0], strict=True):
        rows = np.flatnonzero(keep[start : start + size])
        start += size
        if len(rows):
            parts.append(
                da.from_delayed(
                    take(block, rows), shape=(len(rows), expr.X.shape[1]), dtype=expr.X.dtype, meta=expr.X._meta
                )
            )
    obsm = {k: v.loc[keep] if isinstance(v, pd.DataFrame) else np.asarray(v)[keep] for k, v in expr.obsm.items()}
    return Expression(da.concatenate(parts, axis=0), expr.obs[keep], expr.var, expr.source, obsm, expr.layers)


def _take_rows(block, rows: np.ndarray):
    return block[rows]


def open_anndata_group(path: Path) -> h5py.Group | zarr.Group:
    """Open an ``.h5ad`` file or AnnData zarr store read-only as a group."""
    if path.is_dir():
        try:
            return zarr.open_group(str(path), mode="r")
        except Exception as err:  # zarr raises several types for a non-store folder
            raise ValueError(f"{path} is a folder but not a zarr store ({err})") from err
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path} is not an .h5ad (HDF5) file or a .zarr store ({err})") from err


def _stored_shape(elem: h5py.Group | h5py.Dataset | zarr.Group | zarr.Array) -> tuple[int, int]:
    if hasattr(elem, "shape"):
        return tuple(int(s) for s in elem.shape)  # dense
    attrs = dict(elem.attrs)
    if "shape" not in attrs:
        raise ValueError("the expression matrix is stored without a shape attribute; is it an AnnData store?")
    return tuple(int(s) for s in attrs["shape"])
