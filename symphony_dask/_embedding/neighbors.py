"""Nearest reference cells of query cells in the corrected embedding.

Small references are searched exactly (a KD-tree); references above :data:`EXACT_MAX_CELLS` cells
through an HNSW graph (Malkov and Yashunin 2018; faiss's ``IndexHNSWFlat``, which ships wheels for
every platform), built once, seeded, and saved with the reference so that every later mapping
reuses it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.spatial import cKDTree

from symphony_dask._dask.timing import logger

#: Largest reference searched exactly when the method is 'auto'.
EXACT_MAX_CELLS = 20_000
#: HNSW graph degree and construction breadth; query breadth is max(HNSW_EF, 4 k).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 100
HNSW_EF = 64
#: The library whose graph format a saved index is in (stores record it; others are rebuilt).
INDEX_FORMAT = "faiss-hnsw"

Method = Literal["auto", "exact", "hnsw"]

_build_lock = threading.Lock()


def hnsw_graph(points: np.ndarray, *, seed: int = 0, inner_product: bool = False) -> Any:
    """An HNSW graph over the rows of ``points`` (faiss ``IndexHNSWFlat``).

    Its metric is the squared Euclidean distance, or the inner product when ``inner_product``. The graph
    is built on one thread with its level generator seeded by ``seed``, so the same points and seed give
    the same graph, and so the same answers, in every process.
    """
    import faiss

    points = np.ascontiguousarray(points, dtype=np.float32)
    metric = faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2
    index = faiss.IndexHNSWFlat(points.shape[1], HNSW_M, metric)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.hnsw.rng = faiss.RandomGenerator(int(seed))
    with _build_lock:  # faiss's thread count is process-wide: one build at a time sets and restores it
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            index.add(points)
        finally:
            faiss.omp_set_num_threads(threads)
    return index


def hnsw_search(index: Any, x: np.ndarray, k: int, ef: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest graph points of each row of ``x``, searching ``max(ef, k)`` candidates.

    Returns their indices, and their distances or inner products as the graph's metric gives them.
    """
    import faiss

    params = faiss.SearchParametersHNSW(efSearch=max(int(ef), k))
    distances, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), k, params=params)
    return idx.astype(np.int64), distances


@dataclass
class NeighborIndex:
    """A k-NN index over reference cells (``method`` 'exact' or 'hnsw')."""

    method: str
    n_cells: int
    dim: int
    seed: int = 0
    _index: Any = field(default=None, repr=False)

    @classmethod
    def build(cls, embedding: np.ndarray, *, method: Method = "auto", seed: int = 0) -> NeighborIndex:
        """Index the rows of ``embedding`` (reference cells x d)."""
        embedding = np.asarray(embedding)
        n, d = embedding.shape
        if method == "auto":
            method = "exact" if n <= EXACT_MAX_CELLS else "hnsw"
        if method == "exact":
            return cls("exact", n, d, seed, cKDTree(np.asarray(embedding, dtype=np.float64)))
        if method != "hnsw":
            raise ValueError(f"neighbor method must be 'auto', 'exact' or 'hnsw', got {method!r}")
        index = hnsw_graph(embedding, seed=seed)
        logger.info("built an HNSW index of %d reference cells", n)
        return cls("hnsw", n, d, seed, index)

    def query(self, x: np.ndarray, k: int) -> np.ndarray:
        """Indices (rows of ``x`` x k) of the k nearest reference cells, nearest first."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"queries must be cells x {self.dim}, got shape {x.shape}")
        if not 1 <= k <= self.n_cells:
            raise ValueError(f"k={k} must be between 1 and the number of reference cells ({self.n_cells})")
        if self.method == "exact":
            _, idx = self._index.query(np.asarray(x, dtype=np.float64), k=k, workers=-1)
            return np.asarray(idx).reshape(len(x), k)
        return hnsw_search(self._index, x, k, max(HNSW_EF, 4 * k))[0]

    def to_bytes(self) -> bytes:
        """The HNSW graph as bytes (exact indexes are rebuilt, not saved)."""
        if self.method != "hnsw":
            raise ValueError("only an HNSW index is saved; an exact index is rebuilt when needed")
        import faiss

        return faiss.serialize_index(self._index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, *, n_cells: int, dim: int, seed: int = 0) -> NeighborIndex:
        """An HNSW index saved by :meth:`to_bytes`."""
        import faiss

        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if index.ntotal != n_cells or index.d != dim:
            raise ValueError(
                f"the saved neighbor index holds {index.ntotal} cells x {index.d} dimensions, "
                f"the reference {n_cells} x {dim}"
            )
        return cls("hnsw", n_cells, dim, seed, index)
