"""Transferring reference annotations to mapped query cells, and scoring the result.

Label transfer is a k-nearest-neighbour vote in the corrected embedding (Euclidean distance, k = 5
by default, as R Symphony's ``knnPredict``): each query cell takes the label most frequent among its
k nearest reference cells, ties broken at random with a seeded generator, and its confidence is the
fraction of the k neighbours that voted for the winner.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from .reference import Reference

logger = logging.getLogger("symphony_dask")


def transfer_labels(
    reference: Reference,
    query: ad.AnnData,
    key: str,
    *,
    k: int = 5,
    confidence: bool = True,
    seed: int = 0,
    embedding_key: str = "X_symphony",
) -> ad.AnnData:
    """Predict ``reference.obs[key]`` for mapped query cells by a k-NN vote.

    Parameters
    ----------
    reference
        Reference with its per-cell ``embedding`` and ``obs``.
    query
        Output of :func:`~symphony_dask.map_query` (uses ``obsm[embedding_key]``).
    key
        Column of ``reference.obs`` to transfer.
    k
        Number of nearest reference cells.
    confidence
        Also write the fraction of the k neighbours that voted for the winning label.
    seed
        Seeds the random breaking of tied votes.
    embedding_key
        ``obsm`` key of the query's corrected embedding.

    Returns
    -------
    AnnData
        ``query``, annotated in place with ``obs[f'{key}_pred']`` (categorical) and, if
        ``confidence``, ``obs[f'{key}_conf']``.
    """
    labels = _reference_labels(reference, key)
    emb = _query_embedding(query, embedding_key, reference.n_pcs)
    n_ref = reference.embedding.shape[0]
    if not 1 <= k <= n_ref:
        raise ValueError(f"k={k} must be between 1 and the number of reference cells ({n_ref})")
    neighbours = nearest_reference_cells(np.asarray(reference.embedding), emb, k)
    codes = labels.codes[neighbours]
    winner, votes = majority_vote(codes, len(labels.categories), seed=seed)
    query.obs[f"{key}_pred"] = pd.Categorical.from_codes(winner, categories=labels.categories)
    if confidence:
        query.obs[f"{key}_conf"] = votes / k
    return query


def nearest_reference_cells(reference_embedding: np.ndarray, query_embedding: np.ndarray, k: int) -> np.ndarray:
    """Indices (query cells x k) of the k nearest reference cells by Euclidean distance, nearest first."""
    tree = cKDTree(reference_embedding)
    _, idx = tree.query(query_embedding, k=k, workers=-1)
    return idx.reshape(len(query_embedding), k)


def majority_vote(codes: np.ndarray, n_labels: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Winning label code per row of neighbour label codes, ties broken at random; and its votes."""
    m = codes.shape[0]
    counts = np.zeros((m, n_labels), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(m), codes.shape[1]), codes.ravel()), 1)
    jitter = np.random.default_rng(seed).random((m, n_labels)) * 0.5  # < 1: only reorders ties
    winner = np.argmax(counts + jitter, axis=1)
    return winner, counts[np.arange(m), winner]


def evaluate(true: pd.Series | np.ndarray, predicted: pd.Series | np.ndarray) -> dict:
    """Accuracy, per-class F1 (over true classes) and median F1, as Symphony's ``evaluate``."""
    true = pd.Series(np.asarray(true, dtype=object).astype(str))
    predicted = pd.Series(np.asarray(predicted, dtype=object).astype(str))
    f1 = {}
    for label in sorted(true.unique()):
        tp = int(((true == label) & (predicted == label)).sum())
        n_pred, n_true = int((predicted == label).sum()), int((true == label).sum())
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true
        f1[label] = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
    return {
        "accuracy": float((true == predicted).mean()),
        "median_f1": float(np.median(list(f1.values()))),
        "f1": f1,
    }


def _reference_labels(reference: Reference, key: str) -> pd.Categorical:
    if reference.embedding is None or reference.obs is None:
        raise ValueError(
            "this reference was saved without its per-cell embedding and obs, which label transfer needs; "
            "rebuild it with keep_embedding=True"
        )
    if key not in reference.obs.columns:
        cols = ", ".join(map(repr, reference.obs.columns)) or "(none)"
        raise ValueError(f"{key!r} is not a column of the reference obs; the columns are: {cols}")
    values = reference.obs[key]
    if values.isna().any():
        raise ValueError(f"reference obs column {key!r} has {int(values.isna().sum())} missing label(s)")
    return pd.Categorical(values)


def _query_embedding(query: ad.AnnData, embedding_key: str, n_pcs: int) -> np.ndarray:
    if embedding_key not in query.obsm:
        raise ValueError(f"the query has no obsm[{embedding_key!r}]; map it first with map_query")
    emb = np.asarray(query.obsm[embedding_key], dtype=np.float64)
    if emb.shape[1] != n_pcs:
        raise ValueError(f"obsm[{embedding_key!r}] has {emb.shape[1]} dimensions but the reference has {n_pcs}")
    return emb
