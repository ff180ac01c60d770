"""Transferring reference annotations to mapped query cells, and scoring the result.

Both transfers look up each query cell's k nearest reference cells in the corrected embedding
(Euclidean; :meth:`Reference.neighbor_index`: exact for small references, HNSW for large ones):

- :func:`transfer_labels`: majority vote (k = 5 as R Symphony's ``knnPredict``), ties broken at
  random with a seeded generator; confidence = fraction of the k neighbors voting for the winner;
  below ``min_confidence`` the cell is 'Unassigned' (the paper's 0.6 option);
- :func:`transfer_values`: the neighbors' mean of continuous annotations, ``obs`` columns (a
  pseudotime) or ``obsm`` matrices (protein levels).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from symphony_dask._io.validation import option
from symphony_dask._reference.model import Reference, no_per_cell_data

logger = logging.getLogger("symphony_dask")

UNASSIGNED = "Unassigned"


def transfer_labels(
    reference: Reference,
    query: ad.AnnData,
    key: str,
    *,
    k: int = 5,
    confidence: bool = True,
    seed: int = 0,
    min_confidence: float | None = None,
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
        Also write the fraction of the k neighbors that voted for the winning label.
    seed
        Seeds the random breaking of tied votes.
    min_confidence
        Cells whose confidence is below this are labeled ``'Unassigned'``.
    embedding_key
        ``obsm`` key of the query's corrected embedding.

    Returns
    -------
    AnnData
        ``query``, annotated in place with ``obs[f'{key}_pred']`` (categorical) and, if
        ``confidence``, ``obs[f'{key}_conf']``.
    """
    labels = pd.Categorical(_reference_column(reference, key))
    if labels.isna().any():
        raise ValueError(f"reference obs column {key!r} has {int(labels.isna().sum())} missing label(s)")
    neighbors = _neighbors(reference, query, k, embedding_key)
    winner, votes = majority_vote(
        labels.codes[neighbors], len(labels.categories), seed=seed, cell_keys=cell_keys(query.obs_names)
    )
    conf = votes / k
    predicted = pd.Categorical.from_codes(winner, categories=labels.categories)
    if min_confidence is not None:
        predicted = predicted.add_categories([UNASSIGNED]) if UNASSIGNED not in predicted.categories else predicted
        predicted[conf < min_confidence] = UNASSIGNED
    query.obs[f"{key}_pred"] = predicted
    if confidence:
        query.obs[f"{key}_conf"] = conf
    return query


def transfer_values(
    reference: Reference,
    query: ad.AnnData,
    keys: str | Sequence[str],
    *,
    k: int = 5,
    embedding_key: str = "X_symphony",
) -> ad.AnnData:
    """Predict continuous reference annotations as the mean over the k nearest reference cells.

    Parameters
    ----------
    reference
        Reference with its per-cell ``embedding`` and ``obs`` (and the ``obsm`` matrices to transfer,
        kept in ``reference.obsm``).
    query
        Output of :func:`~symphony_dask.map_query`.
    keys
        Numeric ``obs`` columns (each written to ``query.obs[f'{key}_pred']``) or ``reference.obsm``
        keys (each written to ``query.obsm[f'{key}_pred']``, a DataFrame if the source is one).
    k
        Number of nearest reference cells.
    embedding_key
        ``obsm`` key of the query's corrected embedding.

    Returns
    -------
    AnnData
        ``query``, annotated in place.
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    values = {key: _reference_values(reference, key) for key in keys}
    neighbors = _neighbors(reference, query, k, embedding_key)
    for key, (target, source) in values.items():
        mean = np.asarray(source)[neighbors].mean(axis=1)
        if target == "obs":
            query.obs[f"{key}_pred"] = mean
        elif isinstance(source, pd.DataFrame):
            query.obsm[f"{key}_pred"] = pd.DataFrame(mean, index=query.obs_names, columns=source.columns)
        else:
            query.obsm[f"{key}_pred"] = mean
    return query


def check_transfers(
    reference: Reference, *, labels: Sequence[str] = (), values: Sequence[str] = (), k: int = 5
) -> None:
    """Raise, before any mapping, what the transfers of ``labels`` and ``values`` would raise.

    That is what :func:`transfer_labels` of ``labels`` and :func:`transfer_values` of ``values`` with
    ``k`` neighbors would raise for this reference.
    """
    for key in labels:
        _reference_column(reference, key)
    for key in values:
        _reference_values(reference, key)
    if not 1 <= k <= reference.n_cells:
        raise ValueError(f"{option('k', k)}: between 1 and the reference's {reference.n_cells} cells")


def majority_vote(
    codes: np.ndarray, n_labels: int, *, seed: int = 0, cell_keys: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Winning label code per row of neighbor label codes, ties broken at random; and its votes.

    The tie-break of a row is drawn from ``(seed, its cell key, the label)`` alone (``cell_keys``:
    one uint64 per row, e.g. :func:`cell_keys` of the cell names; default: the row numbers), so a
    cell's label does not depend on which other cells are voted with it (one query or its shards).
    """
    m = codes.shape[0]
    counts = np.zeros((m, n_labels), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(m), codes.shape[1]), codes.ravel()), 1)
    keys = np.arange(m, dtype=np.uint64) if cell_keys is None else np.asarray(cell_keys, dtype=np.uint64)
    jitter = _uniform(keys[:, None], np.arange(n_labels, dtype=np.uint64)[None, :], seed) * 0.5  # < 1: ties only
    winner = np.argmax(counts + jitter, axis=1)
    return winner, counts[np.arange(m), winner]


def cell_keys(names: pd.Index) -> np.ndarray:
    """A stable 64-bit key per cell name (pandas' fixed-key hash: the same in every process)."""
    return pd.util.hash_array(np.asarray(names, dtype=object).astype(str))


def _uniform(keys: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """Uniform [0, 1) numbers determined by (key, label, seed) through the splitmix64 finalizer."""
    z = keys * np.uint64(0x9E3779B97F4A7C15) + labels * np.uint64(0xBF58476D1CE4E5B9)
    z = z + np.array([seed % 2**64], dtype=np.uint64) * np.uint64(0x94D049BB133111EB)  # arrays wrap silently
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


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


def _neighbors(reference: Reference, query: ad.AnnData, k: int, embedding_key: str) -> np.ndarray:
    """The ``k`` nearest reference cells (rows) of each query cell in the corrected embedding."""
    if embedding_key not in query.obsm:
        raise ValueError(f"the query has no obsm[{embedding_key!r}]; map it first with map_query")
    emb = np.asarray(query.obsm[embedding_key], dtype=np.float64)
    if emb.shape[1] != reference.n_pcs:
        raise ValueError(
            f"obsm[{embedding_key!r}] has {emb.shape[1]} dimensions but the reference has {reference.n_pcs}"
        )
    return reference.neighbor_index().query(emb, k)


def _reference_column(reference: Reference, key: str) -> pd.Series:
    """The reference ``obs`` column ``key``; raises when the reference has no such column or no cells."""
    if reference.embedding is None or reference.obs is None:
        raise ValueError(no_per_cell_data())
    if key not in reference.obs.columns:
        cols = ", ".join(map(repr, reference.obs.columns)) or "(none)"
        raise ValueError(f"{key!r} is not a column of the reference obs; the columns are: {cols}")
    return reference.obs[key]


def _reference_values(reference: Reference, key: str) -> tuple[str, np.ndarray | pd.DataFrame]:
    """``('obs', column)`` or ``('obsm', matrix)`` of numeric values without NaN."""
    if reference.obs is not None and key in reference.obs.columns:
        target, values = "obs", reference.obs[key]
        if not pd.api.types.is_numeric_dtype(values):
            raise ValueError(f"reference obs column {key!r} is not numeric; use transfer_labels for categories")
        values = values.to_numpy(dtype=np.float64)
    elif key in reference.obsm:
        target, values = "obsm", reference.obsm[key]
    elif reference.embedding is None or reference.obs is None:
        raise ValueError(no_per_cell_data())
    else:
        cols = ", ".join(map(repr, reference.obs.columns)) or "(none)"
        keys = ", ".join(map(repr, reference.obsm)) or "(none)"
        raise ValueError(
            f"{key!r} is neither a column of the reference obs nor a reference obsm key; the obs columns "
            f"are: {cols}; the obsm keys: {keys}"
        )
    if np.isnan(np.asarray(values, dtype=np.float64)).any():
        raise ValueError(f"reference {target} {key!r} has missing values; fill or drop them before transfer")
    if len(values) != reference.n_cells:
        raise ValueError(f"reference {target} {key!r} has {len(values)} rows for {reference.n_cells} cells")
    return target, values
