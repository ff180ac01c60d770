"""Seeded k-means (k-means++ start, Lloyd iterations) for Harmony's initial centroids.

Harmony starts from k-means centroids of the cosine-normalized PCs (R: ``kmeans(nstart = 10,
iter.max = 25)``). Every random choice here draws on one generator seeded by the caller; the cells
it sees are chosen by global position, so the result does not depend on how cells are chunked.
"""

from __future__ import annotations

import numpy as np

#: k-means++ seeding looks at no more than this many cells per cluster (a seeded random sample).
SEED_SAMPLE_PER_CLUSTER = 256


def sq_distances(x: np.ndarray, centers: np.ndarray, x_sq: np.ndarray | None = None) -> np.ndarray:
    """Kernel: squared Euclidean distances of rows of ``x`` to ``centers`` (rows x k).

    ``x_sq`` are the squared norms of the rows of ``x``, if known.
    """
    if x_sq is None:
        x_sq = np.einsum("ij,ij->i", x, x)
    d = x @ centers.T
    d *= -2.0
    d += x_sq[:, None]
    d += np.einsum("ij,ij->i", centers, centers)[None, :]
    return np.maximum(d, 0.0, out=d)


def nearest(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest center of each row (argmax of ``x c - |c|^2 / 2``, one product)."""
    score = x @ centers.T
    score -= 0.5 * np.einsum("ij,ij->i", centers, centers)[None, :]
    return np.argmax(score, axis=1)


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur and Vassilvitskii 2007) with two trials per step."""
    n = x.shape[0]
    x_sq = np.einsum("ij,ij->i", x, x)
    centers = np.empty((k, x.shape[1]))
    centers[0] = x[rng.integers(n)]
    closest = sq_distances(x, centers[:1], x_sq).ravel()
    for j in range(1, k):
        total = closest.sum()
        if total <= 0:
            centers[j] = x[rng.integers(n)]
            continue
        candidates = np.searchsorted(np.cumsum(closest), rng.random(2) * total)
        candidates = np.minimum(candidates, n - 1)
        trial = np.minimum(closest[:, None], sq_distances(x, x[candidates], x_sq))
        best = int(np.argmin(trial.sum(0)))
        centers[j] = x[candidates[best]]
        closest = trial[:, best]
    return centers


def lloyd(x: np.ndarray, centers: np.ndarray, max_iter: int) -> tuple[np.ndarray, float]:
    """Lloyd iterations until assignments stop changing; an emptied cluster keeps its center."""
    labels = None
    k = centers.shape[0]
    for _ in range(max_iter):
        new = nearest(x, centers)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        sizes = np.bincount(labels, minlength=k)
        sums = np.stack([np.bincount(labels, weights=x[:, j], minlength=k) for j in range(x.shape[1])], axis=1)
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
