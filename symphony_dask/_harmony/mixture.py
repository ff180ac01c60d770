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

    def variables(self) -> np.ndarray:
        """The batch variable (0, 1, ... in key order) of each of the B levels."""
        keys = list(dict.fromkeys(key for key, _ in self.levels))
        return np.array([keys.index(key) for key, _ in self.levels], dtype=np.int64)

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
    return [(int(codes[a]), int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


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
    add_weighted_sums(t, z, r, runs)
    return s, t


def add_weighted_sums(t: np.ndarray, z: np.ndarray, r: np.ndarray, runs: list[tuple[int, int, int]]) -> None:
    """Kernel: ``t[p] += R^T z`` over each run ``(p, start, stop)`` of cells of pattern ``p``."""
    for p, a, b in runs:
        t[p] += r[a:b].T @ z[a:b]


def subtract_batch_terms(
    z: np.ndarray, r: np.ndarray, per_pattern: np.ndarray, runs: list[tuple[int, int, int]]
) -> None:
    """Kernel: in place ``z_i -= R_i M[p]`` over each run ``(p, start, stop)`` of cells of pattern ``p``."""
    for p, a, b in runs:
        z[a:b] -= r[a:b] @ per_pattern[p]


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


def expected_cells(s: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """``E = N_k Pr_b^T`` (k x B): the cells of batch b expected in cluster k.

    From the pattern sums ``s`` (p x k) of soft assignments whose rows sum to one (so that ``s``
    also counts the cells).
    """
    n_b = s.sum(axis=1) @ patterns[:, 1:]  # each batch variable's levels hold all the cells
    return np.outer(s.sum(axis=0), n_b / s.sum())


def solve_harmony2_terms(
    s: np.ndarray,
    t: np.ndarray,
    patterns: np.ndarray,
    variables: np.ndarray,
    *,
    alpha: float,
    cutoff: float,
    penalty: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Harmony 2's ridge coefficients from the pattern sums ``s`` (p x k) and ``t`` (p x k x d).

    Per cluster k, a batch takes part only if its share of the cluster, ``O_kb / N_b``, is above
    ``cutoff`` and at least one other level of its variable's does too; cells with no such batch
    are left out of the fit (and so not corrected by that cluster), a cluster without any is not
    corrected at all. The penalty of batch b is ``alpha E_kb`` (:func:`expected_cells`), or
    ``penalty[1:]`` when given (``penalty[0]`` is the intercept's).

    Returns
    -------
    w
        Coefficients (k x (1 + B) x d), the intercept row and the batches left out zero.
    intercepts
        The fitted intercepts (k x d), from which harmony 2 takes its next centroids.
    fitted
        Whether each cluster was corrected (k,).
    """
    phi = patterns[:, 1:]
    n_b = s.sum(axis=1) @ phi
    o = s.T @ phi
    e = expected_cells(s, patterns)
    share = np.divide(o, n_b[None, :], out=np.zeros_like(o), where=n_b[None, :] > 0)
    above = share > cutoff
    k, d = s.shape[1], t.shape[2]
    w = np.zeros((k, patterns.shape[1], d))
    intercepts = np.zeros((k, d))
    fitted = np.zeros(k, dtype=bool)
    for c in range(k):
        kept = np.zeros(phi.shape[1], dtype=bool)
        for v in np.unique(variables):
            levels = (variables == v) & above[c]
            if levels.sum() > 1:
                kept |= levels
        if not kept.any():
            continue
        columns = np.r_[0, 1 + np.flatnonzero(kept)]
        rows = phi[:, kept].any(axis=1)
        x = patterns[np.ix_(rows, columns)]
        lam = np.r_[0.0, alpha * e[c, kept]] if penalty is None else penalty[columns]
        a = np.einsum("p,pa,pb->ab", s[rows, c], x, x) + np.diag(lam)
        coef = np.linalg.solve(a, np.einsum("pd,pa->ad", t[rows, c], x))
        intercepts[c], fitted[c] = coef[0], True
        w[c, columns[1:]] = coef[1:]
    return w, intercepts, fitted


def apply_batch_terms(z: np.ndarray, r: np.ndarray, codes: np.ndarray, per_pattern: np.ndarray) -> np.ndarray:
    """Kernel: ``z_i - R_i M[pattern_i]`` with ``M[p] = x_p^T W`` (p x k x d) given per pattern."""
    order, runs = _grouped(codes)
    if order is None:
        out = np.array(z, dtype=np.float64, copy=True)
        subtract_batch_terms(out, r, per_pattern, runs)
        return out
    grouped = np.asarray(z, dtype=np.float64)[order]
    subtract_batch_terms(grouped, r[order], per_pattern, runs)
    out = np.empty_like(grouped)
    out[order] = grouped
    return out
