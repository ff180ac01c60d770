"""Variable genes by the variance-stabilizing transformation (VST), as Symphony's ``vargenes_vst``.

For each group of cells (e.g. each donor), on log-normalized values:

1. per-gene mean and unbiased variance (from :class:`~symphony_dask._preprocessing.normalize.GroupMoments`);
2. a loess fit (span 0.3, degree 2) of log10(variance) on log10(mean) over genes with
   variance > 0; expected variance = 10 ** fitted;
3. standardized variance = sum over the group's cells of ``min(z, sqrt(N))**2 / (n_group - 1)``
   with ``z = (x - mean) / sqrt(expected)`` and ``N`` the number of cells of the whole data: a
   second pass over the matrix (one tree-reduced statistic) when some gene's largest value reaches
   the clip; otherwise it is ``variance / expected`` (the first pass keeps each gene's largest value);
4. the top ``n_top`` genes of each group by standardized variance (stable order: ties, compared
   to 12 significant digits, go to the first gene), pooled as a union in group order.

Genes with zero variance in a group are never ranked in that group.

Or by mean and dispersion (``"mvp"``, Seurat's mean.var.plot as R Symphony runs it through
singlecellmethods' ``findVariableGenes`` with ``num.bin = 20``): per group, the mean ``m`` and
unbiased variance ``v`` of ``expm1`` of the values (:func:`exp_moments`, one pass); dispersion
``log(v / m)`` (0 where it is 0/0); genes binned by ``log1p(m)`` into 20 equal-width bins (R's
``cut``) and the dispersion z-scored within each bin; genes with ``log1p(m) >= 0.1`` and dispersion
``>= 0`` ranked by the z-score (:func:`mvp_table`); the top ``n_top`` per group pooled as above.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from skmisc.loess import loess

from symphony_dask._preprocessing.csr_kernels import as_csr, group_clipped_squares
from symphony_dask._preprocessing.normalize import (
    Block,
    GroupMoments,
    Moments,
    group_moments,
    log_normalize,
    rows_by_group,
    stored_value_factors,
)

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
    log_mean = np.log10(mean[varying])
    if np.ptp(log_mean) == 0:
        raise ValueError(
            "the mean-variance fit of variable-gene selection needs genes of different mean expression, but the "
            f"{int(varying.sum())} genes with a nonzero variance in a group of cells all have the same mean; "
            "the data look constant"
        )
    fit = loess(log_mean, np.log10(variance[varying]), span=span, degree=2)
    fit.fit()
    expected[varying] = 10.0**fit.outputs.fitted_values
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
    block: Block,
    codes: np.ndarray,
    *,
    mean: dict[int, np.ndarray],
    sd: dict[int, np.ndarray],
    clip: float,
    normalize: bool,
    idf: np.ndarray | None = None,
) -> ClippedSquares:
    """Kernel: per group, sum of ``min(clip, (x - mean) / sd)**2`` over stored values and their count.

    Genes with ``sd == 0`` contribute nothing. Zeros of a sparse block are accounted for after the
    reduction, from the counts, exactly as the original does.
    """
    if sp.issparse(block):
        block = as_csr(block)
        present, group = np.unique(np.asarray(codes), return_inverse=True)
        means = np.stack([mean[int(c)] for c in present])
        inverse = _inverse(np.stack([sd[int(c)] for c in present]))
        row_factors, gene_factors = stored_value_factors(block, normalize=normalize, idf=idf)
        squares, stored = group_clipped_squares(
            block.indptr,
            block.indices,
            block.data,
            group.ravel(),
            means,
            inverse,
            float(clip),
            row_factors,
            gene_factors,
            bool(normalize),
        )
        return ClippedSquares({int(c): (squares[i], stored[i]) for i, c in enumerate(present)})
    values = log_normalize(block, idf=idf) if normalize else block
    out = {}
    for code, rows in rows_by_group(codes).items():
        z = np.minimum((np.asarray(values[rows], dtype=np.float64) - mean[code]) * _inverse(sd[code]), clip)
        out[code] = (np.einsum("ij,ij->j", z, z), np.full(z.shape[1], len(rows), dtype=np.int64))
    return ClippedSquares(out)


def _inverse(sd: np.ndarray) -> np.ndarray:
    """``1 / sd``, 0 where ``sd`` is 0 (such genes contribute nothing)."""
    out = np.zeros_like(sd, dtype=np.float64)
    np.divide(1.0, sd, out=out, where=sd > 0)
    return out


def clip_reached(moments: Moments, sd: np.ndarray, clip: float) -> bool:
    """Whether any value of a group reaches the clip: ``(x - mean) / sd > clip`` for a gene with ``sd > 0``.

    Only a gene's largest value can: zeros are below the mean.
    """
    varying = sd > 0
    return bool(np.any(moments.maximum[varying] - moments.mean[varying] > clip * sd[varying]))


def vst_table(
    moments: GroupMoments,
    squares: ClippedSquares | None,
    expected: dict[int, np.ndarray],
    group_names: list[str],
    genes: pd.Index,
) -> pd.DataFrame:
    """Per-group VST table (group, symbol, rank, mean, variance, expected and standardized variance).

    ``squares``: the clipped squares of a pass (:func:`clipped_squares`), or ``None`` when no value
    reaches the clip (:func:`clip_reached`); the standardized variance is then the variance over
    the expected, ``sum (x - mean)**2 / sd**2 / (n - 1)``, the same sum unclipped.
    """
    tables = []
    for code, name in enumerate(group_names):
        m = moments.groups[code]
        exp_var = expected[code]
        sd = np.sqrt(exp_var)
        std_var = np.zeros_like(sd)
        if m.n > 1 and squares is None:
            np.divide(m.variance, exp_var, out=std_var, where=sd > 0)
        elif m.n > 1:
            s, nnz = squares.groups[code]
            ratio = np.zeros_like(sd)
            np.divide(m.mean, sd, out=ratio, where=sd > 0)
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


def exp_moments(block: Block, codes: np.ndarray, *, normalize: bool, idf: np.ndarray | None = None) -> GroupMoments:
    """Kernel: per group, moments of ``expm1`` of the (normalized) values of one chunk."""
    values = log_normalize(block, idf=idf) if normalize else block
    if sp.issparse(values):
        values = sp.csr_matrix(values, dtype=np.float64, copy=not normalize)
        np.expm1(values.data, out=values.data)
    else:
        values = np.expm1(np.asarray(values, dtype=np.float64))
    return group_moments(values, codes)


#: mean.var.plot's settings in R Symphony: bins of the log mean, and the cut-offs of singlecellmethods.
MVP_BINS = 20
MVP_MIN_MEAN = 0.1
MVP_MIN_DISPERSION = 0.0


def mvp_table(moments: GroupMoments, group_names: list[str], genes: pd.Index) -> pd.DataFrame:
    """Per-group mean.var.plot table of the genes that pass the cut-offs, best first.

    Its columns: group, symbol, rank, mean, variance, dispersion and the dispersion's z-score within
    the mean bin.
    """
    tables = []
    for code, name in enumerate(group_names):
        m = moments.groups[code]
        with np.errstate(divide="ignore", invalid="ignore"):
            dispersion = np.log(m.variance / m.mean)
        dispersion[np.isnan(dispersion)] = 0.0
        log_mean = np.log1p(m.mean)
        scaled = _scaled_within_bins(dispersion, _equal_width_bins(log_mean, MVP_BINS))
        t = pd.DataFrame(
            {
                "group": name,
                "symbol": genes,
                "mean": log_mean,
                "variance": m.variance,
                "dispersion": dispersion,
                "dispersion_scaled": scaled,
            }
        )
        t = t[(log_mean >= MVP_MIN_MEAN) & (dispersion >= MVP_MIN_DISPERSION)]
        # best z-score first (NaN last), ties by dispersion, then gene order (as R's stable sorts)
        key_scaled = np.where(np.isnan(t["dispersion_scaled"]), -np.inf, _tie_key(t["dispersion_scaled"].to_numpy()))
        order = np.lexsort((-_tie_key(t["dispersion"].to_numpy()), -key_scaled))
        t = t.iloc[order].reset_index(drop=True)
        t.insert(2, "rank", np.arange(1, len(t) + 1))
        tables.append(t)
    return pd.concat(tables, ignore_index=True)


def _equal_width_bins(x: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each value among ``n_bins`` equal-width right-closed intervals over its range (R's ``cut``).

    As R's ``cut(x, n_bins)``, the outer limits are moved out by 0.1% of the range.
    """
    low, high = float(x.min()), float(x.max())
    width = high - low
    if width == 0:
        width = abs(low) if low != 0 else 1.0
        breaks = np.linspace(low - width / 1000, high + width / 1000, n_bins + 1)
    else:
        breaks = np.linspace(low, high, n_bins + 1)
        breaks[0], breaks[-1] = low - width / 1000, high + width / 1000
    return np.searchsorted(breaks, x, side="left") - 1


def _scaled_within_bins(x: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """``x`` z-scored within each bin (R's ``scale``: SD with n - 1; NaN for a bin of one gene)."""
    out = np.empty_like(x)
    for b in np.unique(bins):
        members = bins == b
        with np.errstate(invalid="ignore", divide="ignore"):
            centered = x[members] - x[members].mean()
            finite = centered[~np.isnan(centered)]
            sd = np.sqrt((finite**2).sum() / max(1, len(finite) - 1))
            out[members] = centered / sd
    return out


def _tie_key(x: np.ndarray, digits: int = RANK_DIGITS) -> np.ndarray:
    """``x`` rounded to ``digits`` significant digits, so that values equal in exact arithmetic tie exactly.

    Genes whose values are equal in exact arithmetic (e.g. identical expression) then tie whatever the
    summation order, and the stable sort ranks them in gene order as R does.
    """
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
