"""Nearest reference cells of query cells in the corrected embedding.

Small references are searched exactly (a KD-tree); references above :data:`EXACT_MAX_CELLS` cells
through an HNSW graph (hnswlib; Malkov and Yashunin 2018), built once, seeded, and saved with the
reference so that every later mapping reuses it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.spatial import cKDTree

logger = logging.getLogger("symphony_dask")

#: Largest reference searched exactly when the method is 'auto'.
EXACT_MAX_CELLS = 20_000
#: HNSW graph degree and construction breadth; query breadth is max(HNSW_EF, 4 k).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 100
HNSW_EF = 64

Method = Literal["auto", "exact", "hnsw"]


@dataclass
class NeighborIndex:
    """A k-NN index over reference cells (``method`` 'exact' or 'hnsw')."""

    method: str
    n_cells: int
    dim: int
    seed: int = 0
    _index: Any = field(default=None, repr=False)
    #: HNSW's query breadth is a setting of the index: one query at a time sets and uses it.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

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
        import hnswlib

        index = hnswlib.Index(space="l2", dim=d)
        index.init_index(max_elements=n, ef_construction=HNSW_EF_CONSTRUCTION, M=HNSW_M, random_seed=seed)
        # one thread: the graph, and so every later answer, is the same for the same seed
        index.add_items(np.asarray(embedding, dtype=np.float32), np.arange(n), num_threads=1)
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
        with self._lock:
            self._index.set_ef(max(HNSW_EF, 4 * k))
            idx, _ = self._index.knn_query(np.asarray(x, dtype=np.float32), k=k, num_threads=-1)
        return idx.astype(np.int64)

    def to_bytes(self) -> bytes:
        """The HNSW graph as bytes (exact indexes are rebuilt, not saved)."""
        if self.method != "hnsw":
            raise ValueError("only an HNSW index is saved; an exact index is rebuilt when needed")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "index.bin")
            self._index.save_index(path)
            with open(path, "rb") as f:
                return f.read()

    @classmethod
    def from_bytes(cls, data: bytes, *, n_cells: int, dim: int, seed: int = 0) -> NeighborIndex:
        import hnswlib

        index = hnswlib.Index(space="l2", dim=dim)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "index.bin")
            with open(path, "wb") as f:
                f.write(data)
            index.load_index(path, max_elements=n_cells)
        return cls("hnsw", n_cells, dim, seed, index)
