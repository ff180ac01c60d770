"""Numba kernels over the stored values of one CSR chunk: a single pass, no copies, no densifying.

Each walks ``indptr`` / ``indices`` / ``data`` once and releases the GIL, so dask's threads run them
in parallel. Sums are accumulated in float64 whatever the stored dtype.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp


def as_csr(block: sp.spmatrix | sp.sparray) -> sp.csr_matrix | sp.csr_array:
    """The block in CSR form, as it is when it already is one (``sp.csr_matrix(block)`` would copy
    values that are views of a larger matrix)."""
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
    """Counts of NaN, infinite, negative (``-inf`` included) and finite non-integer values, and of
    rows whose values sum to zero, in one pass (a dense matrix is one row per cell with ``indptr``
    at multiples of its width)."""
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
def project_rows(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, position: np.ndarray,
                 mean: np.ndarray, std: np.ndarray, loadings: np.ndarray, clip: float,
                 scale_factor: float, gene_factors: np.ndarray) -> np.ndarray:
    """``clip((x - mean) / std, -clip, clip) @ loadings`` of the chosen genes of each row.

    ``position[c]`` is the row of ``mean``/``std``/``loadings`` of column ``c`` (-1: not chosen).
    With ``scale_factor > 0`` a value ``x`` of gene ``g`` is first
    ``log1p(x / total * scale_factor * gene_factors[g])`` (ones: log CP10K; the IDF: TF-IDF), with
    ``total`` the row's sum over all columns. An unstored zero of gene ``g`` scales to
    ``zero_g = clip(-mean_g / std_g)``, so a row is ``sum_g zero_g u_g`` plus, for each stored value,
    ``(scaled - zero_g) u_g``.
    """
    n_rows = len(indptr) - 1
    n_genes, d = loadings.shape
    zero = np.empty(n_genes)
    base = np.zeros(d)
    for g in range(n_genes):
        zero[g] = min(max(-mean[g] / std[g], -clip), clip)
        for c in range(d):
            base[c] += zero[g] * loadings[g, c]
    out = np.empty((n_rows, d))
    for i in range(n_rows):
        start, end = indptr[i], indptr[i + 1]
        factor = 0.0
        if scale_factor > 0.0:
            total = 0.0
            for j in range(start, end):
                total += data[j]
            if total > 0.0:
                factor = (1.0 / total) * scale_factor
        for c in range(d):
            out[i, c] = base[c]
        for j in range(start, end):
            g = position[indices[j]]
            if g < 0:
                continue
            x = np.float64(data[j])
            if scale_factor > 0.0:
                x = np.log1p(x * factor * gene_factors[g])
            weight = min(max((x - mean[g]) / std[g], -clip), clip) - zero[g]
            if weight != 0.0:
                for c in range(d):
                    out[i, c] += weight * loadings[g, c]
    return out
