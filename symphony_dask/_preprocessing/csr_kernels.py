"""Numba kernels over the stored values of one CSR chunk: a single pass, no copies, no densifying.

Each walks ``indptr`` / ``indices`` / ``data`` once and releases the GIL, so dask's threads run them
in parallel. Sums are accumulated in float64 whatever the stored dtype.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp


def as_csr(block: sp.spmatrix | sp.sparray) -> sp.csr_matrix | sp.csr_array:
    """The block in CSR form, as it is when it already is one.

    ``sp.csr_matrix(block)`` would copy values that are views of a larger matrix.
    """
    return block if block.format == "csr" else sp.csr_matrix(block)


@numba.njit(cache=True, nogil=True)
def row_totals(indptr: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Sum of the stored values of each row (float64)."""
    n = len(indptr) - 1
    out = np.zeros(n)
    for i in range(n):
        total = 0.0
        for j in range(indptr[i], indptr[i + 1]):
            total += data[j]
        out[i] = total
    return out


@numba.njit(cache=True, nogil=True)
def value_counts(indptr: np.ndarray, data: np.ndarray) -> tuple[int, int, int, int, int]:
    """Counts of NaN, infinite, negative and finite non-integer values, and of empty rows, in one pass.

    Negative values include ``-inf``; an empty row is one whose values sum to zero. A dense matrix is one
    row per cell with ``indptr`` at multiples of its width.
    """
    n_nan = n_inf = n_negative = n_fraction = n_empty = 0
    for i in range(len(indptr) - 1):
        total = 0.0
        for j in range(indptr[i], indptr[i + 1]):
            v = data[j]
            total += v
            if v != v:
                n_nan += 1
                continue
            if v < 0:
                n_negative += 1
            if np.isinf(v):
                n_inf += 1
            elif v != np.floor(v):
                n_fraction += 1
        if total == 0.0:
            n_empty += 1
    return n_nan, n_inf, n_negative, n_fraction, n_empty


@numba.njit(cache=True, nogil=True)
def _stored_value(x, factor: float, gene_factor: float, transform: bool) -> float:
    """A stored value as the moments see it: ``log1p(x * factor * gene_factor)`` when ``transform``.

    That is log-normalization, the same operations in the same order as
    :func:`~symphony_dask._preprocessing.normalize.log_normalize`; without ``transform``, ``x`` in float64.
    """
    v = np.float64(x)
    if transform:
        v = np.log1p(v * factor * gene_factor)
    return v


@numba.njit(cache=True, nogil=True)
def group_moment_sums(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    group: np.ndarray,
    n_groups: int,
    n_genes: int,
    row_factors: np.ndarray,
    gene_factors: np.ndarray,
    transform: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per group: its number of rows, and per gene the mean, sum of squared deviations, largest value and stored values.

    ``group[i]`` (in ``0..n_groups-1``) is the group of row ``i``. Zeros are included. Two passes over the
    stored values sum them as ``bincount`` does: row by row in order.

    Values are transformed on the fly (:func:`_stored_value`, ``row_factors`` one per row) and kept
    for the second pass in one float64 array: the chunk itself is never copied.
    """
    sizes = np.zeros(n_groups, dtype=np.int64)
    sums = np.zeros((n_groups, n_genes))
    stored = np.zeros((n_groups, n_genes), dtype=np.int64)
    largest = np.full((n_groups, n_genes), -np.inf)
    values = np.empty(indptr[-1] - indptr[0])  # the transformed values, for the second pass
    for i in range(len(indptr) - 1):
        c = group[i]
        sizes[c] += 1
        for j in range(indptr[i], indptr[i + 1]):
            g = indices[j]
            v = _stored_value(data[j], row_factors[i], gene_factors[g], transform)
            values[j - indptr[0]] = v
            sums[c, g] += v
            stored[c, g] += 1
            largest[c, g] = max(largest[c, g], v)
    mean = np.zeros((n_groups, n_genes))
    for c in range(n_groups):
        if sizes[c] > 0:
            for g in range(n_genes):
                mean[c, g] = sums[c, g] / sizes[c]
    m2 = np.zeros((n_groups, n_genes))
    for i in range(len(indptr) - 1):
        c = group[i]
        for j in range(indptr[i], indptr[i + 1]):
            g = indices[j]
            dev = values[j - indptr[0]] - mean[c, g]
            m2[c, g] += dev * dev
    for c in range(n_groups):
        for g in range(n_genes):
            m2[c, g] += (sizes[c] - stored[c, g]) * mean[c, g] * mean[c, g]
            if stored[c, g] < sizes[c]:  # an unstored zero
                largest[c, g] = max(largest[c, g], 0.0)
    return sizes, mean, m2, largest, stored


@numba.njit(cache=True, nogil=True)
def group_clipped_squares(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    group: np.ndarray,
    mean: np.ndarray,
    inverse_sd: np.ndarray,
    clip: float,
    row_factors: np.ndarray,
    gene_factors: np.ndarray,
    transform: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Per group and gene: the sum of ``min(clip, (v - mean) * inverse_sd)**2`` over stored values, and their number.

    ``mean`` and ``inverse_sd`` are groups x genes; ``v`` is a stored value as in :func:`group_moment_sums`.
    """
    n_groups, n_genes = mean.shape
    squares = np.zeros((n_groups, n_genes))
    stored = np.zeros((n_groups, n_genes), dtype=np.int64)
    for i in range(len(indptr) - 1):
        c = group[i]
        for j in range(indptr[i], indptr[i + 1]):
            g = indices[j]
            v = _stored_value(data[j], row_factors[i], gene_factors[g], transform)
            z = min((v - mean[c, g]) * inverse_sd[c, g], clip)
            squares[c, g] += z * z
            stored[c, g] += 1
    return squares, stored


@numba.njit(cache=True, nogil=True)
def scaled_rows(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    position: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    clip: float,
    row_factors: np.ndarray,
    gene_factors: np.ndarray,
    transform: bool,
) -> np.ndarray:
    """Dense ``clip((v - mean) / std, -clip, clip)`` of the chosen genes of each row (rows x chosen).

    ``position[c]`` is the chosen gene of column ``c`` (-1: not chosen); ``v`` is a stored value
    normalized as in :func:`group_moment_sums` (``gene_factors`` per column of the block). Every
    entry starts as the scaled zero of its gene and stored values overwrite theirs: the only array
    made is the output.
    """
    n_rows = len(indptr) - 1
    n_genes = len(mean)
    zero = np.empty(n_genes)
    for g in range(n_genes):
        zero[g] = min(max((0.0 - mean[g]) / std[g], -clip), clip)
    out = np.empty((n_rows, n_genes))
    for i in range(n_rows):
        out[i, :] = zero
        for j in range(indptr[i], indptr[i + 1]):
            g = position[indices[j]]
            if g >= 0:
                v = _stored_value(data[j], row_factors[i], gene_factors[indices[j]], transform)
                out[i, g] = min(max((v - mean[g]) / std[g], -clip), clip)
    return out


@numba.njit(cache=True, nogil=True)
def scaled_zeros(mean: np.ndarray, std: np.ndarray, clip: float) -> np.ndarray:
    """Each chosen gene's scaled zero, ``clip(-mean / std, -clip, clip)``: the value of an unstored entry."""
    zero = np.empty(len(mean))
    for g in range(len(mean)):
        zero[g] = min(max(-mean[g] / std[g], -clip), clip)
    return zero


@numba.njit(cache=True, nogil=True)
def _row_weights(
    start: int,
    end: int,
    indices: np.ndarray,
    data: np.ndarray,
    row_factor: float,
    gene_factors: np.ndarray,
    transform: bool,
    mean: np.ndarray,
    std: np.ndarray,
    zero: np.ndarray,
    clip: float,
    weights: np.ndarray,
) -> None:
    """Each stored value of a row as what it adds to the row's scaled zeros: ``scaled - zero`` of its gene."""
    for j in range(start, end):
        g = indices[j]
        v = _stored_value(data[j], row_factor, gene_factors[g], transform)
        weights[j - start] = min(max((v - mean[g]) / std[g], -clip), clip) - zero[g]


@numba.njit(cache=True, nogil=True)
def cached_product(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    row_factors: np.ndarray,
    gene_factors: np.ndarray,
    transform: bool,
    mean: np.ndarray,
    std: np.ndarray,
    clip: float,
    w: np.ndarray,
    gram: bool,
) -> np.ndarray:
    """``S W`` (rows x l), or ``S^T (S W)`` (genes x l) with ``gram``, for ``S`` the scaled genes of a CSR chunk.

    ``S = clip((v - mean) / std)`` of every gene of the chunk (its columns are the chosen genes), ``v`` a
    stored value normalized on the fly (:func:`_stored_value`: ``row_factors``, ``gene_factors``). ``S`` is
    never formed: row ``i`` of ``S`` is the genes' scaled zeros plus, at its stored values, their difference
    from them, so ``S_i W = zero^T W + sum_j weight_j W[g_j]`` and ``S^T S W = zero (sum_i S_i W)^T + sum_i
    sum_j weight_j e_{g_j} (S_i W)``: two walks over a row's stored values, each of ``l`` multiply-adds per value.
    """
    n_rows = len(indptr) - 1
    n_genes, width = w.shape
    zero = scaled_zeros(mean, std, clip)
    base = np.zeros(width)
    for g in range(n_genes):
        if zero[g] != 0.0:
            for c in range(width):
                base[c] += zero[g] * w[g, c]
    longest = 0
    for i in range(n_rows):
        longest = max(longest, indptr[i + 1] - indptr[i])
    weights = np.empty(longest)
    row = np.empty(width)
    rows = np.empty((0 if gram else n_rows, width))
    out = np.zeros((n_genes if gram else 0, width))
    row_sum = np.zeros(width)
    for i in range(n_rows):
        start, end = indptr[i], indptr[i + 1]
        _row_weights(start, end, indices, data, row_factors[i], gene_factors, transform, mean, std, zero, clip, weights)
        for c in range(width):
            row[c] = base[c]
        for j in range(start, end):
            weight = weights[j - start]
            if weight != 0.0:
                g = indices[j]
                for c in range(width):
                    row[c] += weight * w[g, c]
        if not gram:
            for c in range(width):
                rows[i, c] = row[c]
            continue
        for c in range(width):
            row_sum[c] += row[c]
        for j in range(start, end):
            weight = weights[j - start]
            if weight != 0.0:
                g = indices[j]
                for c in range(width):
                    out[g, c] += weight * row[c]
    if not gram:
        return rows
    for g in range(n_genes):
        if zero[g] != 0.0:
            for c in range(width):
                out[g, c] += zero[g] * row_sum[c]
    return out
