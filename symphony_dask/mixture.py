"""The mixture-of-experts ridge correction shared by Harmony and Symphony mapping.

Each cluster k has a linear model of the embedding on the batch design with intercept, fitted by
ridge regression weighted by the soft assignments ``R_k`` (paper, Eqs. 1-2):

    W_k = (X diag(R_k) X^T + Lambda)^-1 X diag(R_k) Z^T,    Lambda = diag(0, lambda, ..., lambda)

and each cell is corrected by ``z_i - sum_k R_ik W_k[1:]^T x_i[1:]`` (the intercept stays).

Cells are grouped by their *design pattern* (their row of the design with intercept), so the
sufficient statistics are, per pattern, ``sum R`` (p x k) and ``sum R z`` (p x k x d): small, and
tree-reducible over chunks of cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Design:
    """Batch design of cells, stored as one pattern code per cell.

    ``patterns`` (p x (1 + B)) holds each distinct row of the design with its intercept; ``codes``
    (n,) says which pattern each cell has; ``levels`` names the B one-hot columns.
    """

    patterns: np.ndarray
    codes: np.ndarray
    levels: list[tuple[str, str]]

    def level_counts(self) -> np.ndarray:
        """Number of cells in each of the B batch levels."""
        return np.bincount(self.codes, minlength=len(self.patterns)) @ self.patterns[:, 1:]


def make_design(meta: pd.DataFrame, keys: Sequence[str]) -> Design:
    """Intercept plus a full one-hot block per key (levels sorted as R sorts a character column).

    A key with one level gives a single column of ones, as in Symphony's query design.
    """
    n = len(meta)
    level_codes, levels = [], []
    combined = np.zeros(n, dtype=np.int64)
    for key in keys:
        uniq, inv = np.unique(meta[key].astype(str).to_numpy(), return_inverse=True)
        level_codes.append((len(levels), inv.ravel()))
        levels += [(key, str(u)) for u in uniq]
        combined = combined * len(uniq) + inv.ravel()
    _, first, codes = np.unique(combined, return_index=True, return_inverse=True)
    patterns = np.zeros((len(first), 1 + len(levels)))
    patterns[:, 0] = 1.0
    for offset, inv in level_codes:
        patterns[np.arange(len(first)), 1 + offset + inv[first]] = 1.0
    return Design(patterns, codes.ravel(), levels)


def pattern_runs(codes: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs ``(pattern, start, stop)`` of equal consecutive codes."""
    codes = np.asarray(codes)
    if len(codes) == 0:
        return []
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    stops = np.r_[starts[1:], len(codes)]
    return [(int(codes[a]), int(a), int(b)) for a, b in zip(starts, stops)]


#: Below this mean run length, cells are grouped by pattern with a sort rather than visited run by run.
_MIN_MEAN_RUN = 64


def _grouped(codes: np.ndarray) -> tuple[np.ndarray | None, list[tuple[int, int, int]]]:
    """Runs of patterns, after a stable sort by pattern if the cells are too interleaved."""
    runs = pattern_runs(codes)
    if len(runs) * _MIN_MEAN_RUN <= len(codes):
        return None, runs
    order = np.argsort(codes, kind="stable")
    return order, pattern_runs(np.asarray(codes)[order])


def ridge_statistics(z: np.ndarray, r: np.ndarray, codes: np.ndarray, n_patterns: int) -> tuple[np.ndarray, np.ndarray]:
    """Kernel: per design pattern, ``sum R`` (p x k) and ``sum R z`` (p x k x d); tree-reducible."""
    k, d = r.shape[1], z.shape[1]
    s = np.zeros((n_patterns, k))
    t = np.zeros((n_patterns, k, d))
    order, runs = _grouped(codes)
    if order is not None:
        z, r = z[order], r[order]
    for p, a, b in runs:
        s[p] += r[a:b].sum(axis=0)
        t[p] += r[a:b].T @ z[a:b]
    return s, t


def ridge_system(s: np.ndarray, t: np.ndarray, patterns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster ``A_k = X diag(R_k) X^T`` ((1+B) x (1+B)) and ``B_k = X diag(R_k) Z^T`` ((1+B) x d)."""
    a = np.einsum("pk,pa,pb->kab", s, patterns, patterns)
    b = np.einsum("pkd,pa->kad", t, patterns)
    return a, b


def solve_batch_terms(a: np.ndarray, b: np.ndarray, penalty: np.ndarray) -> np.ndarray:
    """Ridge coefficients ``W_k = (A_k + diag(penalty))^-1 B_k`` with the intercept row zeroed."""
    w = np.linalg.solve(a + np.diag(penalty)[None, :, :], b)
    w[:, 0, :] = 0.0
    return w


def apply_batch_terms(z: np.ndarray, r: np.ndarray, codes: np.ndarray, per_pattern: np.ndarray) -> np.ndarray:
    """Kernel: ``z_i - R_i M[pattern_i]`` with ``M[p] = x_p^T W`` (p x k x d) given per pattern."""
    out = np.array(z, dtype=np.float64, copy=True)
    order, runs = _grouped(codes)
    if order is None:
        for p, a, b in runs:
            out[a:b] -= r[a:b] @ per_pattern[p]
    else:
        for p, a, b in runs:
            rows = order[a:b]
            out[rows] -= r[rows] @ per_pattern[p]
    return out
