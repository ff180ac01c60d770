"""Harmony's work on one row chunk of cells: the state a chunk keeps and the steps applied to it.

A :class:`HarmonyChunk` holds a chunk's pre-Harmony PCs ``z``, its corrected PCs ``z_corr``, its soft
assignments ``r`` and each cell's design pattern. The driver in :mod:`symphony_dask.harmony` applies
the steps below to every chunk and reduces what they return (small sums) in a tree, so that the
global statistics of Harmony are

- ``S`` (p x k): ``sum R`` per design pattern and cluster, from which ``O = R Phi^T`` and
  ``E = N_k Pr_b^T`` follow (a cell's pattern fixes its batches);
- centroid sums ``Z_cos^T R`` (d x k), the k-means error ``sum R dist`` and entropy ``sum sigma R log R``;
- ridge sums per pattern (:func:`symphony_dask.mixture.ridge_statistics`).

Block-wise assignment (harmony 0.1 updates 5% of cells at a time, refreshing O and E between blocks):
in each clustering iteration every cell draws a block from a hash of its global index and the
iteration's seed, so block membership does not depend on chunking. Blocks are processed in turn;
within a block, all chunks update their cells of that block in parallel.

Steps mutate the chunk state in place (the state lives in one task chain per chunk); every other
value they return is new.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kmeans import sum_by_label
from .mixture import remove_batch_terms, ridge_statistics

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a fixed, well-spread hash of unsigned 64-bit integers."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def block_of(global_index: np.ndarray, key: int, n_blocks: int) -> np.ndarray:
    """Block (0 .. n_blocks-1) of each cell in the iteration with hash ``key``."""
    with np.errstate(over="ignore"):
        h = mix64(np.asarray(global_index, dtype=np.uint64) + mix64(np.uint64(key)))
    return (h % np.uint64(n_blocks)).astype(np.int64)


def normalize_rows(z: np.ndarray) -> np.ndarray:
    norm = np.sqrt(np.einsum("ij,ij->i", z, z))[:, None]
    return np.divide(z, norm, out=np.zeros_like(z), where=norm > 0)


def pattern_sums(values: np.ndarray, codes: np.ndarray, n_patterns: int) -> np.ndarray:
    """Sum of the rows of ``values`` per design pattern (p x columns)."""
    if n_patterns == 1:
        return values.sum(axis=0, keepdims=True)
    return sum_by_label(values, codes, n_patterns)


@dataclass
class Sums:
    """Tree-reducible sums of an assignment update: ``S`` per pattern, objective terms, centroid sums."""

    s: np.ndarray
    kmeans_error: float
    entropy: float
    centroid_sums: np.ndarray

    def merge(self, other: Sums) -> Sums:
        return Sums(
            self.s + other.s,
            self.kmeans_error + other.kmeans_error,
            self.entropy + other.entropy,
            self.centroid_sums + other.centroid_sums,
        )


@dataclass
class HarmonyChunk:
    """State of one chunk of cells (see the module docstring)."""

    offset: int
    z: np.ndarray
    z_corr: np.ndarray
    codes: np.ndarray
    n_patterns: int
    r: np.ndarray | None = None
    blocks: list[np.ndarray] | None = None

    @staticmethod
    def create(z: np.ndarray, codes: np.ndarray, offset: int, n_patterns: int) -> HarmonyChunk:
        z = np.asarray(z, dtype=np.float64)
        return HarmonyChunk(offset, z, z, np.asarray(codes, dtype=np.int64), n_patterns)

    # -- checks and k-means start ----------------------------------------------------------------

    def n_nonfinite(self) -> int:
        return int((~np.isfinite(self.z)).sum())

    def take(self, global_index: np.ndarray) -> np.ndarray:
        """Cosine-normalized rows at the given global indices that fall in this chunk."""
        local = global_index[(global_index >= self.offset) & (global_index < self.offset + len(self.z))] - self.offset
        return normalize_rows(self.z[local])

    def lloyd_sums(self, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Per-center sums and counts of the cosine-normalized cells nearest to it, and the inertia."""
        x = normalize_rows(self.z)
        d = (x * x).sum(1)[:, None] - 2.0 * (x @ centers.T) + (centers * centers).sum(1)[None, :]
        labels = np.argmin(d, axis=1)
        k = centers.shape[0]
        sums = sum_by_label(x, labels, k)
        inertia = float(np.maximum(d[np.arange(len(x)), labels], 0).sum())
        return sums, np.bincount(labels, minlength=k).astype(np.float64), inertia

    # -- soft clustering ---------------------------------------------------------------------------

    def initial_assignments(self, y: np.ndarray, sigma: np.ndarray) -> Sums:
        """``R = softmax(-dist / sigma)`` for all cells from the k-means centroids ``y``."""
        z_cos = normalize_rows(self.z_corr)
        dist = 2.0 * (1.0 - z_cos @ y)
        self.r = _softmax(-dist / sigma)
        return self._sums(slice(None), z_cos, dist, sigma)

    def begin_iteration(self, key: int, n_blocks: int) -> np.ndarray:
        """Draw this iteration's blocks; return ``sum R`` per block and pattern before the update."""
        block = block_of(np.arange(self.offset, self.offset + len(self.z)), key, n_blocks)
        order = np.argsort(block, kind="stable")
        bounds = np.searchsorted(block[order], np.arange(n_blocks + 1))
        self.blocks = [order[bounds[b] : bounds[b + 1]] for b in range(n_blocks)]
        return np.stack([pattern_sums(self.r[rows], self.codes[rows], self.n_patterns) for rows in self.blocks])

    def update_block(self, b: int, y: np.ndarray, sigma: np.ndarray, ledger) -> Sums:
        """New assignments of this chunk's cells in block ``b``.

        ``ledger.penalty`` (p x k) is the diversity penalty of each design pattern, from O and E
        without the block's cells: ``R_i ~ exp(-dist_i / sigma) * penalty[pattern_i]``.
        """
        penalty = ledger.penalty
        rows = self.blocks[b]
        z_cos = normalize_rows(self.z_corr[rows])
        dist = 2.0 * (1.0 - z_cos @ y)
        r = _softmax(-dist / sigma, weights=penalty[self.codes[rows]])
        self.r[rows] = r
        return self._sums(rows, z_cos, dist, sigma)

    def _sums(self, rows, z_cos: np.ndarray, dist: np.ndarray, sigma: np.ndarray) -> Sums:
        r = self.r[rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            rlogr = np.where(r > 0, r * np.log(r), 0.0)
        return Sums(
            s=pattern_sums(r, self.codes[rows], self.n_patterns),
            kmeans_error=float(np.einsum("ij,ij->", r, dist)),
            entropy=float((rlogr.sum(axis=0) * sigma).sum()),
            centroid_sums=z_cos.T @ r,
        )

    # -- correction --------------------------------------------------------------------------------

    def ridge_sums(self) -> tuple[np.ndarray, np.ndarray]:
        return ridge_statistics(self.z, self.r, self.codes, self.n_patterns)

    def correct(self, patterns: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Apply the ridge correction to ``z``; return the new centroid sums ``Z_cos^T R``."""
        self.z_corr = remove_batch_terms(self.z, self.r, self.codes, patterns, w)
        self.blocks = None
        return normalize_rows(self.z_corr).T @ self.r


def _softmax(a: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Row-wise ``exp(a - max) * weights``, normalized to sum to one."""
    a = a - a.max(axis=1, keepdims=True)
    np.exp(a, out=a)
    if weights is not None:
        a *= weights
    a /= a.sum(axis=1, keepdims=True)
    return a
