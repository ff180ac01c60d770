"""Harmony's work on one row chunk of cells: the state a chunk keeps and the steps applied to it.

A :class:`HarmonyChunk` holds a chunk's pre-Harmony PCs ``z`` and corrected PCs ``z_corr`` and each
cell's design pattern. The driver in :mod:`symphony_dask.harmony` applies the steps below to every
chunk and reduces what they return (small sums), so that the global statistics of Harmony are

- ``S`` (p x k): ``sum R`` per design pattern and cluster, kept per block, from which
  ``O = R Phi^T`` and ``E = N_k Pr_b^T`` follow (a cell's pattern fixes its batches);
- centroid sums ``Z_cos^T R`` (d x k) and the log-normalizers of the soft assignments, which give
  the objective without a pass of its own (see :meth:`HarmonyChunk.update_block`);
- ridge sums per pattern, ``sum R`` and ``sum R z``.

Blocks: harmony 0.1 updates 5% of the cells at a time, refreshing O and E between blocks. Here every
cell belongs to one of ``n_blocks`` blocks drawn once per run from a hash of its global index and
the seed (so membership does not depend on chunking); each clustering iteration visits the blocks in
a new seeded order, and within a block all chunks update their cells of it in parallel. Inside a
chunk, cells are kept sorted by (block, pattern), so a block is a contiguous slice and its patterns
contiguous runs; outputs come back in the original cell order.

The assignments ``R`` are never stored: a cell's ``R`` is a function of its ``z_corr`` row, the
centroids ``Y`` of the iteration and the diversity penalty its block saw, so the ridge step
recomputes it from those (d x k and n_blocks x p x k numbers) instead of keeping n x k values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numba
import numpy as np

from .mixture import pattern_runs

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
    """Block (0 .. n_blocks-1) of each cell for the hash ``key``."""
    with np.errstate(over="ignore"):
        h = mix64(np.asarray(global_index, dtype=np.uint64) + mix64(np.uint64(key)))
    return (h % np.uint64(n_blocks)).astype(np.int64)


def normalize_rows(z: np.ndarray) -> np.ndarray:
    norm = np.sqrt(np.einsum("ij,ij->i", z, z))[:, None]
    return np.divide(z, norm, out=np.zeros_like(z), where=norm > 0)


#: Rows processed together: a tile of cos / R values (2,048 x k) stays in the CPU cache.
TILE_ROWS = 2048


@numba.njit(cache=True, nogil=True)
def _shift_rows(a: np.ndarray, scale: float) -> np.ndarray:
    """In place ``a[i] = scale a[i] - m_i`` with ``m_i = max_j scale a[i, j]``; returns ``m``."""
    n, k = a.shape
    m = np.empty(n)
    for i in range(n):
        top = -np.inf
        for j in range(k):
            v = a[i, j] * scale
            a[i, j] = v
            if v > top:
                top = v
        for j in range(k):
            a[i, j] -= top
        m[i] = top
    return m


@numba.njit(cache=True, nogil=True)
def _weigh_and_normalize(e: np.ndarray, weights: np.ndarray, codes: np.ndarray, pattern_sums: np.ndarray) -> float:
    """In place ``e[i] = e[i] * weights[codes[i]] / Z_i``; adds each row to ``pattern_sums[codes[i]]``;
    returns ``sum_i log Z_i``."""
    n, k = e.shape
    total = 0.0
    for i in range(n):
        w = weights[codes[i]]
        z = 0.0
        for j in range(k):
            v = e[i, j] * w[j]
            e[i, j] = v
            z += v
        inv = 1.0 / z
        row = pattern_sums[codes[i]]
        for j in range(k):
            v = e[i, j] * inv
            e[i, j] = v
            row[j] += v
        total += math.log(z)
    return total


def assign_tiles(z_corr: np.ndarray, y: np.ndarray, sigma: float, weights: np.ndarray, codes: np.ndarray,
                 pattern_sums: np.ndarray):
    """Soft assignments ``R ~ exp(-2 (1 - cos) / sigma) * weights[pattern]`` of the rows of ``z_corr``,
    tile by tile: yields ``(start, stop, z_cos, r, logz)`` where ``logz`` is the tile's
    ``sum(m + log Z)`` of ``a = -dist / sigma``, and adds ``R`` per pattern into ``pattern_sums``.

    Per tile: one GEMM, a shift pass, NumPy's vectorized exp, and a weighting pass, all in cache.
    """
    scale = 2.0 / sigma
    for start in range(0, len(z_corr), TILE_ROWS):
        stop = min(start + TILE_ROWS, len(z_corr))
        z_cos = normalize_rows(z_corr[start:stop])
        r = z_cos @ y
        m = _shift_rows(r, scale)
        np.exp(r, out=r)
        logz = _weigh_and_normalize(r, weights, codes[start:stop], pattern_sums) + float(m.sum()) - len(r) * scale
        yield start, stop, z_cos, r, logz


@dataclass
class Sums:
    """Tree-reducible sums of an assignment update.

    ``s``: ``sum R`` per pattern (p x k; n_blocks x p x k for a whole chunk); ``logz``: the sum over
    cells of ``max_k a_ik + log sum_k exp(a_ik - max) w_ik`` with ``a = -dist / sigma``;
    ``centroid_sums``: ``Z_cos^T R`` (d x k).
    """

    s: np.ndarray
    logz: float
    centroid_sums: np.ndarray

    def merge(self, other: Sums) -> Sums:
        return Sums(self.s + other.s, self.logz + other.logz, self.centroid_sums + other.centroid_sums)


@dataclass
class Stepped:
    """A chunk state after a step, with the step's result."""

    state: HarmonyChunk
    result: object


@dataclass
class HarmonyChunk:
    """State of one chunk of cells (see the module docstring).

    ``z`` is in the original cell order; ``perm`` maps the sorted order to it, and ``z_corr`` and
    ``codes`` are in the sorted order. ``bounds[b]:bounds[b+1]`` is block ``b`` and ``runs[b]`` its
    (pattern, start, stop) runs, relative to the block. ``z_clustered`` keeps the embedding the last
    clustering saw once a final correction has moved ``z_corr`` (the output ``R`` is computed from it).
    """

    offset: int
    z: np.ndarray
    perm: np.ndarray
    z_corr: np.ndarray
    codes: np.ndarray
    n_patterns: int
    bounds: np.ndarray
    runs: list[list[tuple[int, int, int]]]
    z_clustered: np.ndarray | None = None

    @staticmethod
    def create(z: np.ndarray, codes: np.ndarray, offset: int, n_patterns: int, n_blocks: int, key: int) -> HarmonyChunk:
        z = np.asarray(z, dtype=np.float64)
        codes = np.asarray(codes, dtype=np.int64)
        block = block_of(np.arange(offset, offset + len(z)), key, n_blocks)
        perm = np.lexsort((codes, block))
        codes, block = codes[perm], block[perm]
        bounds = np.searchsorted(block, np.arange(n_blocks + 1))
        runs = []
        for b in range(n_blocks):
            c = codes[bounds[b] : bounds[b + 1]]
            starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]]) if len(c) else np.array([], dtype=np.int64)
            stops = np.r_[starts[1:], len(c)]
            runs.append([(int(c[s]), int(s), int(e)) for s, e in zip(starts, stops)])
        return HarmonyChunk(offset, z, perm, z[perm], codes, n_patterns, bounds, runs)

    @property
    def n_blocks(self) -> int:
        return len(self.bounds) - 1

    def _block(self, b: int) -> slice:
        return slice(int(self.bounds[b]), int(self.bounds[b + 1]))

    def _tiles(self, b: int, z_corr: np.ndarray, y: np.ndarray, sigma: float, weights: np.ndarray,
               pattern_sums: np.ndarray | None = None):
        """:func:`assign_tiles` over block ``b`` of ``z_corr`` (tile bounds relative to the block)."""
        sl = self._block(b)
        if pattern_sums is None:
            pattern_sums = np.zeros((self.n_patterns, y.shape[1]))
        return assign_tiles(z_corr[sl], y, sigma, weights, self.codes[sl], pattern_sums)

    # -- checks and k-means start ----------------------------------------------------------------

    def n_nonfinite(self) -> int:
        return int((~np.isfinite(self.z)).sum())

    def take(self, global_index: np.ndarray) -> np.ndarray:
        """Cosine-normalized rows at the given global indices that fall in this chunk."""
        inside = (global_index >= self.offset) & (global_index < self.offset + len(self.z))
        return normalize_rows(self.z[global_index[inside] - self.offset])

    # -- soft clustering ---------------------------------------------------------------------------

    def initial_assignments(self, y: np.ndarray, sigma: float) -> Sums:
        """Sums of ``R = softmax(-dist / sigma)`` (no penalty); ``s`` per block (n_blocks x p x k)."""
        ones = np.ones((self.n_patterns, y.shape[1]))
        s = np.zeros((self.n_blocks, self.n_patterns, y.shape[1]))
        total = Sums(s, 0.0, np.zeros_like(y))
        for b in range(self.n_blocks):
            for _, _, z_cos, r, logz in self._tiles(b, self.z_corr, y, sigma, ones, s[b]):
                total.logz += logz
                total.centroid_sums += z_cos.T @ r
        return total

    def update_block(self, b: int, y: np.ndarray, sigma: float, ledger) -> Sums:
        """Sums of the new assignments of this chunk's cells in block ``b``.

        ``R_i ~ exp(-dist_i / sigma) * w[pattern_i]`` with ``w = ledger.penalty`` (p x k), the
        diversity penalty from O and E without the block's cells. The objective needs no extra
        pass: with ``a = -dist / sigma``, ``sum_k sigma r log r = -sum_k r dist - sigma (m + log Z)
        + sigma sum_k r log w`` per cell, and ``sum r dist = 2 n - 2 tr(Y^T Z_cos^T R)``.
        """
        total = Sums(np.zeros((self.n_patterns, y.shape[1])), 0.0, np.zeros_like(y))
        for _, _, z_cos, r, logz in self._tiles(b, self.z_corr, y, sigma, ledger.penalty, total.s):
            total.logz += logz
            total.centroid_sums += z_cos.T @ r
        return total

    # -- correction --------------------------------------------------------------------------------

    def ridge_sums(self, y: np.ndarray, sigma: float, penalties: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``sum R`` (p x k) and ``sum R z`` (p x k x d) per pattern, with ``R`` recomputed per block
        from the centroids and penalties of the last clustering iteration."""
        k, d = y.shape[1], self.z.shape[1]
        s = np.zeros((self.n_patterns, k))
        t = np.zeros((self.n_patterns, k, d))
        for b in range(self.n_blocks):
            z = self.z[self.perm[self._block(b)]]
            codes = self.codes[self._block(b)]
            for start, stop, _, r, _ in self._tiles(b, self.z_corr, y, sigma, penalties[b], s):
                for p, a, e in pattern_runs(codes[start:stop]):
                    t[p] += r[a:e].T @ z[start + a : start + e]
        return s, t

    def correct(self, per_pattern: np.ndarray, y: np.ndarray, sigma: float, penalties: np.ndarray,
                final: bool) -> Stepped:
        """A new state with ``z_corr = z - sum_k R_k W_k^T x`` (``per_pattern[p] = x_p^T W``, p x k x d),
        and the new centroid sums ``Z_cos^T R``. A ``final`` correction keeps the embedding the
        clustering saw, from which the output ``R`` is computed. Like every step, it leaves this
        state unchanged, so a step that dask runs twice gives the same result."""
        old = self.z_corr
        new = np.empty_like(old)
        centroid_sums = np.zeros_like(y)
        for b in range(self.n_blocks):
            sl = self._block(b)
            corrected = self.z[self.perm[sl]]
            codes = self.codes[sl]
            for start, stop, _, r, _ in self._tiles(b, old, y, sigma, penalties[b]):
                for p, a, e in pattern_runs(codes[start:stop]):
                    corrected[start + a : start + e] -= r[a:e] @ per_pattern[p]
                centroid_sums += normalize_rows(corrected[start:stop]).T @ r
            new[sl] = corrected
        state = replace(self, z_corr=new, z_clustered=old if final else None)
        return Stepped(state, centroid_sums)

    # -- outputs in the original cell order ---------------------------------------------------------

    def corrected(self) -> np.ndarray:
        out = np.empty_like(self.z_corr)
        out[self.perm] = self.z_corr
        return out

    def assignments(self, y: np.ndarray, sigma: float, penalties: np.ndarray) -> np.ndarray:
        """``R`` (cells x k) in the original cell order, as the last clustering iteration left it."""
        z_corr = self.z_corr if self.z_clustered is None else self.z_clustered
        out = np.empty((len(self.z), y.shape[1]))
        for b in range(self.n_blocks):
            rows = self.perm[self._block(b)]
            for start, stop, _, r, _ in self._tiles(b, z_corr, y, sigma, penalties[b]):
                out[rows[start:stop]] = r
        return out
