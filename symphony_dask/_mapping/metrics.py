"""Mapping-quality and evaluation metrics (paper, Methods).

Mapping quality, from the reference's compressed elements only:

- :func:`per_cell_mapping_metric`: weighted Mahalanobis distance of each query cell to the reference
  clusters in pre-Harmony PC space;
- :func:`per_cluster_mapping_metric`: Mahalanobis distance of the nearest reference centroid from
  each user-defined query cluster.

Evaluation against a gold standard:

- :func:`lisi`: the Local Inverse Simpson's Index (Korsunsky et al. 2019), the effective number of
  categories (e.g. batches) among a cell's neighbors (Gaussian kernel of perplexity 30);
- :func:`knn_corr` and :func:`within_query_knn_corr`: how well neighborhood distances are kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.linalg
import scipy.stats
from scipy.spatial import cKDTree

from symphony_dask._reference.model import Reference

#: Iterations and tolerance of the per-cell search for the kernel precision (as the original LISI).
_BISECTION_STEPS = 50
_ENTROPY_TOL = 1e-5


def lisi(embedding: np.ndarray, labels: pd.Series | np.ndarray, *, perplexity: float = 30.0) -> np.ndarray:
    """LISI of every cell for one categorical label.

    Parameters
    ----------
    embedding
        Cells x dimensions.
    labels
        One category per cell (e.g. the batch).
    perplexity
        Effective number of neighbors; ``3 * perplexity`` nearest neighbors are searched.

    Returns
    -------
    numpy.ndarray
        One LISI value per cell, between 1 and the number of categories.
    """
    embedding = np.asarray(embedding, dtype=np.float64)
    codes = pd.Categorical(np.asarray(labels)).codes
    n = len(embedding)
    k = min(int(3 * perplexity), n - 1)
    if k < 1:
        raise ValueError("LISI needs at least two cells")
    dist, idx = cKDTree(embedding).query(embedding, k=k + 1)
    dist, idx = dist[:, 1:], idx[:, 1:]  # drop the cell itself
    p = _perplexity_weights(dist, perplexity)
    n_labels = codes.max() + 1
    per_label = np.zeros((n, n_labels))
    np.add.at(per_label, (np.repeat(np.arange(n), k), codes[idx].ravel()), p.ravel())
    return 1.0 / (per_label**2).sum(axis=1)


def _perplexity_weights(dist: np.ndarray, perplexity: float) -> np.ndarray:
    """Row-normalized ``exp(-beta_i d_ij)`` with each ``beta_i`` set by bisection.

    Each ``beta_i`` is set so that the entropy of row i is ``log(perplexity)``.
    """
    n = dist.shape[0]
    target = np.log(perplexity)
    beta = np.ones(n)
    lo = np.full(n, -np.inf)
    hi = np.full(n, np.inf)
    for _ in range(_BISECTION_STEPS):
        p = np.exp(-dist * beta[:, None])
        total = p.sum(axis=1)
        safe = np.where(total > 0, total, 1.0)
        entropy = np.log(safe) + beta * (dist * p).sum(axis=1) / safe
        diff = entropy - target
        if np.all(np.abs(diff) < _ENTROPY_TOL):
            break
        up = diff > 0  # too flat: increase the precision
        lo = np.where(up, beta, lo)
        hi = np.where(up, hi, beta)
        beta = np.where(
            up,
            np.where(np.isinf(hi), beta * 2.0, (beta + hi) / 2.0),
            np.where(np.isinf(lo), beta / 2.0, (beta + lo) / 2.0),
        )
    p = np.exp(-dist * beta[:, None])
    return p / p.sum(axis=1, keepdims=True)


def per_cell_mapping_metric(
    reference: Reference, query: ad.AnnData, *, pca_key: str = "X_symphony_pca", r_key: str = "X_symphony_R"
) -> pd.Series:
    """Symphony's per-cell mapping metric: a weighted Mahalanobis distance of each query cell to the clusters.

    It is the R_q-weighted mean Mahalanobis distance of each query cell's projection to the reference
    clusters in pre-Harmony PC space. Each cluster's distribution is the R-weighted mean and unbiased
    weighted covariance of the reference's pre-Harmony PCs (R's ``cov.wt``), from the moments kept in
    the reference (``sum R``, ``sum R^2``, ``sum R z``, ``sum R z z^T``). Values below ~10 are typical
    of cell states the reference holds.

    Parameters
    ----------
    reference
        The reference the query was mapped onto, with its ``pca_moments``.
    query
        Output of :func:`~symphony_dask.map_query`.
    pca_key
        ``obsm`` key of the query's projection into the reference PCs, before correction.
    r_key
        ``obsm`` key of the query's soft cluster assignments.

    Returns
    -------
    pandas.Series
        One distance per query cell (index: ``query.obs_names``).
    """
    moments = reference.pca_moments
    if moments is None:
        raise ValueError(
            "the reference has no pca_moments (per-cluster moments of its pre-Harmony PCs); "
            "rebuild it with build_reference, or pass pca_moments= to Reference.from_arrays"
        )
    zq, rq = _mapped(query, pca_key, reference.n_pcs), _mapped(query, r_key, reference.n_clusters)
    weight = reference.cluster_sizes
    center = moments.first / weight[:, None]
    cov = moments.second / weight[:, None, None] - np.einsum("ki,kj->kij", center, center)
    cov /= (1.0 - moments.weight_sq / weight**2)[:, None, None]
    score = np.zeros(len(zq))
    for k in range(len(weight)):
        factor = scipy.linalg.cho_factor(cov[k], lower=True)
        diff = (zq - center[k]).T
        score += rq[:, k] * np.sqrt(np.einsum("ij,ij->j", diff, scipy.linalg.cho_solve(factor, diff)))
    return pd.Series(score, index=query.obs_names, name="per_cell_mapping_metric")


def per_cluster_mapping_metric(
    reference: Reference,
    query: ad.AnnData,
    labels: str | Sequence,
    *,
    u: float = 2.0,
    lamb: float = 0.0,
    pca_key: str = "X_symphony_pca",
) -> pd.DataFrame:
    """Symphony's per-cluster mapping metric for user-defined query clusters.

    For each query cluster: the mean and covariance of its cells' projections into the reference
    PCs; the nearest reference centroid (``C / N_r``) by dot product with that mean; and the
    Mahalanobis distance of that centroid from the cluster's distribution (with ``lamb`` added to
    the covariance diagonal). Clusters of fewer than ``u * d`` cells get NaN (their covariance is not
    estimable).

    Parameters
    ----------
    reference
        The reference the query was mapped onto.
    query
        Output of :func:`~symphony_dask.map_query` (uses ``obsm[pca_key]``).
    labels
        A ``query.obs`` column or one label per query cell.
    u
        Clusters of fewer than ``u * d`` cells (``d`` PCs) get NaN.
    lamb
        Added to the diagonal of each cluster's covariance.
    pca_key
        ``obsm`` key of the query's projection into the reference PCs, before correction.

    Returns
    -------
    pandas.DataFrame
        Columns ``query_cluster`` and ``distance_score``, clusters in order of first appearance.
    """
    zq = _mapped(query, pca_key, reference.n_pcs)
    labels = query.obs[labels] if isinstance(labels, str) else pd.Series(np.asarray(labels), index=query.obs_names)
    labels = labels.astype(str).to_numpy()
    if len(labels) != len(zq):
        raise ValueError(f"{len(labels)} labels for {len(zq)} query cells")
    centroids_pc = reference.compression / reference.cluster_sizes[:, None]
    d = reference.n_pcs
    rows = []
    for label in pd.unique(labels):
        cells = zq[labels == label]
        mean = cells.mean(axis=0)
        if len(cells) < u * d:
            rows.append((label, np.nan))
            continue
        cov = np.cov(cells, rowvar=False) + lamb * np.eye(d)
        diff = centroids_pc[np.argmax(centroids_pc @ mean)] - mean
        rows.append((label, float(np.sqrt(diff @ np.linalg.solve(cov, diff)))))
    return pd.DataFrame(rows, columns=["query_cluster", "distance_score"])


def knn_corr(
    gold_reference: np.ndarray,
    gold_query: np.ndarray,
    alt_reference: np.ndarray,
    alt_query: np.ndarray,
    *,
    k: int = 500,
) -> np.ndarray:
    """k-NN correlation (paper, Methods): how well each query cell's neighborhood distances are kept.

    For each query cell, the Spearman correlation between the distances to its k nearest reference
    cells in the gold-standard embedding and the distances of the same pairs in the alternative
    embedding. 1 means the neighborhood order is preserved.

    Parameters
    ----------
    gold_reference, gold_query
        Reference and query cells in the gold-standard embedding (cells x dimensions).
    alt_reference, alt_query
        The same cells, in the same order, in the alternative embedding.
    k
        Reference neighbors per query cell (at most the number of reference cells).

    Returns
    -------
    numpy.ndarray
        One correlation per query cell.
    """
    k = min(k, len(gold_reference))
    dist, idx = cKDTree(np.asarray(gold_reference, dtype=np.float64)).query(
        np.asarray(gold_query, dtype=np.float64), k=k, workers=-1
    )
    alt = np.linalg.norm(np.asarray(alt_reference)[idx] - np.asarray(alt_query)[:, None, :], axis=2)
    return _spearman_rows(dist.reshape(len(idx), k), alt)


def within_query_knn_corr(gold_query: np.ndarray, alt_query: np.ndarray, *, k: int = 100) -> np.ndarray:
    """k-NN correlation among query cells: neighbors found in one embedding, distances compared in another.

    The neighbors are found in the gold embedding (e.g. the query's own PCA), their distances compared
    in the alternative one (e.g. the mapped embedding).

    Parameters
    ----------
    gold_query
        Query cells in the gold-standard embedding (cells x dimensions).
    alt_query
        The same cells, in the same order, in the alternative embedding.
    k
        Neighbors per cell (at most the number of cells less one).

    Returns
    -------
    numpy.ndarray
        One correlation per query cell.
    """
    k = min(k, len(gold_query) - 1)
    dist, idx = cKDTree(np.asarray(gold_query, dtype=np.float64)).query(
        np.asarray(gold_query, dtype=np.float64), k=k + 1, workers=-1
    )
    dist, idx = dist[:, 1:], idx[:, 1:]
    alt = np.linalg.norm(np.asarray(alt_query)[idx] - np.asarray(alt_query)[:, None, :], axis=2)
    return _spearman_rows(dist, alt)


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a`` with the same row of ``b`` (NaN where either row is constant)."""
    ra, rb = scipy.stats.rankdata(a, axis=1), scipy.stats.rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    return np.divide((ra * rb).sum(axis=1), denom, out=np.full(len(a), np.nan), where=denom > 0)


def _mapped(query: ad.AnnData, key: str, width: int) -> np.ndarray:
    if key not in query.obsm:
        raise ValueError(f"the query has no obsm[{key!r}]; map it first with map_query")
    values = np.asarray(query.obsm[key], dtype=np.float64)
    if values.shape[1] != width:
        raise ValueError(f"obsm[{key!r}] has {values.shape[1]} columns, the reference {width}")
    return values
