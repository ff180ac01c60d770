"""Votes of neighbor labels: counts or kernel weights per label, and seeded tie-breaks.

A tie-break never depends on which other cells are voted with a cell.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


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


def label_weights(codes: np.ndarray, n_labels: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Per row of neighbor label codes, the votes of each label (cells x labels).

    With ``weights`` (one per neighbor), each label's share of the row's weight (rows sum to 1).
    """
    m = codes.shape[0]
    rows = np.repeat(np.arange(m), codes.shape[1])
    if weights is None:
        counts = np.zeros((m, n_labels), dtype=np.int64)
        np.add.at(counts, (rows, codes.ravel()), 1)
        return counts
    sums = np.zeros((m, n_labels))
    np.add.at(sums, (rows, codes.ravel()), weights.ravel())
    return sums / sums.sum(axis=1, keepdims=True)


def kernel_weights(distances: np.ndarray) -> np.ndarray:
    """Gaussian kernel ``exp(-d^2 / (2 h^2))`` on each row of distances, ``h`` the row's mean (1 where it is 0)."""
    h = distances.mean(axis=1, keepdims=True)
    scaled = np.divide(distances, h, out=np.zeros_like(distances), where=h > 0)
    return np.exp(-0.5 * scaled**2)


def most_probable(probabilities: np.ndarray, *, seed: int = 0, cell_keys: np.ndarray | None = None) -> np.ndarray:
    """The most probable label of each row; exact ties broken at random as in :func:`majority_vote`."""
    m, n_labels = probabilities.shape
    keys = np.arange(m, dtype=np.uint64) if cell_keys is None else np.asarray(cell_keys, dtype=np.uint64)
    jitter = _uniform(keys[:, None], np.arange(n_labels, dtype=np.uint64)[None, :], seed)
    top = probabilities == probabilities.max(axis=1, keepdims=True)
    return np.argmax(np.where(top, jitter, -1.0), axis=1)


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
