"""Evaluation metrics of an embedding.

``lisi``: the Local Inverse Simpson's Index (Korsunsky et al. 2019), the effective number of
categories (e.g. batches) among a cell's neighbours, with neighbours weighted by a Gaussian kernel
whose width gives each cell a perplexity of 30. 1 means a single category around the cell; the
number of categories is the maximum (perfect mixing).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

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
        Effective number of neighbours; ``3 * perplexity`` nearest neighbours are searched.

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
    """Row-normalized ``exp(-beta_i d_ij)`` with each ``beta_i`` set by bisection so that the
    entropy of row i is ``log(perplexity)``."""
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
        beta = np.where(up, np.where(np.isinf(hi), beta * 2.0, (beta + hi) / 2.0),
                        np.where(np.isinf(lo), beta / 2.0, (beta + lo) / 2.0))
    p = np.exp(-dist * beta[:, None])
    return p / p.sum(axis=1, keepdims=True)
