"""Seeded k-means (k-means++ start, Lloyd iterations) for Harmony's initial centroids.

Harmony starts from k-means centroids of the cosine-normalized PCs (R: ``kmeans(nstart = 10,
iter.max = 25)``). Every random choice here draws on one generator seeded by the caller; the cells
it sees are chosen by global position, so the result does not depend on how cells are chunked.
"""

from __future__ import annotations

import numpy as np

#: k-means++ seeding looks at no more than this many cells per cluster (a seeded random sample).
SEED_SAMPLE_PER_CLUSTER = 256


def sq_distances(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Kernel: squared Euclidean distances of rows of ``x`` to ``centers`` (rows x k)."""
    d = (x * x).sum(1)[:, None] - 2.0 * (x @ centers.T) + (centers * centers).sum(1)[None, :]
    return np.maximum(d, 0.0)


def sum_by_label(values: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Sum of the rows of ``values`` (n x m) for each label (n_labels x m); fast for any number of labels."""
    out = np.zeros((n_labels, values.shape[1]))
    if len(labels) == 0:
        return out
    order = np.argsort(labels, kind="stable")
    present, starts = np.unique(labels[order], return_index=True)
    out[present] = np.add.reduceat(values[order], starts, axis=0)
    return out


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur and Vassilvitskii 2007) with two trials per step."""
    n = x.shape[0]
    centers = np.empty((k, x.shape[1]))
    centers[0] = x[rng.integers(n)]
    closest = sq_distances(x, centers[:1]).ravel()
    for j in range(1, k):
        total = closest.sum()
        if total <= 0:
            centers[j] = x[rng.integers(n)]
            continue
        candidates = np.searchsorted(np.cumsum(closest), rng.random(2) * total)
        candidates = np.minimum(candidates, n - 1)
        trial = np.minimum(closest[:, None], sq_distances(x, x[candidates]))
        best = int(np.argmin(trial.sum(0)))
        centers[j] = x[candidates[best]]
        closest = trial[:, best]
    return centers


def lloyd(x: np.ndarray, centers: np.ndarray, max_iter: int) -> tuple[np.ndarray, float]:
    """Lloyd iterations until assignments stop changing; an emptied cluster keeps its center."""
    labels = None
    k = centers.shape[0]
    for _ in range(max_iter):
        d = sq_distances(x, centers)
        new = np.argmin(d, axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        sums = sum_by_label(x, labels, k)
        sizes = np.bincount(labels, minlength=k)
        filled = sizes > 0
        centers = centers.copy()
        centers[filled] = sums[filled] / sizes[filled, None]
    return centers, float(sq_distances(x, centers).min(axis=1).sum())


def kmeans(x: np.ndarray, k: int, *, n_init: int = 10, max_iter: int = 25, seed: int = 0) -> np.ndarray:
    """Best of ``n_init`` seeded k-means runs (lowest inertia); returns the k x d centers."""
    n = x.shape[0]
    n_distinct = len(np.unique(x, axis=0)) if n <= 200_000 else n
    if k > n_distinct:
        raise ValueError(
            f"cannot form {k} clusters from {n_distinct} distinct cells; use n_clusters <= {max(1, n_distinct // 30)}"
        )
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        m = min(n, SEED_SAMPLE_PER_CLUSTER * k)
        sample = x if m == n else x[np.sort(rng.choice(n, m, replace=False))]
        centers, inertia = lloyd(x, kmeans_plus_plus(sample, k, rng), max_iter)
        if inertia < best_inertia:
            best, best_inertia = centers, inertia
    return best
