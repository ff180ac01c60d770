"""Mapping query cells onto a Symphony reference (paper, Algorithm 2).

1. Scale the query's reference genes with the reference means and SDs (genes missing from the
   query are 0 after scaling, i.e. at the reference mean) and project with the loadings:
   ``Z_q = U^T G_qs``.
2. Soft-assign the cosine-normalized ``Z_q`` to the reference centroids ``Y_cos`` (no diversity
   penalty): ``R_q = softmax_k(-2 (1 - Y_cos^T z) / sigma)``.
3. For each cluster solve the ridge system of the query design with intercept, where the reference
   enters only through its compression terms:
   ``(X_q W_k X_q^T + I' + N_r[k] e0 e0^T) B_k = X_q W_k Z_q^T + e0 C[k]``
   (``W_k = diag(R_q[k])``, ``I'`` the identity without its intercept entry), and remove the batch
   terms: ``z_hat = z - sum_k R_qk B_k[1:]^T x[1:]``. The reference never moves.

Steps 1-2 are a per-chunk kernel, the ridge statistics of step 3 (per design pattern: ``sum R`` and
``sum R z``) one tree reduction, and the correction a second per-chunk kernel. A query held in memory
as one chunk runs the same kernels directly with NumPy; a large or sharded query (several files)
runs them as dask tasks, each shard read on the workers, and gets the same answer as if its cells
were in one matrix. With ``per_batch=True`` every query batch gets its own ridge fit, as if mapped
alone.
"""

from __future__ import annotations

import glob
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd

from symphony_dask._dask.chunked import as_row_chunked, compute, map_reduce, map_rows, one_blas_thread_per_task
from symphony_dask._embedding.umap_layout import Placement
from symphony_dask._harmony.kernels import cosine_normalize, soft_assign
from symphony_dask._harmony.mixture import (
    Design,
    apply_batch_terms,
    expected_cells,
    make_design,
    ridge_statistics,
    ridge_system,
    solve_batch_terms,
)
from symphony_dask._io.expression import AnnDataLike, Expression, read_expression
from symphony_dask._io.validation import (
    ValueCounts,
    as_key_list,
    check_batch_values,
    check_obs_keys,
    check_unique_genes,
    count_bad_values,
    option,
    raise_on_bad_values,
)
from symphony_dask._preprocessing.pca import project
from symphony_dask._reference.model import Reference
from symphony_dask._reference.store import load_reference

logger = logging.getLogger("symphony_dask")

#: Below this fraction of reference genes found in the query, mapping warns.
MIN_GENE_FRACTION = 0.5

QueryLike = AnnDataLike | Sequence[AnnDataLike]


def map_query(
    reference: Reference | str | os.PathLike,
    query: QueryLike,
    batch_keys: str | Sequence[str] | None = None,
    *,
    normalize: bool = True,
    sigma: float = 0.1,
    lamb: float | None = None,
    gene_key: str | None = None,
    per_batch: bool = False,
    chunk_size: int | None = None,
    layer: str | None = None,
    copy: bool = False,
) -> ad.AnnData:
    """Map query cells into the reference's corrected embedding.

    Parameters
    ----------
    reference
        A :class:`~symphony_dask.Reference`, or the path of a reference store (loaded with
        :func:`~symphony_dask.load_reference`).
    query
        Cells x genes expression normalized like the reference (raw counts with ``normalize=True``,
        log(CP10K+1) values otherwise): an AnnData, a path to ``.h5ad``/``.zarr``, or several of
        them (a list, or a glob pattern such as ``'shards/*.h5ad'``) mapped together as one query.
    batch_keys
        Query ``obs`` column(s) whose batch effects are removed. With none, all query cells are one batch.
        Each key must name groups of cells, as for :func:`~symphony_dask.build_reference`.
    normalize
        Normalize the query counts as the reference's were: log(CP10K+1), or for a TF-IDF reference
        (``normalize='tfidf'`` at build) ``log(1 + TF x IDF x 1e4)`` with the reference's IDF.
    sigma
        Soft-assignment bandwidth. As in R Symphony, it is rounded to float32 (0.1 -> 0.10000000149).
    lamb
        Ridge penalty of the batch terms. Default: 1 (the paper's) for a harmony1 reference; for a
        harmony2 reference estimated per cluster and query batch as Harmony 2 does,
        ``alpha E_kb`` with ``E_kb`` the query cells of batch b expected in cluster k and the
        reference's ``alpha`` (0.2). A number fixes it.
    gene_key
        Match reference genes to this ``var`` column of the query (e.g. symbols beside Ensembl IDs)
        instead of ``var_names``.
    per_batch
        Fit the batch terms of each query batch on its own, as if each were mapped alone (the paper
        notes that mapping batches together couples them slightly).
    chunk_size
        Cells per chunk; ``None``: one chunk for an in-memory query of up to 10,000 cells (NumPy),
        chunks of 10,000 above, and for data on disk as many as a task's memory holds (at most 10,000).
    layer
        Use this layer of the query instead of ``X``.
    copy
        Return a copy of an in-memory AnnData query instead of annotating it in place.

    Returns
    -------
    AnnData
        The query (for paths, an AnnData with their ``obs`` and ``var`` and no ``X``; for several
        shards, their ``obs`` concatenated with ``obs['symphony_shard']``) with
        ``obsm['X_symphony']`` (corrected embedding), ``obsm['X_symphony_pca']`` (projection before
        correction), ``obsm['X_symphony_R']`` (soft cluster assignments), ``obsm['X_umap']`` (the
        cells placed in the reference UMAP, for references that have one) and ``uns['symphony']``.
    """
    if isinstance(reference, (str, os.PathLike)):
        reference = load_reference(reference)
    elif not isinstance(reference, Reference):
        raise TypeError(
            f"reference must be a Reference or the path of a reference store, got {type(reference).__name__}"
        )
    shards = query_shards(query)
    keys = as_key_list(batch_keys)
    exprs = [read_expression(shard, chunk_size=chunk_size, layer=layer) for shard in shards]
    matched = [
        _match(reference, expr, keys, gene_key, where=_name(shard, i, len(shards)))
        for i, (shard, expr) in enumerate(zip(shards, exprs, strict=True))
    ]
    obs = exprs[0].obs if len(exprs) == 1 else pd.concat([e.obs for e in exprs])
    check_batch_values(obs, keys, where="the query's obs")
    design = query_design(obs, keys)
    sigma32 = float(np.float32(sigma))
    alpha = float(reference.params.get("alpha", 0.2)) if reference.params.get("harmony_flavor") == "harmony2" else None
    terms = _BatchTerms(reference, design, lamb if lamb is not None or alpha is not None else 1.0, alpha, per_batch)

    values = _ValueCheck(normalize, exprs[0].layers if layer is None else ())
    placement = reference.umap_placement(len(obs))
    if len(exprs) == 1 and exprs[0].X.numblocks[0] == 1:
        zq_corr, zq, rq = _map_in_memory(reference, exprs[0], matched[0], design, terms, sigma32, values)
        umap = None if placement is None else placement(zq_corr, np.arange(len(zq_corr)))
    else:
        with one_blas_thread_per_task():
            zq_corr, zq, rq, umap = _map_chunked(reference, exprs, matched, design, terms, sigma32, values, placement)

    out = _output(query, exprs, copy)
    out.obsm["X_symphony"] = zq_corr
    out.obsm["X_symphony_pca"] = zq
    out.obsm["X_symphony_R"] = rq
    if umap is not None:
        out.obsm["X_umap"] = umap
    found = [len(rows) for _, rows in matched]
    out.uns["symphony"] = {
        "batch_keys": keys,
        "per_batch": per_batch,
        "gene_key": gene_key,
        "normalize": normalize,
        "sigma": sigma,
        "sigma_float32": sigma32,
        "lamb": terms.lamb if terms.lamb is not None else f"estimated (alpha={alpha})",
        "n_reference_genes": reference.n_genes,
        "n_genes_found": int(min(found)),
        "fraction_genes_found": float(min(found) / reference.n_genes),
    }
    return out


def match_genes(
    reference_genes: pd.Index, query_genes: pd.Index, *, where: str = "the query"
) -> tuple[np.ndarray, np.ndarray]:
    """Query column and reference row of each reference gene found in the query.

    Raises when no gene is shared and warns when fewer than half of the reference genes are found.
    """
    where_found = query_genes.get_indexer(reference_genes)
    ref_rows = np.flatnonzero(where_found >= 0)
    if ref_rows.size == 0:
        raise ValueError(
            f"{where} shares no genes with the reference (reference genes look like "
            f"{', '.join(reference_genes[:3])}; query genes like {', '.join(map(str, query_genes[:3]))}); "
            "use the same gene identifiers (e.g. symbols vs Ensembl IDs) in both, or name the query var column "
            f"that holds the reference's gene names ({option('gene_key')})"
        )
    fraction = ref_rows.size / len(reference_genes)
    if fraction < MIN_GENE_FRACTION:
        warnings.warn(
            f"only {ref_rows.size} of {len(reference_genes)} reference genes ({fraction:.1%}) are in {where}; "
            "missing genes are imputed at the reference mean and the mapping may be poor",
            UserWarning,
            stacklevel=4,
        )
    return where_found[ref_rows], ref_rows


def query_design(obs: pd.DataFrame, keys: list[str]) -> Design:
    """Symphony's query design: intercept plus a one-hot block per key; no key gives two rows of ones."""
    if not keys:
        return make_design(pd.DataFrame({"query": np.zeros(len(obs))}), ["query"])
    return make_design(obs, keys)


class _BatchTerms:
    """The per-cluster batch coefficients from the ridge sums, as ``M[p] = x_p^T B`` per pattern.

    The penalty is ``lamb``, or with ``lamb=None`` ``alpha E_kb`` (Harmony 2's estimate).
    """

    def __init__(
        self, reference: Reference, design: Design, lamb: float | None, alpha: float | None, per_batch: bool
    ) -> None:
        self.reference, self.design, self.per_batch = reference, design, per_batch
        self.lamb, self.alpha = (None if lamb is None else float(lamb)), alpha

    def per_pattern(self, s: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The batch terms of each design pattern (patterns x clusters x d) from the ridge sums ``s``, ``t``."""
        if not self.per_batch:  # one ridge over all query cells
            return np.einsum("pa,kad->pkd", self.design.patterns, self._solve(self.design.patterns, s, t))
        out = np.empty((len(self.design.patterns), s.shape[1], t.shape[2]))
        n_keys = len({key for key, _ in self.design.levels})
        ones = np.ones((1, 1 + n_keys))  # a batch alone: intercept and one single-level column per key
        for p in range(len(self.design.patterns)):
            out[p] = np.einsum("pa,kad->pkd", ones, self._solve(ones, s[p : p + 1], t[p : p + 1]))[0]
        return out

    def _solve(self, patterns: np.ndarray, s: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Each cluster's ridge solution ``B`` for the design ``patterns``, the reference's terms added."""
        a, b = ridge_system(s, t, patterns)
        a[:, 0, 0] += self.reference.cluster_sizes
        b[:, 0, :] += self.reference.compression
        if self.lamb is not None:
            return solve_batch_terms(a, b, np.concatenate([[0.0], np.full(patterns.shape[1] - 1, self.lamb)]))
        levels = np.arange(1, patterns.shape[1])
        a[:, levels, levels] += self.alpha * expected_cells(s, patterns)
        return solve_batch_terms(a, b, np.zeros(patterns.shape[1]))


@dataclass(frozen=True)
class _ValueCheck:
    """How the query's values are checked: as raw counts (``normalize``) or log values.

    ``layers`` are named in the warning when log values are read as counts.
    """

    normalize: bool
    layers: tuple[str, ...]

    def __call__(self, counts: ValueCounts) -> None:
        raise_on_bad_values(counts, where="the query expression", normalize=self.normalize, layers=self.layers)


def _map_in_memory(reference, expr, matched, design, terms, sigma32, values: _ValueCheck):
    """The kernels on the whole query (the one-chunk case)."""
    block = expr.X.blocks[0].compute(scheduler="sync")  # one task: no thread pool
    values(count_bad_values(block))
    zq = project(block, **_projection(reference, matched, values.normalize, block.shape[1]))
    rq = soft_assign(cosine_normalize(zq), reference.centroids, sigma32)
    per_pattern = terms.per_pattern(*ridge_statistics(zq, rq, design.codes, len(design.patterns)))
    return apply_batch_terms(zq, rq, design.codes, per_pattern), zq, rq


def _map_chunked(reference, exprs, matched, design, terms, sigma32, values: _ValueCheck, placement: Placement | None):
    """The same kernels over the chunks of every shard.

    Projection and assignment, one tree-reduced ridge for all shards, then the correction.
    """
    zq = da.concatenate(
        [
            map_rows(
                _project_checked_later,
                e.X,
                n_out=reference.n_pcs,
                **_projection(reference, m, values.normalize, e.X.shape[1]),
            )
            for e, m in zip(exprs, matched, strict=True)
        ],
        axis=0,
    )
    counts = [map_reduce(count_bad_values, e.X, combine=ValueCounts.__add__) for e in exprs]
    rq = map_rows(_assign, zq, n_out=reference.n_clusters, centroids=reference.centroids, sigma=sigma32)
    zq, rq, *counts = dask.persist(zq, rq, *counts)
    total = sum(compute(*counts), ValueCounts())
    values(total)
    codes = as_row_chunked(design.codes, zq)
    s, t = compute(map_reduce(_ridge, zq, rq, codes, combine=_add_pairs, n_patterns=len(design.patterns)))[0]
    per_pattern = terms.per_pattern(s, t)
    zq_corr = map_rows(_correct, zq, rq, codes, n_out=reference.n_pcs, per_pattern=per_pattern)
    if placement is None:
        return (*compute(zq_corr, zq, rq), None)
    rows = as_row_chunked(np.arange(zq.shape[0]), zq)
    return compute(zq_corr, zq, rq, map_rows(placement, zq_corr, rows, n_out=2))


def _project_checked_later(block, **kwargs) -> np.ndarray:
    """Projection kernel of the chunked path, which checks the values from counts of the same pass."""
    with np.errstate(invalid="ignore", over="ignore"):
        return project(block, **kwargs)


def _projection(reference: Reference, matched, normalize: bool, n_columns: int) -> dict:
    """The projection kernel's settings; a TF-IDF reference's IDF goes to the matched query columns."""
    query_cols, ref_rows = matched
    idf = None
    if normalize and reference.idf is not None:
        idf = np.ones(n_columns)
        idf[query_cols] = reference.idf[ref_rows]
    return dict(
        genes=query_cols,
        mean=reference.mean[ref_rows],
        std=reference.std[ref_rows],
        loadings=reference.loadings[ref_rows],
        normalize=normalize,
        idf=idf,
    )


def _assign(zq: np.ndarray, *, centroids: np.ndarray, sigma: float) -> np.ndarray:
    return soft_assign(cosine_normalize(zq), centroids, sigma)


def _ridge(zq: np.ndarray, rq: np.ndarray, codes: np.ndarray, *, n_patterns: int):
    return ridge_statistics(zq, rq, codes, n_patterns)


def _add_pairs(a, b):
    return a[0] + b[0], a[1] + b[1]


def _correct(zq: np.ndarray, rq: np.ndarray, codes: np.ndarray, *, per_pattern: np.ndarray) -> np.ndarray:
    return apply_batch_terms(zq, rq, codes, per_pattern)


def query_shards(query: QueryLike) -> list[AnnDataLike]:
    """The query as a list of shards; a string with glob characters is expanded."""
    if isinstance(query, (str, os.PathLike)) and any(ch in str(query) for ch in "*?["):
        paths = sorted(glob.glob(str(query)))
        if not paths:
            raise FileNotFoundError(f"no query shard matches {query!r}")
        return paths
    if isinstance(query, (list, tuple)):
        if not query:
            raise ValueError("the list of query shards is empty")
        return list(query)
    return [query]


def _match(reference: Reference, expr: Expression, keys: list[str], gene_key: str | None, *, where: str):
    check_obs_keys(expr.obs, keys, where=f"{where}'s obs")
    genes = _query_genes(expr, gene_key, where)
    return match_genes(reference.genes, genes, where=where)


def _query_genes(expr: Expression, gene_key: str | None, where: str) -> pd.Index:
    if gene_key is None:
        check_unique_genes(expr.genes, where=where)
        return expr.genes
    if gene_key not in expr.var.columns:
        cols = ", ".join(map(repr, expr.var.columns)) or "(none)"
        raise ValueError(f"{option('gene_key', gene_key)} is not a column of {where}'s var; the columns are: {cols}")
    genes = pd.Index(expr.var[gene_key].astype(str))
    duplicated = genes.duplicated()
    if duplicated.any():
        warnings.warn(
            f"{int(duplicated.sum())} gene(s) of var[{gene_key!r}] in {where} repeat an earlier name; the first "
            "occurrence of each is used",
            UserWarning,
            stacklevel=4,
        )
        genes = pd.Index(np.where(duplicated, None, genes.to_numpy(dtype=object)))  # later copies match nothing
    return genes


def _name(shard: AnnDataLike, i: int, n: int) -> str:
    if n == 1:
        return "the query"
    return f"query shard {i} ({shard})" if not isinstance(shard, ad.AnnData) else f"query shard {i}"


def _output(query: QueryLike, exprs: list[Expression], copy: bool) -> ad.AnnData:
    if len(exprs) == 1 and isinstance(query, ad.AnnData) and not query.isbacked:
        return query.copy() if copy else query
    if len(exprs) == 1:
        return ad.AnnData(obs=exprs[0].obs.copy(), var=exprs[0].var.copy())
    obs = pd.concat([e.obs.assign(symphony_shard=i) for i, e in enumerate(exprs)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not unique.*")
        return ad.AnnData(obs=obs)
