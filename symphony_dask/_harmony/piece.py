"""A piece of a chunk: the unit of work of a chunk group's threads (see :mod:`symphony_dask._harmony.chunk`).

Per piece the state is the pre-Harmony PCs ``z``, the corrected PCs ``z_corr`` and each cell's design
pattern; cells are sorted by (block, pattern), so a block is a contiguous slice and its patterns
contiguous runs. The soft assignments ``R`` are recomputed from ``z_corr``, never stored.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from symphony_dask._harmony.kernels import BlockKernel, Scratch, assign, block_of, normalize_rows, normalize_rows_into
from symphony_dask._harmony.mixture import add_weighted_sums, pattern_runs, subtract_batch_terms

if TYPE_CHECKING:
    from symphony_dask._harmony.chunk import CorrectionStep, RunSpec

#: Most cells per piece: the unit of work of a group's threads (a block of it, ~1,600 cells, is
#: a few milliseconds of work).
PIECE_CELLS = 32_768


def piece_bounds(n: int) -> list[tuple[int, int]]:
    """Split ``n`` rows into nearly equal pieces of at most :data:`PIECE_CELLS` rows."""
    count = max(1, -(-n // PIECE_CELLS))
    edges = np.linspace(0, n, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


@dataclass
class Piece:
    """The state of some consecutive cells (see the module docstring).

    ``z`` is the cells' PCs as given (in the original order, not copied); ``perm`` maps the sorted
    order to it (sorted row ``j`` is row ``perm[j]``), in which ``codes``, ``z_corr`` and
    ``z_clustered`` are kept. ``bounds[b]:bounds[b+1]`` is block ``b`` and ``runs[b]`` its (pattern,
    start, stop) runs, relative to the block. ``z_clustered`` keeps the embedding the last clustering
    saw once a final correction has moved ``z_corr`` (the output ``R`` comes from it). ``buffers``
    are two sets of scratch buffers: a clustering iteration prepares one block in one while it sums
    the other; passes over all blocks use the first.
    """

    offset: int
    z: np.ndarray
    perm: np.ndarray
    codes: np.ndarray
    bounds: np.ndarray
    runs: list[list[tuple[int, int, int]]]
    z_corr: np.ndarray
    z_clustered: np.ndarray | None = None
    buffers: tuple[Scratch, Scratch] = field(default_factory=lambda: (Scratch(), Scratch()), repr=False, compare=False)

    @staticmethod
    def create(z: np.ndarray, codes: np.ndarray, offset: int, spec: RunSpec) -> Piece:
        block = block_of(np.arange(offset, offset + len(z)), spec.key, spec.n_blocks)
        perm = np.lexsort((codes, block))
        codes, block = codes[perm].astype(np.int64), block[perm]
        bounds = np.searchsorted(block, np.arange(spec.n_blocks + 1))
        runs = [pattern_runs(codes[bounds[b] : bounds[b + 1]]) for b in range(spec.n_blocks)]
        return Piece(offset, z, perm, codes, bounds, runs, z[perm])

    def block(self, b: int) -> slice:
        return slice(int(self.bounds[b]), int(self.bounds[b + 1]))

    def n_blocks(self) -> int:
        return len(self.bounds) - 1

    # -- checks and k-means start ------------------------------------------------------------------

    def n_nonfinite(self) -> int:
        return int((~np.isfinite(self.z)).sum())

    def take(self, global_index: np.ndarray) -> np.ndarray:
        """Cosine-normalized rows at the given global indices that fall in this piece (in that order)."""
        inside = (global_index >= self.offset) & (global_index < self.offset + len(self.z))
        return normalize_rows(self.z[global_index[inside] - self.offset])

    # -- assignments -------------------------------------------------------------------------------

    def kernel(self, b: int, y: np.ndarray, sigma: float, buffers: int) -> BlockKernel:
        """The penalty-free half of block ``b``'s assignments (see :class:`BlockKernel`).

        It is kept in this piece's iteration buffers number ``buffers`` (0 or 1).
        """
        return BlockKernel.compute(self.z_corr[self.block(b)], y, sigma, self.buffers[buffers])

    def _assign(
        self, b: int, z_corr: np.ndarray, y: np.ndarray, sigma: float, weights: np.ndarray, pattern_sums: np.ndarray
    ) -> tuple[BlockKernel, float]:
        sl = self.block(b)
        return assign(z_corr[sl], y, sigma, weights, self.codes[sl], pattern_sums, self.buffers[0])

    def _block_pcs(self, b: int) -> np.ndarray:
        """Block ``b``'s rows of ``z`` in the sorted order (in a scratch buffer)."""
        rows = self.perm[self.block(b)]
        return np.take(self.z, rows, axis=0, out=self.buffers[0].get("z", len(rows), self.z.shape[1]))

    def initial_sums(self, y: np.ndarray, sigma: float, n_patterns: int) -> tuple[np.ndarray, float, np.ndarray]:
        """``S`` per block (n_blocks x p x k), entropy part and centroid sums of ``R = softmax(-dist / sigma)``."""
        ones = np.ones((n_patterns, y.shape[1]))
        s = np.zeros((self.n_blocks(), n_patterns, y.shape[1]))
        logz, centroid_sums = 0.0, np.zeros_like(y)
        for b in range(self.n_blocks()):
            kernel, part = self._assign(b, self.z_corr, y, sigma, ones, s[b])
            logz += part
            centroid_sums += kernel.centroid_sums()
        return s, logz, centroid_sums

    # -- correction --------------------------------------------------------------------------------

    def ridge_sums(self, y: np.ndarray, sigma: float, penalties: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``sum R`` (p x k) and ``sum R z`` (p x k x d) per pattern.

        ``R`` is recomputed per block from the centroids and penalties of the last clustering iteration.
        """
        n_patterns, k, d = penalties.shape[1], y.shape[1], self.z.shape[1]
        s = np.zeros((n_patterns, k))
        t = np.zeros((n_patterns, k, d))
        for b in range(self.n_blocks()):
            z = self._block_pcs(b)
            kernel, _ = self._assign(b, self.z_corr, y, sigma, penalties[b], s)
            add_weighted_sums(t, z, kernel.e, self.runs[b])
        return s, t

    def corrected_state(self, step: CorrectionStep, sigma: float) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """The corrected state after ``step``: ``z_corr``, the embedding for the output ``R``, the centroid sums.

        ``z_corr = z - sum_k R_k W_k^T x`` (``step.per_pattern[p] = x_p^T W``); the embedding to keep for the
        output ``R`` (after a final correction); the new centroid sums ``Z_cos^T R``. Leaves this piece
        unchanged.
        """
        old = self.z_corr
        new = self.z[self.perm]
        centroid_sums = np.zeros_like(step.y)
        pattern_sums = np.zeros((step.penalties.shape[1], step.y.shape[1]))
        for b in range(self.n_blocks()):
            sl = self.block(b)
            corrected = new[sl]
            kernel, _ = self._assign(b, old, step.y, sigma, step.penalties[b], pattern_sums)
            subtract_batch_terms(corrected, kernel.e, step.per_pattern, self.runs[b])
            z_cos = normalize_rows_into(corrected, self.buffers[0].get("z_cos", len(corrected), corrected.shape[1]))
            centroid_sums += z_cos.T @ kernel.e
        return new, (old if step.final else None), centroid_sums

    # -- outputs in the original cell order ----------------------------------------------------------

    def corrected(self, out: np.ndarray) -> None:
        """Write the corrected PCs into ``out`` (this piece's rows) in the original cell order."""
        out[self.perm] = self.z_corr

    def assignments(self, y: np.ndarray, sigma: float, penalties: np.ndarray, out: np.ndarray) -> None:
        """Write ``R`` (cells x k) into ``out`` (this piece's rows) in the original cell order.

        ``R`` is as the last clustering iteration left it.
        """
        z_corr = self.z_corr if self.z_clustered is None else self.z_clustered
        pattern_sums = np.zeros((penalties.shape[1], y.shape[1]))
        for b in range(self.n_blocks()):
            kernel, _ = self._assign(b, z_corr, y, sigma, penalties[b], pattern_sums)
            out[self.perm[self.block(b)]] = kernel.e
