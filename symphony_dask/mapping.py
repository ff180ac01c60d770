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

Steps 1-2 are a per-chunk kernel, the ridge statistics of step 3 a tree reduction, and the
correction a second per-chunk kernel; a query held in memory as one chunk runs the same kernels
directly with NumPy.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import anndata as ad
import dask
import numpy as np
import pandas as pd

from .checks import ValueCounts, as_key_list, check_obs_keys, check_unique_genes, count_bad_values, raise_on_bad_values
from .chunked import as_row_chunked, map_reduce, map_rows
from .harmony import cosine_normalize, soft_assign
from .io import AnnDataLike, read_expression
from .mixture import Design, make_design, remove_batch_terms, ridge_statistics, ridge_system, solve_batch_terms
from .pca import project
from .reference import Reference

logger = logging.getLogger("symphony_dask")

#: Below this fraction of reference genes found in the query, mapping warns.
MIN_GENE_FRACTION = 0.5


def map_query(
    reference: Reference,
    query: AnnDataLike,
    batch_keys: str | Sequence[str] | None = None,
    *,
    normalize: bool = True,
    sigma: float = 0.1,
    lamb: float = 1.0,
    chunk_size: int | None = None,
    layer: str | None = None,
    copy: bool = False,
) -> ad.AnnData:
    """Map query cells into the reference's corrected embedding.

    Parameters
    ----------
    reference
        A :class:`~symphony_dask.Reference`.
    query
        Cells x genes expression (AnnData, or a path to ``.h5ad``/``.zarr``), normalized like the
        reference: raw counts with ``normalize=True``, log(CP10K+1) values otherwise.
    batch_keys
        Query ``obs`` column(s) whose batch effects are removed. With none, all query cells are one batch.
    normalize
        Log(CP10K+1)-normalize the query counts.
    sigma
        Soft-assignment bandwidth. As in R Symphony, it is rounded to float32 (0.1 -> 0.10000000149).
    lamb
        Ridge penalty of the batch terms.
    chunk_size
        Cells per chunk; ``None`` maps an in-memory query as one chunk with NumPy.
    layer
        Use this layer of the query instead of ``X``.
    copy
        Return a copy of an in-memory AnnData query instead of annotating it in place.

    Returns
    -------
    AnnData
        The query (or, for a path, an AnnData with its ``obs`` and ``var``) with
        ``obsm['X_symphony']`` (corrected embedding), ``obsm['X_symphony_pca']`` (projection before
        correction), ``obsm['X_symphony_R']`` (soft cluster assignments) and ``uns['symphony']``.
    """
    expr = read_expression(query, chunk_size=chunk_size, layer=layer)
    keys = as_key_list(batch_keys)
    check_obs_keys(expr.obs, keys, where="the query's obs")
    check_unique_genes(expr.genes, where="the query")
    query_cols, ref_rows = match_genes(reference.genes, expr.genes)
    sigma32 = float(np.float32(sigma))
    design = query_design(expr.obs, keys)
    kernel_args = dict(
        genes=query_cols, mean=reference.mean[ref_rows], std=reference.std[ref_rows],
        loadings=reference.loadings[ref_rows], normalize=normalize,
    )
    penalty = np.concatenate([[0.0], np.full(design.patterns.shape[1] - 1, float(lamb))])

    if expr.X.numblocks[0] == 1:
        block = expr.X.blocks[0].compute()
        raise_on_bad_values(count_bad_values(block), where="the query expression", normalize=normalize)
        zq = project(block, **kernel_args)
        rq = soft_assign(cosine_normalize(zq), reference.centroids, sigma32)
        w = _query_terms(reference, design, *ridge_statistics(zq, rq, design.codes, len(design.patterns)), penalty)
        zq_corr = remove_batch_terms(zq, rq, design.codes, design.patterns, w)
    else:
        zq_corr, zq, rq = _map_chunked(reference, expr.X, design, kernel_args, sigma32, penalty, normalize)

    out = _output(query, expr, copy)
    out.obsm["X_symphony"] = zq_corr
    out.obsm["X_symphony_pca"] = zq
    out.obsm["X_symphony_R"] = rq
    out.uns["symphony"] = {
        "batch_keys": keys,
        "normalize": normalize,
        "sigma": sigma,
        "sigma_float32": sigma32,
        "lamb": lamb,
        "n_reference_genes": reference.n_genes,
        "n_genes_found": int(len(ref_rows)),
        "fraction_genes_found": float(len(ref_rows) / reference.n_genes),
    }
    return out


def match_genes(reference_genes: pd.Index, query_genes: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    """Query column and reference row of each reference gene found in the query.

    Raises when no gene is shared and warns when fewer than half of the reference genes are found.
    """
    where = query_genes.get_indexer(reference_genes)
    ref_rows = np.flatnonzero(where >= 0)
    if ref_rows.size == 0:
        raise ValueError(
            "the query shares no genes with the reference (reference genes look like "
            f"{', '.join(reference_genes[:3])}; query genes like {', '.join(map(str, query_genes[:3]))}); "
            "use the same gene identifiers (e.g. symbols vs Ensembl IDs) in both"
        )
    fraction = ref_rows.size / len(reference_genes)
    if fraction < MIN_GENE_FRACTION:
        warnings.warn(
            f"only {ref_rows.size} of {len(reference_genes)} reference genes ({fraction:.1%}) are in the query; "
            "missing genes are imputed at the reference mean and the mapping may be poor",
            UserWarning,
            stacklevel=3,
        )
    return where[ref_rows], ref_rows


def query_design(obs: pd.DataFrame, keys: list[str]) -> Design:
    """Symphony's query design: intercept plus a one-hot block per key; no key gives two rows of ones."""
    if not keys:
        return make_design(pd.DataFrame({"query": np.zeros(len(obs))}), ["query"])
    return make_design(obs, keys)


def _query_terms(reference: Reference, design: Design, s: np.ndarray, t: np.ndarray, penalty: np.ndarray) -> np.ndarray:
    """Per-cluster batch coefficients, with the reference entering through N_r and C."""
    a, b = ridge_system(s, t, design.patterns)
    a[:, 0, 0] += reference.cluster_sizes
    b[:, 0, :] += reference.compression
    return solve_batch_terms(a, b, penalty)


def _map_chunked(reference, x, design, kernel_args, sigma32, penalty, normalize):
    """The same kernels over row chunks: projection and assignment, a tree-reduced ridge, correction."""
    codes = as_row_chunked(design.codes, x)
    counts = map_reduce(count_bad_values, x, combine=ValueCounts.__add__)
    zq = map_rows(project, x, n_out=reference.n_pcs, **kernel_args)
    rq = map_rows(_assign, zq, n_out=reference.n_clusters, centroids=reference.centroids, sigma=sigma32)
    zq, rq, counts = dask.persist(zq, rq, counts)
    raise_on_bad_values(counts.compute(), where="the query expression", normalize=normalize)
    n_patterns = len(design.patterns)
    s, t = map_reduce(_ridge, zq, rq, codes, combine=_add_pairs, n_patterns=n_patterns).compute()
    w = _query_terms(reference, design, s, t, penalty)
    zq_corr = map_rows(_correct, zq, rq, codes, n_out=reference.n_pcs, patterns=design.patterns, w=w)
    return dask.compute(zq_corr, zq, rq)


def _assign(zq: np.ndarray, *, centroids: np.ndarray, sigma: float) -> np.ndarray:
    return soft_assign(cosine_normalize(zq), centroids, sigma)


def _ridge(zq: np.ndarray, rq: np.ndarray, codes: np.ndarray, *, n_patterns: int):
    return ridge_statistics(zq, rq, codes, n_patterns)


def _add_pairs(a, b):
    return a[0] + b[0], a[1] + b[1]


def _correct(zq: np.ndarray, rq: np.ndarray, codes: np.ndarray, *, patterns: np.ndarray, w: np.ndarray) -> np.ndarray:
    return remove_batch_terms(zq, rq, codes, patterns, w)


def _output(query: AnnDataLike, expr, copy: bool) -> ad.AnnData:
    if isinstance(query, ad.AnnData) and not query.isbacked:
        return query.copy() if copy else query
    return ad.AnnData(obs=expr.obs.copy(), var=expr.var.copy())
