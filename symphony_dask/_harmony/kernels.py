"""Harmony's kernels: pure NumPy/numba functions on one piece of the embedding, and the bookkeeping of O and E.

The bookkeeping of O and E is carried from block to block (:class:`Ledger`). Nothing here knows
about chunks, threads or workers; :mod:`symphony_dask._harmony.chunk` applies these kernels to row
chunks, :mod:`symphony_dask._harmony.driver` combines their sums, and query mapping and compression
use :func:`cosine_normalize` and :func:`soft_assign` directly.

Notation (cells are rows): ``Z`` (n x d) PCs, ``Z_cos`` its rows L2-normalized, ``Y`` (d x k)
L2-normalized centroids, ``R`` (n x k) soft assignments. A cell's *design pattern* is its row of
the batch design with intercept (``patterns``, p x (1 + B)); ``S`` (p x k) holds ``sum R`` per
pattern, from which ``O = S^T Phi`` and ``E = N_k Pr_b^T`` (k x B) follow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

# ----------------------------------------------------------------------------------------------
# soft assignment (also used by mapping and compression)
# ----------------------------------------------------------------------------------------------


def cosine_normalize(z: np.ndarray, axis: int = 1) -> np.ndarray:
    """Divide each row (``axis=1``) or column (``axis=0``) by its L2 norm; zero vectors stay zero."""
    norm = np.linalg.norm(z, axis=axis, keepdims=True)
    return np.divide(z, norm, out=np.zeros_like(z, dtype=np.float64), where=norm > 0)


def soft_assign(z_cos: np.ndarray, y_cos: np.ndarray, sigma: float | np.ndarray) -> np.ndarray:
    """Soft k-means assignments ``softmax_k(-2 (1 - cos) / sigma)`` without diversity penalty (n x k)."""
    a = -2.0 * (1.0 - z_cos @ y_cos) / sigma
    a -= a.max(axis=1, keepdims=True)
    np.exp(a, out=a)
    a /= a.sum(axis=1, keepdims=True)
    return a


def normalize_rows(z: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norms (zero rows stay zero)."""
    norm = np.sqrt(np.einsum("ij,ij->i", z, z))[:, None]
    return np.divide(z, norm, out=np.zeros_like(z), where=norm > 0)


# ----------------------------------------------------------------------------------------------
# block membership
# ----------------------------------------------------------------------------------------------

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
    """Block (0 .. n_blocks-1) of each cell for the hash ``key``: fixed per run, whatever the chunking."""
    with np.errstate(over="ignore"):
        h = mix64(np.asarray(global_index, dtype=np.uint64) + mix64(np.uint64(key)))
    return (h % np.uint64(n_blocks)).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# the softmax of one block in two halves: what the centroids fix, and what the penalty adds
# ----------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _shift_rows(a: np.ndarray, scale: float) -> float:
    """In place ``a[i] = scale a[i] - m_i`` with ``m_i = max_j scale a[i, j]``; returns ``sum_i m_i``."""
    n, k = a.shape
    total = 0.0
    for i in range(n):
        top = -np.inf
        for j in range(k):
            v = a[i, j] * scale
            a[i, j] = v
            if v > top:
                top = v
        for j in range(k):
            a[i, j] -= top
        total += top
    return total


@numba.njit(cache=True, nogil=True)
def _weigh_and_normalize(e: np.ndarray, weights: np.ndarray, codes: np.ndarray, pattern_sums: np.ndarray) -> float:
    """In place ``e[i] = e[i] * weights[codes[i]] / Z_i``, adding each row to ``pattern_sums[codes[i]]``.

    Returns ``sum_i log Z_i``.
    """
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


class Scratch:
    """Reusable buffers for the kernels of one piece of cells (rows x d and rows x k).

    Blocks are visited one after another, and fresh arrays of a few MB per block would each be a
    new mapping and page faults (on dask workers, whose allocator returns freed memory at once).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, rows: int, cols: int) -> np.ndarray:
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols:
            buf = self._buffers[name] = np.empty((max(rows, 1), cols))
        return buf[:rows]


@numba.njit(cache=True, nogil=True)
def normalize_rows_into(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    """:func:`normalize_rows` written into ``out`` (same shape as ``z``), in one pass."""
    n, d = z.shape
    for i in range(n):
        total = 0.0
        for j in range(d):
            total += z[i, j] * z[i, j]
        if total > 0.0:
            inv = 1.0 / math.sqrt(total)
            for j in range(d):
                out[i, j] = z[i, j] * inv
        else:
            for j in range(d):
                out[i, j] = 0.0
    return out


@dataclass
class BlockKernel:
    """The penalty-free half of the soft assignments of some cells.

    ``z_cos`` holds their rows L2-normalized, ``e = exp(a - m)`` with ``a = -dist / sigma =
    (2 / sigma) (cos - 1)`` shifted by its row maxima, and ``shift = sum_i (m_i - 2 / sigma)``.

    Computed once the centroids are known (a product and an exp: the heavy part), it is turned
    into ``R`` by :meth:`weigh` once the diversity penalty is known (a light pass), so the heavy
    part of a block can run while the penalty of the block before is still being reduced.
    """

    z_cos: np.ndarray
    e: np.ndarray
    shift: float

    @staticmethod
    def compute(z_corr: np.ndarray, y: np.ndarray, sigma: float, scratch: Scratch | None = None) -> BlockKernel:
        """The kernel of the rows of ``z_corr`` (in ``scratch``'s buffers if given: valid until its next use)."""
        scratch = scratch or Scratch()
        scale = 2.0 / sigma
        z_cos = normalize_rows_into(z_corr, scratch.get("z_cos", len(z_corr), z_corr.shape[1]))
        e = np.matmul(z_cos, y, out=scratch.get("e", len(z_corr), y.shape[1]))
        shift = _shift_rows(e, scale) - len(e) * scale
        np.exp(e, out=e)  # NumPy's vectorized exp
        return BlockKernel(z_cos, e, shift)

    def weigh(self, weights: np.ndarray, codes: np.ndarray, pattern_sums: np.ndarray) -> float:
        """Turn ``e`` into ``R ~ e * weights[pattern]`` (rows sum to one) in place, adding ``R`` into ``pattern_sums``.

        Returns ``sum_i (m_i + log Z_i)`` of ``a``, the cells' part of the objective's entropy term.
        """
        return _weigh_and_normalize(self.e, weights, codes, pattern_sums) + self.shift

    def centroid_sums(self) -> np.ndarray:
        """``Z_cos^T R`` (d x k), after :meth:`weigh`."""
        return self.z_cos.T @ self.e


def assign(
    z_corr: np.ndarray,
    y: np.ndarray,
    sigma: float,
    weights: np.ndarray,
    codes: np.ndarray,
    pattern_sums: np.ndarray,
    scratch: Scratch | None = None,
) -> tuple[BlockKernel, float]:
    """Soft assignments ``R ~ exp(-dist / sigma) * weights[pattern]`` of the rows of ``z_corr``.

    ``R`` is left in the returned kernel's ``e`` and added per pattern into ``pattern_sums``; the
    entropy part is returned beside the kernel.
    """
    kernel = BlockKernel.compute(z_corr, y, sigma, scratch)
    return kernel, kernel.weigh(weights, codes, pattern_sums)


# ----------------------------------------------------------------------------------------------
# diversity penalty and objective (harmony 0.1, and harmony 2's stabilized form)
# ----------------------------------------------------------------------------------------------


def _observed_expected(s: np.ndarray, patterns: np.ndarray, pr_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``O = S^T Phi`` and ``E = N_k Pr_b^T`` (k x B) from the pattern sums ``S`` (p x k)."""
    return s.T @ patterns[:, 1:], np.outer(s.sum(axis=0), pr_b)


def pattern_penalty(
    s: np.ndarray, patterns: np.ndarray, pr_b: np.ndarray, theta: np.ndarray, stabilized: bool = False
) -> np.ndarray:
    """Diversity penalty of each design pattern (p x k) from the pattern sums ``S`` (p x k).

    Per cluster and batch, harmony 0.1's ``((E + 1) / (O + 1)) ** theta``, or with ``stabilized``
    harmony 2's ``((2 E + 1) / (O + E + 1)) ** theta`` (bounded by ``2 ** theta`` however few cells a
    batch has in a cluster); summed over the batches of a pattern (one batch per variable), as the
    product with ``Phi`` does.
    """
    phi = patterns[:, 1:]
    if phi.shape[1] == 0:  # no batch variable: plain soft k-means
        return np.ones_like(s)
    o, e = _observed_expected(s, patterns, pr_b)
    ratio = (2.0 * e + 1.0) / (o + e + 1.0) if stabilized else (e + 1.0) / (o + 1.0)
    return phi @ (ratio ** theta[None, :]).T


def cross_entropy(
    s: np.ndarray, patterns: np.ndarray, pr_b: np.ndarray, theta: np.ndarray, sigma: float, stabilized: bool = False
) -> float:
    """Diversity term of the objective, ``sigma sum_kb theta_b O_kb log(ratio_kb)``.

    Harmony 0.1's ``ratio = (O + 1) / (E + 1)``, or with ``stabilized`` harmony 2's
    ``(O + E + 1) / (2 E + 1)``.
    """
    o, e = _observed_expected(s, patterns, pr_b)
    ratio = (o + e + 1.0) / (2.0 * e + 1.0) if stabilized else (o + 1.0) / (e + 1.0)
    return float(sigma * (theta[None, :] * np.log(ratio) * o).sum())


@dataclass(frozen=True)
class PenaltyTerms:
    """What the penalty of a pattern depends on besides ``S``.

    The design patterns, the batch proportions ``Pr_b``, the per-batch ``theta``, and the form
    (harmony 2's ``stabilized``).
    """

    patterns: np.ndarray
    pr_b: np.ndarray
    theta: np.ndarray
    stabilized: bool = False

    def penalty(self, s: np.ndarray) -> np.ndarray:
        return pattern_penalty(s, self.patterns, self.pr_b, self.theta, self.stabilized)

    def cross_entropy(self, s: np.ndarray, sigma: float) -> float:
        return cross_entropy(s, self.patterns, self.pr_b, self.theta, sigma, self.stabilized)


@dataclass
class Ledger:
    """The bookkeeping of one clustering iteration, carried from block to block.

    ``old`` and ``new`` hold ``S`` per block (n_blocks x p x k) before and after this iteration's
    updates; ``s`` is the current total with the current block's cells taken out, and ``penalty``
    the diversity penalty from it; ``penalties`` is the penalty each block saw (from which a block's
    assignments can be recomputed) and ``logw`` the objective's ``sum R log w`` so far.
    """

    old: np.ndarray
    new: np.ndarray
    penalties: np.ndarray
    s: np.ndarray
    penalty: np.ndarray
    logw: float = 0.0

    @staticmethod
    def start(block_s: np.ndarray, first: int, terms: PenaltyTerms) -> Ledger:
        s = block_s.sum(axis=0) - block_s[first]
        penalty = terms.penalty(s)
        penalties = np.empty_like(block_s)
        penalties[first] = penalty
        return Ledger(block_s, block_s.copy(), penalties, s, penalty)

    def advance(self, current: int, done: np.ndarray, following: int | None, terms: PenaltyTerms) -> None:
        """Put block ``current``'s cells back with their new sums ``done`` and take block ``following``'s out."""
        self.new[current] = done
        self.s = self.s + done
        self.logw += float((done * np.log(self.penalty)).sum())
        if following is not None:
            self.s = self.s - self.old[following]
            self.penalty = terms.penalty(self.s)
            self.penalties[following] = self.penalty
