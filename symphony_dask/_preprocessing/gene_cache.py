"""A cache of the chosen genes: every later pass of a build reads it instead of the whole atlas.

After gene selection, one pass keeps, per row chunk, the stored values of the chosen genes as they are
in the input (a CSR chunk of cells x chosen genes, the input's dtype: exact) and each cell's
normalization factor (``1e4 / total over all genes``, float64): the normalization and scaling are applied
on the fly by the kernels (:func:`~symphony_dask._preprocessing.csr_kernels.cached_product`), so a pass
over the cache gives the same numbers as a pass over the atlas, at the cost of the chosen genes' stored
values alone.

Where it is kept:

- ``"memory"``: persisted by dask: in this process on the threaded scheduler, when it fits
  :data:`MEMORY_FRACTION` of the machine's memory; on a cluster, on the workers that computed it (a
  worker short of memory spills it to its local directory, and a lost worker's chunks are recomputed from
  the atlas, so results do not change);
- ``"disk"``: a compressed zarr store in dask's ``temporary-directory`` (else the system's temporary
  folder), on the threaded scheduler when it does not fit; removed when the build ends or fails.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import psutil
import scipy.sparse as sp
import zarr

from symphony_dask._dask.chunked import compute, distributed_client, persist_all, row_blocks
from symphony_dask._preprocessing.csr_kernels import as_csr
from symphony_dask._preprocessing.normalize import Block, stored_value_factors

logger = logging.getLogger("symphony_dask")

#: Share of the machine's memory the cache may take in this process (threaded scheduler); above, on disk.
MEMORY_FRACTION = 0.25
#: Bytes a cached cell costs besides its stored values: its normalization factor and its row pointer.
CELL_BYTES = 16


@dataclass
class GeneCache:
    """The chosen genes of every cell (see the module docstring), chunked like the atlas's rows.

    ``x`` holds CSR chunks (cells x chosen genes, stored values as in the input) and ``row_factors`` each
    cell's normalization factor; ``kernel_args`` are what the kernels need besides a chunk (the genes'
    means, SDs and factors, whether to normalize).
    """

    x: da.Array
    row_factors: da.Array
    kernel_args: dict[str, Any]
    storage: str
    stored: int
    nbytes: int
    path: Path | None = field(default=None, repr=False)

    def record(self) -> dict[str, Any]:
        """What ``Reference.params`` records of the cache: where it was kept, its size and its genes."""
        return {"storage": self.storage, "bytes": int(self.nbytes), "genes": int(self.x.shape[1])}


def estimated_bytes(n_cells: int, nonzero: int, itemsize: int) -> int:
    """Bytes of a cache of ``n_cells`` cells holding ``nonzero`` stored values of ``itemsize`` bytes."""
    return int(nonzero) * (int(itemsize) + 4) + int(n_cells) * CELL_BYTES


@contextmanager
def gene_cache(
    x: da.Array,
    genes: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    *,
    normalize: bool,
    idf: np.ndarray | None = None,
    nonzero: int | None = None,
    storage: str = "auto",
) -> Iterator[GeneCache]:
    """The cache of the chosen ``genes`` of ``x`` (one pass), for the block; removed when the block ends.

    Parameters
    ----------
    x
        The atlas (cells x genes), row-chunked.
    genes
        Column indices of the chosen genes.
    mean, std
        The chosen genes' means and SDs (of the normalized values), for scaling.
    normalize
        Log-normalize the stored values (TF-IDF with ``idf``, one value per column of ``x``).
    nonzero
        The chosen genes' stored values in all (from the first pass), for choosing where the cache is kept;
        ``None``: an upper bound, every stored value of the chosen genes' share of the columns.
    storage
        ``"auto"`` (see the module docstring), ``"memory"`` or ``"disk"``.
    """
    genes = np.asarray(genes, dtype=np.int64)
    itemsize = np.dtype(x.dtype).itemsize
    if nonzero is None:
        nonzero = x.shape[0] * len(genes)
    estimate = estimated_bytes(x.shape[0], nonzero, itemsize)
    if storage == "auto":
        fits = estimate <= MEMORY_FRACTION * psutil.virtual_memory().total
        storage = "memory" if fits or distributed_client() is not None else "disk"
    gene_factors = np.ones(len(genes)) if idf is None else np.asarray(idf, dtype=np.float64)[genes]
    kernel_args = dict(
        mean=np.asarray(mean, dtype=np.float64),
        std=np.asarray(std, dtype=np.float64),
        gene_factors=gene_factors,
        transform=bool(normalize),
    )
    path = None
    try:
        if storage == "memory":
            cached, factors = persist_all(*_arrays(_pieces(x, genes, normalize, idf), x, len(genes)))
            stored = _stored_count(cached)
        elif storage == "disk":
            path = _scratch_folder()
            cached, factors, stored = _on_disk(x, genes, normalize, idf, path)
        else:
            raise ValueError(f"gene cache storage must be 'auto', 'memory' or 'disk', got {storage!r}")
        nbytes = estimated_bytes(x.shape[0], stored, itemsize)
        cache = GeneCache(cached, factors, kernel_args, storage, stored, nbytes, path)
        logger.info("gene cache: %d genes of %d cells, %.2f GB, in %s", len(genes), x.shape[0], nbytes / 1e9, storage)
        yield cache
    finally:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


def chosen_genes(
    block: Block, genes: np.ndarray, normalize: bool, idf: np.ndarray | None
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Kernel: a chunk's chosen genes (CSR, stored values as given) and its cells' normalization factors."""
    if sp.issparse(block):
        block = as_csr(block)
        row_factors, _ = stored_value_factors(block, normalize=normalize, idf=idf)
        return block[:, genes].tocsr(), row_factors
    block = np.asarray(block)
    row_factors, _ = stored_value_factors(sp.csr_matrix(block), normalize=normalize, idf=idf)
    return sp.csr_matrix(block[:, genes]), row_factors


def _pieces(x: da.Array, genes: np.ndarray, normalize: bool, idf: np.ndarray | None) -> list[Any]:
    task = dask.delayed(chosen_genes, pure=True, nout=2)
    return [task(block, genes, normalize, idf) for block in row_blocks(x)]


def _arrays(parts: list[tuple[Any, Any]], x: da.Array, n_genes: int) -> tuple[da.Array, da.Array]:
    """The dask arrays of delayed (chunk, factors) pairs, with the atlas's row chunks."""
    meta = sp.csr_matrix((0, n_genes), dtype=x.dtype)
    cached = da.concatenate(
        [
            da.from_delayed(c, shape=(n, n_genes), dtype=x.dtype, meta=meta)
            for (c, _), n in zip(parts, x.chunks[0], strict=True)
        ]
    )
    factors = da.concatenate(
        [da.from_delayed(f, shape=(n,), dtype=np.float64) for (_, f), n in zip(parts, x.chunks[0], strict=True)]
    )
    return cached, factors


def _scratch_folder() -> Path:
    """A new folder for a cache on disk, in dask's ``temporary-directory`` (else the system's temporary folder)."""
    base = Path(dask.config.get("temporary-directory", None) or tempfile.gettempdir())
    path = base / f"symphony-gene-cache-{uuid.uuid4().hex}"
    path.mkdir(parents=True)
    return path


def _write(block: Block, genes: np.ndarray, normalize: bool, idf: np.ndarray | None, path: Path, i: int) -> int:
    """Kernel: write chunk ``i``'s chosen genes and factors to the cache folder (a zarr group); its stored values."""
    chunk, factors = chosen_genes(block, genes, normalize, idf)
    group = zarr.open_group(str(path / f"{i}.zarr"), mode="w", zarr_format=3)
    for name, values in (
        ("data", chunk.data),
        ("indices", chunk.indices),
        ("indptr", chunk.indptr),
        ("row_factors", factors),
    ):
        group.create_array(name, data=values, chunks=(max(len(values), 1),))
    return int(chunk.nnz)


def _read(path: Path, i: int, n_genes: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """Kernel: chunk ``i`` of a cache on disk."""
    group = zarr.open_group(str(path / f"{i}.zarr"), mode="r")
    indptr = group["indptr"][:]
    chunk = sp.csr_matrix((group["data"][:], group["indices"][:], indptr), shape=(len(indptr) - 1, n_genes))
    return chunk, group["row_factors"][:]


def _on_disk(
    x: da.Array, genes: np.ndarray, normalize: bool, idf: np.ndarray | None, path: Path
) -> tuple[da.Array, da.Array, int]:
    """One pass writes every chunk to ``path``; the cache reads them back when a pass uses it. Its stored values."""
    write = dask.delayed(_write, pure=True)
    stored = compute(*[write(block, genes, normalize, idf, path, i) for i, block in enumerate(row_blocks(x))])
    read = dask.delayed(_read, pure=True, nout=2)
    cached, factors = _arrays([read(path, i, len(genes)) for i in range(len(x.chunks[0]))], x, len(genes))
    return cached, factors, int(sum(stored))


def _stored_count(cached: da.Array) -> int:
    """Stored values of the cache (a sum over its chunks' sizes: cheap for a cache in memory)."""
    count = dask.delayed(_nnz, pure=True)
    return int(sum(compute(*[count(block) for block in row_blocks(cached)])))


def _nnz(block: sp.csr_matrix) -> int:
    return int(block.nnz)
