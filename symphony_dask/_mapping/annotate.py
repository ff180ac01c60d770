"""Transferring reference annotations to mapped query cells, and scoring the result.

Both transfers look up each query cell's k nearest reference cells in the corrected embedding
(Euclidean; :meth:`Reference.neighbor_index`: exact for small references, HNSW for large ones):

- :func:`transfer_labels`: a k-NN vote (k = 5 as R Symphony's ``knnPredict``), uniform or weighted
  by a kernel on the neighbor distances, giving a probability per reference label; the winner is
  the most probable label, ties broken at random with a seeded generator; confidence = the winner's
  probability; below ``min_confidence`` the cell is 'Unassigned' (the paper's 0.6 option). It also
  scores each cell's novelty (:mod:`symphony_dask._mapping.novelty`) and calls cells above a threshold
  'Unknown', votes per query cluster, and keeps several label levels consistent with each other;
- :func:`transfer_values`: the neighbors' mean of continuous annotations, ``obs`` columns (a
  pseudotime) or ``obsm`` matrices (protein levels).
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd

from symphony_dask._io.validation import option
from symphony_dask._mapping import votes
from symphony_dask._mapping.novelty import NOVELTY_K, UNKNOWN_QUANTILE, calibrate, neighbor_distances
from symphony_dask._mapping.novelty import novelty as mean_neighbor_distance
from symphony_dask._reference.model import Reference, no_per_cell_data

logger = logging.getLogger("symphony_dask")

UNASSIGNED = "Unassigned"
#: The label of cells whose novelty is above the threshold of ``unknown``.
UNKNOWN = "Unknown"
#: A query cluster whose most frequent label has a smaller share of its cells is reported as split.
MIN_MAJORITY_SHARE = 0.5

Weights = Literal["uniform", "distance"]


def transfer_labels(
    reference: Reference,
    query: ad.AnnData,
    key: str | Sequence[str],
    *,
    k: int = 5,
    confidence: bool = True,
    seed: int = 0,
    min_confidence: float | None = None,
    embedding_key: str = "X_symphony",
    weights: Weights = "uniform",
    proba: bool = True,
    unknown: Literal["auto"] | float | None = None,
    novelty: bool = False,
    novelty_k: int = NOVELTY_K,
    unknown_quantile: float = UNKNOWN_QUANTILE,
    majority_vote: str | None = None,
    min_majority_share: float = MIN_MAJORITY_SHARE,
    hierarchy: bool = False,
) -> ad.AnnData:
    """Predict ``reference.obs[key]`` for mapped query cells by a k-NN vote.

    Parameters
    ----------
    reference
        Reference with its per-cell ``embedding`` and ``obs``.
    query
        Output of :func:`~symphony_dask.map_query` (uses ``obsm[embedding_key]``).
    key
        Column of ``reference.obs`` to transfer, or several (e.g. ``["l1", "l2"]``, coarse to fine),
        transferred from one neighbor search.
    k
        Number of nearest reference cells that vote.
    confidence
        Also write the winning label's probability (with uniform weights: the fraction of the k
        neighbors that voted for it).
    seed
        Seeds the random breaking of tied votes (a cell's tie-break depends on the seed, its name and
        the label alone, so not on the cells transferred with it).
    min_confidence
        Cells whose confidence is below this are labeled ``'Unassigned'``.
    embedding_key
        ``obsm`` key of the query's corrected embedding.
    weights
        ``'uniform'``: each neighbor's vote counts the same (R Symphony's ``knnPredict``);
        ``'distance'``: a Gaussian kernel on the neighbor distances, ``exp(-d^2 / (2 h^2))`` with
        ``h`` the cell's mean distance to its k neighbors (closer neighbors count more, as scArches'
        weighted k-NN).
    proba
        Also write the probability of every reference label, ``obsm[f'{key}_proba']``.
    unknown
        Label cells whose novelty (mean distance to their ``novelty_k`` nearest reference cells in
        the corrected embedding; :mod:`symphony_dask._mapping.novelty`) is above a threshold
        ``'Unknown'``: ``'auto'`` calibrates the threshold on the reference alone, as the
        ``unknown_quantile`` quantile of the novelty of the reference's own cells, each held out
        and looked up among the others as a query cell would be (about that share of cells of
        states the reference holds stays labeled; a cell type the reference lacks, far from every
        reference cell, is called Unknown; a type close to one the reference holds, such as NK cells
        next to CD8 T cells, only in part). A number is the threshold itself. ``None``: no Unknown.
        'Unknown' overrides 'Unassigned'. The threshold, how it was found and the number of
        Unknown cells are recorded in ``query.uns['symphony'][f'{key}_unknown']``.
    novelty
        Also write the novelty (it is always written with ``unknown``).
    novelty_k
        Reference neighbors whose mean distance is the novelty.
    unknown_quantile
        Quantile of the reference's own novelties that ``unknown='auto'`` takes as threshold.
    majority_vote
        A ``query.obs`` column of query clusters (e.g. ``'leiden'``): ``obs[f'{key}_pred']`` becomes
        each cluster's most frequent per-cell label (Unknown and Unassigned included; ties broken as
        for cells, by the seed, the cluster and the label) and the per-cell label moves to
        ``obs[f'{key}_pred_cell']``. Cells without a cluster (missing values) keep their own label.
        Each cluster's label, its share of the cluster's cells and the cluster's size are recorded
        in ``query.uns['symphony'][f'{key}_majority_vote']``, where ``split`` lists the clusters
        whose label has less than ``min_majority_share`` of their cells (also logged as a warning).
    min_majority_share
        Below this share of its cells, a cluster's vote is reported as split.
    hierarchy
        With several keys, coarse to fine: keep each level's label among those that the reference
        pairs with the label predicted one level up (the probabilities of the other labels are set to 0
        and the rest rescaled; where none of the k neighbors holds an allowed label, the reference's
        own frequencies of the allowed labels are the probabilities).

    Returns
    -------
    AnnData
        ``query``, annotated in place with, for each key, ``obs[f'{key}_pred']`` (categorical), if
        ``confidence`` ``obs[f'{key}_conf']``, if ``proba`` ``obsm[f'{key}_proba']`` (a DataFrame
        with one column per reference label, and an ``'Unknown'`` column with ``unknown``: 1 for
        cells called Unknown, whose label columns are then 0; rows sum to 1), with ``unknown`` or
        ``novelty`` ``obs[f'{key}_novelty']``, and with ``majority_vote``
        ``obs[f'{key}_pred_cell']``.
    """
    keys = [key] if isinstance(key, str) else list(key)
    with_novelty = novelty or unknown is not None
    _check_label_options(reference, keys, weights, unknown, unknown_quantile, novelty_k if with_novelty else None)
    _check_vote_options(query, keys, majority_vote, min_majority_share, hierarchy)
    labels = {name: _reference_labels(reference, name, unknown is not None) for name in keys}
    neighbors = _neighbors(reference, query, max(k, novelty_k) if with_novelty else k, embedding_key)
    distances = None
    if with_novelty or weights == "distance":
        distances = neighbor_distances(reference.embedding, query.obsm[embedding_key], neighbors)
    keys_of_cells = votes.cell_keys(query.obs_names)
    scores = mean_neighbor_distance(distances, novelty_k) if with_novelty else None
    called_unknown = None
    if unknown is not None:
        called_unknown = _call_unknown(reference, query, keys, scores, unknown, novelty_k, unknown_quantile)
    parent = None
    for name in keys:
        codes, n_labels = labels[name].codes[neighbors[:, :k]], len(labels[name].categories)
        if weights == "uniform":
            winner, _ = votes.majority_vote(codes, n_labels, seed=seed, cell_keys=keys_of_cells)
            probabilities = votes.label_weights(codes, n_labels) / k
        else:
            probabilities = votes.label_weights(codes, n_labels, votes.kernel_weights(distances[:, :k]))
            winner = votes.most_probable(probabilities, seed=seed, cell_keys=keys_of_cells)
        if hierarchy and parent is not None:
            probabilities = _within_parent(reference, keys[keys.index(name) - 1], name, labels, parent, probabilities)
            winner = votes.most_probable(probabilities, seed=seed, cell_keys=keys_of_cells)
        conf = probabilities[np.arange(len(winner)), winner]
        predicted = _predicted(labels[name].categories, winner, conf, min_confidence, called_unknown)
        if majority_vote is not None:
            query.obs[f"{name}_pred_cell"] = predicted
            predicted = _vote_per_cluster(query, name, predicted, majority_vote, min_majority_share, seed)
        query.obs[f"{name}_pred"] = predicted
        if confidence:
            query.obs[f"{name}_conf"] = conf
        if proba:
            query.obsm[f"{name}_proba"] = _proba_frame(query, labels[name].categories, probabilities, called_unknown)
        if with_novelty:
            query.obs[f"{name}_novelty"] = scores
        parent = winner
    return query


def transfer_values(
    reference: Reference, query: ad.AnnData, keys: str | Sequence[str], *, k: int = 5, embedding_key: str = "X_symphony"
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
    reference: Reference, *, labels: Sequence[str] = (), values: Sequence[str] = (), k: int = 5, unknown: bool = False
) -> None:
    """Raise, before any mapping, what the transfers of ``labels`` and ``values`` would raise.

    That is what :func:`transfer_labels` of ``labels`` (calling cells Unknown if ``unknown``) and
    :func:`transfer_values` of ``values`` with ``k`` neighbors would raise for this reference.
    """
    for key in labels:
        _reference_labels(reference, key, unknown)
    if unknown and labels and reference.n_cells <= NOVELTY_K:
        raise ValueError(
            f"Unknown cells need more than {NOVELTY_K} reference cells; this reference has {reference.n_cells}"
        )
    for key in values:
        _reference_values(reference, key)
    if not 1 <= k <= reference.n_cells:
        raise ValueError(f"{option('k', k)}: between 1 and the reference's {reference.n_cells} cells")


def _check_label_options(reference, keys, weights, unknown, unknown_quantile, novelty_k) -> None:
    """Raise on label and novelty options of :func:`transfer_labels` that cannot work, before the neighbor search.

    ``novelty_k`` is ``None`` when no novelty is scored.
    """
    if not keys:
        raise ValueError("name at least one reference obs column to transfer")
    if len(set(keys)) < len(keys):
        raise ValueError(f"the keys to transfer repeat a column: {keys}")
    if weights not in ("uniform", "distance"):
        raise ValueError(f"{option('weights', weights)}: 'uniform' or 'distance'")
    if unknown is not None and unknown != "auto" and not _is_number(unknown):
        raise ValueError(f"{option('unknown', unknown)}: 'auto', a novelty threshold (a number) or None")
    if not 0 < unknown_quantile < 1:
        raise ValueError(f"{option('unknown_quantile', unknown_quantile)}: between 0 and 1")
    if novelty_k is not None and reference.n_cells is not None and not 1 <= novelty_k < reference.n_cells:
        raise ValueError(f"{option('novelty_k', novelty_k)}: between 1 and the reference's {reference.n_cells - 1}")


def _check_vote_options(query, keys, majority_vote, min_majority_share, hierarchy) -> None:
    """Raise on the cluster-vote and hierarchy options of :func:`transfer_labels` that cannot work."""
    if majority_vote is not None and majority_vote not in query.obs.columns:
        cols = ", ".join(map(repr, query.obs.columns)) or "(none)"
        raise ValueError(
            f"{option('majority_vote', majority_vote)} is not a column of the query obs; the columns are: {cols}"
        )
    if not 0 < min_majority_share <= 1:
        raise ValueError(f"{option('min_majority_share', min_majority_share)}: above 0 and at most 1")
    if hierarchy and len(keys) < 2:
        raise ValueError(f"{option('hierarchy', True)} needs two or more keys, coarse to fine (e.g. ['l1', 'l2'])")


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and bool(np.isfinite(value))


def _reference_labels(reference: Reference, key: str, unknown: bool) -> pd.Categorical:
    """The reference's labels of ``key`` as a Categorical; raises on missing labels, or an 'Unknown' label."""
    labels = pd.Categorical(_reference_column(reference, key))
    if labels.isna().any():
        raise ValueError(f"reference obs column {key!r} has {int(labels.isna().sum())} missing label(s)")
    if unknown and UNKNOWN in labels.categories:
        raise ValueError(
            f"reference obs column {key!r} has a label {UNKNOWN!r}, which the cells called Unknown would join; "
            "rename it before transferring with unknown"
        )
    return labels


def _call_unknown(reference, query, keys, scores, unknown, novelty_k, quantile) -> np.ndarray:
    """Which cells are Unknown; the threshold and how it was found go to ``query.uns['symphony']``."""
    if unknown == "auto":
        record = calibrate(reference, k=novelty_k, quantile=quantile).record()
    else:
        record = {"threshold": float(unknown), "method": "given", "novelty_k": int(novelty_k)}
    called = scores > record["threshold"]
    record["n_unknown"] = int(called.sum())
    uns = query.uns.setdefault("symphony", {})
    for name in keys:
        uns[f"{name}_unknown"] = dict(record)
    logger.info(
        "%d of %d cells Unknown (novelty above %.4g, %s)",
        called.sum(),
        len(called),
        record["threshold"],
        "calibrated on the reference" if unknown == "auto" else "given",
    )
    return called


def _within_parent(reference, parent_key, key, labels, parent_winner, probabilities) -> np.ndarray:
    """The probabilities of ``key``'s labels restricted to those the reference pairs with each cell's parent label.

    Where no neighbor holds an allowed label, the reference's own frequencies of the allowed labels.
    """
    parent, child = labels[parent_key], labels[key]
    pairs = np.zeros((len(parent.categories), len(child.categories)))
    np.add.at(pairs, (parent.codes, child.codes), 1)
    kept = probabilities * (pairs[parent_winner] > 0)
    total = kept.sum(axis=1, keepdims=True)
    prior = pairs[parent_winner] / pairs[parent_winner].sum(axis=1, keepdims=True)
    return np.where(total > 0, kept / np.where(total > 0, total, 1.0), prior)


def _predicted(categories, winner, conf, min_confidence, called_unknown) -> pd.Categorical:
    """The winning labels, with 'Unassigned' below ``min_confidence`` and 'Unknown' where ``called_unknown``."""
    predicted = pd.Categorical.from_codes(winner, categories=categories)
    if min_confidence is not None:
        predicted = predicted.add_categories([UNASSIGNED]) if UNASSIGNED not in predicted.categories else predicted
        predicted[conf < min_confidence] = UNASSIGNED
    if called_unknown is not None:
        predicted = predicted.add_categories([UNKNOWN])
        predicted[called_unknown] = UNKNOWN
    return predicted


def _proba_frame(query, categories, probabilities, called_unknown) -> pd.DataFrame:
    """The label probabilities as a DataFrame (one column per label, as text); an 'Unknown' column with ``unknown``."""
    columns = [str(c) for c in categories]
    if called_unknown is not None:
        probabilities = np.where(called_unknown[:, None], 0.0, probabilities)
        probabilities = np.column_stack([probabilities, called_unknown.astype(np.float64)])
        columns.append(UNKNOWN)
    return pd.DataFrame(probabilities, index=query.obs_names, columns=columns)


def _vote_per_cluster(query, key, predicted, column, min_share, seed) -> pd.Categorical:
    """Each cluster's most frequent label for all its cells; the vote is recorded, split clusters are logged."""
    clusters = pd.Categorical(query.obs[column])
    names = np.asarray(clusters.categories, dtype=object).astype(str)
    m, n_labels = len(names), len(predicted.categories)
    inside = clusters.codes >= 0
    counts = np.zeros((m, n_labels), dtype=np.int64)
    np.add.at(counts, (clusters.codes[inside], predicted.codes[inside]), 1)
    sizes = counts.sum(axis=1)
    winner = votes.most_probable(counts.astype(np.float64), seed=seed, cell_keys=votes.cell_keys(pd.Index(names)))
    share = np.divide(counts[np.arange(m), winner], sizes, out=np.zeros(m), where=sizes > 0)
    codes = predicted.codes.copy()
    codes[inside] = winner[clusters.codes[inside]]
    present = sizes > 0
    split = present & (share < min_share)
    query.uns.setdefault("symphony", {})[f"{key}_majority_vote"] = {
        "column": column,
        "min_share": float(min_share),
        "clusters": names[present],
        "labels": np.asarray(predicted.categories, dtype=object).astype(str)[winner[present]],
        "shares": share[present],
        "n_cells": sizes[present],
        "split": names[split],
    }
    if split.any():
        logger.warning(
            "%s: the vote of %d query cluster(s) of %r is split (most frequent label below %.0f%% of the cells): %s",
            key,
            split.sum(),
            column,
            100 * min_share,
            ", ".join(
                f"{n} ({s:.0%} {predicted.categories[w]})"
                for n, s, w in zip(names[split], share[split], winner[split], strict=True)
            ),
        )
    return pd.Categorical.from_codes(codes, categories=predicted.categories)


def evaluate(true: pd.Series | np.ndarray, predicted: pd.Series | np.ndarray) -> dict:
    """Accuracy, per-class F1 (over true classes) and median F1, as Symphony's ``evaluate``.

    Parameters
    ----------
    true
        The known label of each cell.
    predicted
        The predicted label of each cell, in the same order.

    Returns
    -------
    dict
        ``accuracy``, ``f1`` (label -> F1, for each true label) and ``median_f1``.
    """
    true = pd.Series(np.asarray(true, dtype=object).astype(str))
    predicted = pd.Series(np.asarray(predicted, dtype=object).astype(str))
    f1 = {}
    for label in sorted(true.unique()):
        tp = int(((true == label) & (predicted == label)).sum())
        n_pred, n_true = int((predicted == label).sum()), int((true == label).sum())
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true
        f1[label] = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
    return {"accuracy": float((true == predicted).mean()), "median_f1": float(np.median(list(f1.values()))), "f1": f1}


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
