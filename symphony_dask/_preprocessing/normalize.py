"""Per-chunk kernels of reference preprocessing: log-normalization, gene moments, scaling.

Kernels take one row chunk of cells (a scipy CSR matrix or a dense array, all genes) and return
either transformed values for those cells or small statistics that merge exactly across chunks.

- :func:`log_normalize`: ``log(1 + x / total * 1e4)`` on stored values (log CP10K), or with a
  per-gene ``idf`` ``log(1 + x / total * idf * 1e4)``, the TF-IDF of Signac's ``RunTFIDF`` (method 1)
  for peak x cell matrices, with :func:`inverse_document_frequency` from :func:`column_sums`.
- :class:`Moments` / :func:`group_moments`: count, mean and sum of squared deviations per gene and
  per group of cells, merged with the pairwise update of Chan et al. (1979) so that constant genes
  get a variance of exactly zero and the result does not depend on how cells are chunked.
- :func:`scale`: ``clip((x - mu) / sigma, -10, 10)`` on chosen genes, dense for one chunk only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from symphony_dask._io.validation import ValueCounts, count_bad_values
from symphony_dask._preprocessing.csr_kernels import as_csr, group_moment_sums, row_totals, scaled_rows

#: Library size that counts are scaled to before the log (counts per 10,000).
SCALE_FACTOR = 1e4
#: Scaled values are clipped to [-SCALE_CLIP, SCALE_CLIP] as in Symphony's scaleDataWithStats.
SCALE_CLIP = 10.0

Block = np.ndarray | sp.csr_matrix


def log_normalize(block: Block, scale_factor: float = SCALE_FACTOR, idf: np.ndarray | None = None) -> Block:
    """Kernel: ``log1p(x / cell_total * scale_factor)`` for one chunk of raw counts (log CP10K), or TF-IDF.

    With ``idf`` (one value per column) the values are ``log1p(x / cell_total * idf * scale_factor)``
    (TF-IDF). Cells whose total is zero are left at zero (callers exclude or reject them).
    """
    values = sp.csr_matrix(block, dtype=np.float64, copy=True) if sp.issparse(block) else block
    return _log_scaled(values, cell_totals(block), scale_factor, idf)


def _log_scaled(values: Block, totals: np.ndarray, scale_factor: float, idf: np.ndarray | None = None) -> Block:
    """``log1p(values / total * scale_factor)`` row by row (times ``idf`` per column when given).

    A sparse ``values`` must be a matrix of the caller's own (float64 CSR): it is changed in place.
    """
    factor = _safe_inverse(totals) * scale_factor
    if sp.issparse(values):
        values.data *= np.repeat(factor, np.diff(values.indptr))
        if idf is not None:
            values.data *= idf[values.indices]
        np.log1p(values.data, out=values.data)
        return values
    scaled = np.asarray(values, dtype=np.float64) * factor[:, None]
    if idf is not None:
        scaled *= idf[None, :]
    return np.log1p(scaled)


@dataclass
class ColumnSums:
    """Number of cells and per-column totals of a set of cells."""

    n: int
    sums: np.ndarray

    def merge(self, other: ColumnSums) -> ColumnSums:
        return ColumnSums(self.n + other.n, self.sums + other.sums)


def column_sums(block: Block) -> ColumnSums:
    """Kernel: the cells of one chunk and the total of each column over them."""
    return ColumnSums(block.shape[0], np.asarray(block.sum(axis=0), dtype=np.float64).ravel())


def inverse_document_frequency(totals: ColumnSums) -> np.ndarray:
    """Signac's IDF, ``n_cells / column total`` (0 for a column that is never nonzero)."""
    return totals.n * _safe_inverse(totals.sums)


def _safe_inverse(totals: np.ndarray) -> np.ndarray:
    out = np.zeros_like(totals, dtype=np.float64)
    np.divide(1.0, totals, out=out, where=totals > 0)
    return out


def cell_totals(block: Block) -> np.ndarray:
    """Kernel: total of each cell (row) of a chunk, accumulated in float64."""
    if sp.issparse(block):
        block = as_csr(block)
        return row_totals(block.indptr, block.data)
    return np.asarray(block).sum(axis=1, dtype=np.float64)


@dataclass
class Moments:
    """Count ``n``, per-gene ``mean``, sum of squared deviations ``m2`` and largest value ``maximum`` of cells.

    The moments are of a set of cells; ``maximum`` is -inf for no cells. ``nonzero`` counts each gene's
    nonzero values (a sparse chunk's stored values): what a cache of chosen genes holds.
    """

    n: int
    mean: np.ndarray
    m2: np.ndarray
    maximum: np.ndarray
    nonzero: np.ndarray

    def merge(self, other: Moments) -> Moments:
        """Exact pairwise combination (Chan, Golub and LeVeque 1979)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.n * other.n / n)
        return Moments(n, mean, m2, np.maximum(self.maximum, other.maximum), self.nonzero + other.nonzero)

    @property
    def variance(self) -> np.ndarray:
        """Unbiased (n - 1) variance, as R's ``var``."""
        if self.n < 2:
            return np.zeros_like(self.mean)
        return self.m2 / (self.n - 1)

    @staticmethod
    def of(block: Block) -> Moments:
        """Moments of all cells of one block (zeros of a sparse block included)."""
        n, g = block.shape
        if n == 0:
            return Moments(0, np.zeros(g), np.zeros(g), np.full(g, -np.inf), np.zeros(g, dtype=np.int64))
        if sp.issparse(block):
            block = as_csr(block)
            _, mean, m2, maximum, stored = group_moment_sums(
                block.indptr,
                block.indices,
                block.data,
                np.zeros(n, dtype=np.int64),
                1,
                g,
                np.ones(n),
                np.ones(g),
                False,
            )
            return Moments(n, mean[0], m2[0], maximum[0], stored[0])
        block = np.asarray(block, dtype=np.float64)
        mean = block.mean(axis=0)
        dev = block - mean
        nonzero = np.count_nonzero(block, axis=0).astype(np.int64)
        return Moments(n, mean, np.einsum("ij,ij->j", dev, dev), block.max(axis=0), nonzero)


@dataclass
class GroupMoments:
    """:class:`Moments` per group code (only the groups present are stored)."""

    groups: dict[int, Moments] = field(default_factory=dict)

    def merge(self, other: GroupMoments) -> GroupMoments:
        out = dict(self.groups)
        for code, m in other.groups.items():
            out[code] = out[code].merge(m) if code in out else m
        return GroupMoments(out)

    def total(self) -> Moments:
        """Moments of all cells, merged over groups in code order."""
        codes = sorted(self.groups)
        out = self.groups[codes[0]]
        for c in codes[1:]:
            out = out.merge(self.groups[c])
        return out


def rows_by_group(codes: np.ndarray) -> dict[int, np.ndarray]:
    """Row indices of each group code present in ``codes``, in row order."""
    codes = np.asarray(codes)
    if codes.size == 0:  # no groups (the bounds below would have one end more than the starts)
        return {}
    order = np.argsort(codes, kind="stable")
    present, starts = np.unique(codes[order], return_index=True)
    bounds = [*starts[1:], len(codes)]
    return {int(c): order[s:e] for c, s, e in zip(present, starts, bounds, strict=True)}


def group_moments(
    block: Block, codes: np.ndarray, *, normalize: bool = False, idf: np.ndarray | None = None
) -> GroupMoments:
    """Kernel: per-group gene moments of one chunk; ``codes`` gives each cell's group.

    The moments are of the chunk's log-normalized values when ``normalize`` (TF-IDF with ``idf``). A
    sparse chunk is walked once per statistic by
    :func:`~symphony_dask._preprocessing.csr_kernels.group_moment_sums`, which normalizes each stored
    value on the fly: neither the chunk nor a group's rows are copied.
    """
    if not sp.issparse(block):
        values = log_normalize(block, idf=idf) if normalize else block
        return GroupMoments({c: Moments.of(values[rows]) for c, rows in rows_by_group(codes).items()})
    block = as_csr(block)
    present, group = np.unique(np.asarray(codes), return_inverse=True)
    row_factors, gene_factors = stored_value_factors(block, normalize=normalize, idf=idf)
    sizes, mean, m2, maximum, stored = group_moment_sums(
        block.indptr,
        block.indices,
        block.data,
        group.ravel(),
        len(present),
        block.shape[1],
        row_factors,
        gene_factors,
        bool(normalize),
    )
    return GroupMoments(
        {int(c): Moments(int(sizes[i]), mean[i], m2[i], maximum[i], stored[i]) for i, c in enumerate(present)}
    )


def stored_value_factors(
    block: sp.csr_matrix, *, normalize: bool, idf: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The per-row and per-column factors with which a CSR kernel normalizes a stored value.

    A stored value ``x`` of row ``i`` and column ``g`` becomes ``log1p(x * row_factors[i] * gene_factors[g])``
    (:func:`log_normalize`): ``1e4 / cell total`` per row (0 for an empty cell) and the ``idf`` (or ones)
    per column.
    """
    n_cells, n_genes = block.shape
    row_factors = _safe_inverse(cell_totals(block)) * SCALE_FACTOR if normalize else np.ones(n_cells)
    gene_factors = np.ones(n_genes) if idf is None else np.asarray(idf, dtype=np.float64)
    return row_factors, gene_factors


@dataclass
class FirstPass:
    """What the first pass over the raw matrix learns: value checks and group moments."""

    counts: ValueCounts
    moments: GroupMoments

    def merge(self, other: FirstPass) -> FirstPass:
        return FirstPass(self.counts + other.counts, self.moments.merge(other.moments))


def first_pass(block: Block, codes: np.ndarray, *, normalize: bool, idf: np.ndarray | None = None) -> FirstPass:
    """Kernel: value checks on the raw values, then moments of the (normalized) values per group."""
    counts = count_bad_values(block)
    with np.errstate(invalid="ignore", over="ignore"):  # bad values are reported from `counts`
        return FirstPass(counts, group_moments(block, codes, normalize=normalize, idf=idf))


def has_counts(block: Block) -> np.ndarray:
    """Kernel: whether each cell of a chunk has a nonzero total."""
    return cell_totals(block) != 0


def normalized_genes(block: Block, genes: np.ndarray, *, normalize: bool, idf: np.ndarray | None = None) -> Block:
    """Kernel: the chosen genes (columns) of one chunk, log-normalized when ``normalize``.

    Each cell is normalized by its total over *all* genes, but only the chosen genes' values are
    transformed; ``idf``, one value per column of the block, makes it TF-IDF.
    """
    if not normalize:
        return block[:, genes]
    sub = block[:, genes]  # a new matrix already
    if sp.issparse(sub):
        sub = sp.csr_matrix(sub, dtype=np.float64)
    return _log_scaled(sub, cell_totals(block), SCALE_FACTOR, None if idf is None else idf[genes])


def scale(
    block: Block,
    genes: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    *,
    normalize: bool,
    idf: np.ndarray | None = None,
) -> np.ndarray:
    """Kernel: dense ``clip((x - mean) / std, -10, 10)`` of the chosen genes of one chunk.

    ``genes`` are column indices into the block; ``mean`` and ``std`` belong to those genes. The
    values are normalized first when ``normalize`` is set (TF-IDF with ``idf``, one value per
    column of the block). Only this chunk is ever densified.
    """
    if sp.issparse(block):
        block = as_csr(block)
        position = np.full(block.shape[1], -1, dtype=np.int64)
        position[genes] = np.arange(len(genes))
        row_factors, gene_factors = stored_value_factors(block, normalize=normalize, idf=idf)
        return scaled_rows(
            block.indptr,
            block.indices,
            block.data,
            position,
            np.asarray(mean, dtype=np.float64),
            np.asarray(std, dtype=np.float64),
            float(SCALE_CLIP),
            row_factors,
            gene_factors,
            bool(normalize),
        )
    sub = normalized_genes(block, genes, normalize=normalize, idf=idf)
    dense = sub.toarray() if sp.issparse(sub) else np.array(sub, dtype=np.float64)
    if dense.dtype != np.float64:
        dense = dense.astype(np.float64)
    dense -= mean  # in place: the dense chunk is the largest array of a pass
    dense /= std
    np.clip(dense, -SCALE_CLIP, SCALE_CLIP, out=dense)
    return dense
