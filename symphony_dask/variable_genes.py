"""Variable genes by the variance-stabilizing transformation (VST), as Symphony's ``vargenes_vst``.

For each group of cells (e.g. each donor), on log-normalized values:

1. per-gene mean and unbiased variance (from :class:`~symphony_dask.preprocess.GroupMoments`);
2. a loess fit (span 0.3, degree 2) of log10(variance) on log10(mean) over genes with
   variance > 0; expected variance = 10 ** fitted;
3. standardized variance = sum over the group's cells of ``min(z, sqrt(N))**2 / (n_group - 1)``
   with ``z = (x - mean) / sqrt(expected)`` and ``N`` the number of cells of the whole data
   (a second pass over the matrix, one tree-reduced statistic);
4. the top ``n_top`` genes of each group by standardized variance (stable order: ties, compared
   to 12 significant digits, go to the first gene), pooled as a union in group order.

Genes with zero variance in a group are never ranked in that group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from skmisc.loess import loess

from .preprocess import Block, GroupMoments, log_normalize, rows_by_group

#: Loess span of the mean-variance fit (Seurat's and Symphony's default).
LOESS_SPAN = 0.3
#: Significant digits of the standardized variance used for ranking (round-off is ~1e-15).
RANK_DIGITS = 12


def expected_variance(mean: np.ndarray, variance: np.ndarray, span: float = LOESS_SPAN) -> np.ndarray:
    """Loess fit of log10(variance) on log10(mean) over genes with variance > 0; 0 elsewhere."""
    expected = np.zeros_like(mean)
    varying = variance > 0
    if varying.sum() < 3:
        raise ValueError(
            f"only {int(varying.sum())} gene(s) vary within a group of cells; "
            "the mean-variance fit of variable-gene selection needs more (is the group too small?)"
        )
    fit = loess(np.log10(mean[varying]), np.log10(variance[varying]), span=span, degree=2)
    fit.fit()
    expected[varying] = 10.0 ** fit.outputs.fitted_values
    return expected


@dataclass
class ClippedSquares:
    """Per-group sums over nonzero values of the clipped squared z-scores, and nonzero counts."""

    groups: dict[int, tuple[np.ndarray, np.ndarray]]

    def merge(self, other: ClippedSquares) -> ClippedSquares:
        out = dict(self.groups)
        for code, (s, nz) in other.groups.items():
            if code in out:
                s0, nz0 = out[code]
                out[code] = (s0 + s, nz0 + nz)
            else:
                out[code] = (s, nz)
        return ClippedSquares(out)


def clipped_squares(
    block: Block, codes: np.ndarray, *, mean: dict[int, np.ndarray], sd: dict[int, np.ndarray], clip: float,
    normalize: bool,
) -> ClippedSquares:
    """Kernel: per group, sum of ``min(clip, (x - mean) / sd)**2`` over stored values and their count.

    Genes with ``sd == 0`` contribute nothing. Zeros of a sparse block are accounted for after the
    reduction, from the counts, exactly as the original does.
    """
    values = log_normalize(block) if normalize else block
    out = {}
    for code, rows in rows_by_group(codes).items():
        m, s = mean[code], sd[code]
        inv = np.zeros_like(s)
        np.divide(1.0, s, out=inv, where=s > 0)
        sub = values[rows]
        g = sub.shape[1]
        if sp.issparse(sub):
            sub = sp.csr_matrix(sub)
            z = np.minimum((sub.data - m[sub.indices]) * inv[sub.indices], clip)
            out[code] = (
                np.bincount(sub.indices, weights=z * z, minlength=g),
                np.bincount(sub.indices, minlength=g).astype(np.int64),
            )
        else:
            z = np.minimum((np.asarray(sub, dtype=np.float64) - m) * inv, clip)
            out[code] = (np.einsum("ij,ij->j", z, z), np.full(g, sub.shape[0], dtype=np.int64))
    return ClippedSquares(out)


def vst_table(
    moments: GroupMoments, squares: ClippedSquares, expected: dict[int, np.ndarray], group_names: list[str],
    genes: pd.Index,
) -> pd.DataFrame:
    """Per-group VST table (group, symbol, rank, mean, variance, expected and standardized variance)."""
    tables = []
    for code, name in enumerate(group_names):
        m = moments.groups[code]
        s, nnz = squares.groups[code]
        exp_var = expected[code]
        sd = np.sqrt(exp_var)
        ratio = np.zeros_like(sd)
        np.divide(m.mean, sd, out=ratio, where=sd > 0)
        std_var = np.zeros_like(sd)
        if m.n > 1:
            std_var = (s + (m.n - nnz) * ratio * ratio) / (m.n - 1)
        std_var[sd == 0] = 0.0
        t = pd.DataFrame(
            {
                "group": name,
                "symbol": genes,
                "mean": m.mean,
                "variance": m.variance,
                "variance_expected": exp_var,
                "variance_standardized": std_var,
            }
        )
        t = t.iloc[np.argsort(-_tie_key(std_var), kind="stable")].reset_index(drop=True)
        t.insert(2, "rank", np.arange(1, len(t) + 1))
        tables.append(t)
    return pd.concat(tables, ignore_index=True)


def _tie_key(x: np.ndarray, digits: int = RANK_DIGITS) -> np.ndarray:
    """``x`` rounded to ``digits`` significant digits, so that genes whose values are equal in exact
    arithmetic (e.g. identical expression) tie exactly whatever the summation order, and the stable
    sort then ranks them in gene order as R does."""
    exponent = np.zeros_like(x)
    np.floor(np.log10(np.abs(x), out=exponent, where=x != 0), out=exponent)
    scale = 10.0**exponent
    return np.round(x / scale, digits - 1) * scale


def select_top(table: pd.DataFrame, n_top: int | None) -> list[str]:
    """Union over groups (in group order) of each group's top ``n_top`` varying genes by rank."""
    chosen: dict[str, None] = {}
    for _, t in table.groupby("group", sort=False):
        varying = t[t["variance"] > 0]
        top = varying if n_top is None else varying.iloc[:n_top]
        chosen.update(dict.fromkeys(top["symbol"]))
    return list(chosen)
