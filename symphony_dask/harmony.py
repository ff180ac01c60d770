"""Harmony integration as in harmony 0.1 (Korsunsky et al. 2019), the version Symphony was built on.

Notation (cells are rows here; the paper's matrices are transposed):

- ``Z`` (n x d) PCs, ``Z_cos`` its rows L2-normalized, ``Y`` (d x k) L2-normalized centroids;
- ``R`` (n x k) soft cluster assignments, ``Phi`` (n x B) one-hot batch design of all batch variables;
- ``O = R^T Phi`` observed and ``E = N_k Pr_b^T`` expected cluster-by-batch counts (k x B).

One Harmony iteration is maximum-diversity soft k-means (until the objective settles) followed by the
mixture-of-experts ridge correction of ``Z``. The clustering step updates ``R`` in blocks of 5% of
the cells in a seeded random order, refreshing ``O`` and ``E`` between blocks, with the diversity
penalty ``((E + 1) / (O + 1)) ** theta`` of harmony 0.1 (newer Harmony versions changed it).

The ridge step groups cells by their *design pattern* (their row of the design with intercept), so
its sufficient statistics are sums over cells of ``R`` and of ``R z`` per pattern: small, and
tree-reducible when cells are split in chunks.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from .checks import as_key_list, check_obs_keys
from .kmeans import kmeans
from .mixture import make_design, remove_batch_terms, ridge_statistics, ridge_system, solve_batch_terms

logger = logging.getLogger("symphony_dask")

Flavor = Literal["harmony1"]
#: Objective window of the clustering convergence test (harmony 0.1).
WINDOW = 3


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


def cosine_normalize(z: np.ndarray, axis: int = 1) -> np.ndarray:
    """Divide each row (``axis=1``) or column (``axis=0``) by its L2 norm; zero vectors stay zero."""
    norm = np.linalg.norm(z, axis=axis, keepdims=True)
    return np.divide(z, norm, out=np.zeros_like(z, dtype=np.float64), where=norm > 0)


def cosine_distance(z_cos: np.ndarray, y_cos: np.ndarray) -> np.ndarray:
    """``2 (1 - cos)`` between unit rows of ``z_cos`` and unit columns of ``y_cos`` (n x k)."""
    return 2.0 * (1.0 - z_cos @ y_cos)


def soft_assign(z_cos: np.ndarray, y_cos: np.ndarray, sigma: float | np.ndarray) -> np.ndarray:
    """Soft k-means assignments ``softmax_k(-2 (1 - cos) / sigma)`` without diversity penalty (n x k)."""
    a = -cosine_distance(z_cos, y_cos) / sigma
    a -= a.max(axis=1, keepdims=True)
    np.exp(a, out=a)
    a /= a.sum(axis=1, keepdims=True)
    return a


def centroids(z_cos: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Unnormalized centroid sums ``Z_cos^T R`` (d x k); tree-reducible over cells."""
    return z_cos.T @ r


def diversity_penalty(e: np.ndarray, o: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """harmony 0.1 penalty ``((E + 1) / (O + 1)) ** theta`` (k x B), theta per batch level."""
    return ((e + 1.0) / (o + 1.0)) ** theta[None, :]


def objective(r: np.ndarray, dist: np.ndarray, sigma: np.ndarray, o: np.ndarray, e: np.ndarray,
              theta: np.ndarray, phi: np.ndarray) -> float:
    """Harmony objective: k-means error + sigma-weighted entropy + diversity cross-entropy."""
    kmeans_error = float(np.sum(r * dist))
    with np.errstate(divide="ignore", invalid="ignore"):
        rlogr = r * np.log(r)
    rlogr[~np.isfinite(rlogr)] = 0.0
    entropy = float(np.sum(rlogr * sigma[None, :]))
    log_ratio = theta[None, :] * np.log((o + 1.0) / (e + 1.0))  # k x B
    cross = float(np.sum((r * sigma[None, :]) * (phi @ log_ratio.T)))
    return kmeans_error + entropy + cross


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


@dataclass
class HarmonyResult:
    """Output of :func:`harmonize`.

    Attributes
    ----------
    Z_corr
        Corrected embedding (cells x d).
    R
        Soft cluster assignments (cells x k), rows sum to one.
    centroids
        Harmony's final L2-normalized centroids ``Y`` (d x k).
    n_iter
        Harmony iterations run.
    objective
        Objective after the initialization and after each iteration's clustering.
    converged
        Whether the Harmony objective met ``epsilon_harmony`` before ``max_iter_harmony``.
    """

    Z_corr: np.ndarray
    R: np.ndarray
    centroids: np.ndarray
    n_iter: int
    objective: list[float] = field(default_factory=list)
    converged: bool = False


def default_n_clusters(n_cells: int) -> int:
    """Symphony's default number of clusters, ``min(100, round(n / 30))`` (at least 1)."""
    return max(1, min(100, int(round(n_cells / 30))))


def harmonize(
    Z: np.ndarray,
    meta: pd.DataFrame,
    batch_keys: str | Sequence[str],
    *,
    n_clusters: int | None = None,
    theta: float | Sequence[float] = 2.0,
    tau: float | Sequence[float] = 0.0,
    sigma: float = 0.1,
    lamb: float | Sequence[float] = 1.0,
    block_size: float = 0.05,
    max_iter_harmony: int = 10,
    max_iter_cluster: int = 200,
    epsilon_cluster: float = 1e-5,
    epsilon_harmony: float = 1e-4,
    n_init: int = 10,
    seed: int = 111,
    flavor: Flavor = "harmony1",
) -> HarmonyResult:
    """Integrate the PCs ``Z`` over the batch variables ``batch_keys`` of ``meta`` with Harmony.

    Parameters
    ----------
    Z
        Cells x d embedding (e.g. PCs).
    meta
        Per-cell annotations, one row per row of ``Z``.
    batch_keys
        Column(s) of ``meta`` to integrate over.
    n_clusters
        Number of soft clusters ``k``; default ``min(100, round(n / 30))``.
    theta, tau, lamb
        Diversity penalty, its small-batch discount, and the ridge penalty: one value, or one per
        batch variable.
    sigma
        Soft k-means entropy regularization.
    block_size
        Fraction of cells updated together in the clustering step.
    max_iter_harmony, max_iter_cluster, epsilon_cluster, epsilon_harmony
        Iteration limits and relative objective tolerances of Harmony and of its clustering.
    n_init
        Number of k-means starts for the initial centroids.
    seed
        Seeds the k-means start and the block order.
    flavor
        ``'harmony1'``: the algorithm of harmony 0.1 used by the Symphony paper.

    Returns
    -------
    HarmonyResult
    """
    if flavor != "harmony1":
        raise ValueError(f"flavor must be 'harmony1', got {flavor!r}")
    keys = as_key_list(batch_keys)
    if not keys:
        raise ValueError("harmonize needs at least one batch key")
    Z = np.asarray(Z, dtype=np.float64)
    if Z.ndim != 2:
        raise ValueError(f"Z must be a cells x d matrix, got shape {Z.shape}")
    if len(meta) != Z.shape[0]:
        raise ValueError(f"meta has {len(meta)} rows but Z has {Z.shape[0]} cells")
    n_bad = int((~np.isfinite(Z)).sum())
    if n_bad:
        raise ValueError(f"Z holds {n_bad} NaN or infinite value(s); Harmony needs finite PCs")
    check_obs_keys(meta, keys, where="meta")
    if not 0 < block_size <= 1:
        raise ValueError(f"block_size must be in (0, 1], got {block_size}")
    n = Z.shape[0]
    k = default_n_clusters(n) if n_clusters is None else int(n_clusters)
    if k < 1 or k > n:
        raise ValueError(f"n_clusters={k} is impossible with {n} cells; try n_clusters={default_n_clusters(n)}")

    design = make_design(meta, keys)
    phi = design.phi
    theta_b, tau_b, lamb_b = (_per_level(v, keys, design.levels, name) for v, name in
                              ((theta, "theta"), (tau, "tau"), (lamb, "lamb")))
    n_b = phi.sum(axis=0)
    _warn_small_batches(design, n_b)
    if np.any(tau_b > 0):  # discount the penalty of batches with few cells per cluster
        discount = 1.0 - np.exp(-((n_b / (k * np.where(tau_b > 0, tau_b, 1.0))) ** 2))
        theta_b = np.where(tau_b > 0, theta_b * discount, theta_b)
    pr_b = n_b / n
    sigma_k = np.full(k, float(sigma))
    penalty = np.concatenate([[0.0], lamb_b])

    rng = np.random.default_rng(seed)
    z_cos = cosine_normalize(Z)
    y = cosine_normalize(kmeans(z_cos, k, n_init=n_init, seed=int(rng.integers(2**31))).T, axis=0)
    dist = cosine_distance(z_cos, y)
    r = np.exp(-dist / sigma_k[None, :])
    r /= r.sum(axis=1, keepdims=True)
    e = np.outer(r.sum(axis=0), pr_b)
    o = r.T @ phi
    obj_kmeans = [objective(r, dist, sigma_k, o, e, theta_b, phi)]
    obj_harmony = [obj_kmeans[-1]]

    z_corr = Z
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter_harmony + 1):
        for it in range(max_iter_cluster):
            y = cosine_normalize(centroids(z_cos, r), axis=0)
            dist = cosine_distance(z_cos, y)
            r, e, o = _update_assignments(r, dist, sigma_k, phi, e, o, pr_b, theta_b, block_size, rng)
            obj_kmeans.append(objective(r, dist, sigma_k, o, e, theta_b, phi))
            if it > WINDOW and _window_converged(obj_kmeans, epsilon_cluster):
                break
        obj_harmony.append(obj_kmeans[-1])
        s, t = ridge_statistics(Z, r, design.codes, len(design.patterns))
        a, b = ridge_system(s, t, design.patterns)
        w = solve_batch_terms(a, b, penalty)
        z_corr = remove_batch_terms(Z, r, design.codes, design.patterns, w)
        z_cos = cosine_normalize(z_corr)
        old, new = obj_harmony[-2], obj_harmony[-1]
        logger.info("Harmony iteration %d: objective %.6g", n_iter, new)
        if (old - new) / abs(old) < epsilon_harmony:
            converged = True
            break
    return HarmonyResult(z_corr, r, y, n_iter, obj_harmony, converged)


def _update_assignments(r, dist, sigma_k, phi, e, o, pr_b, theta_b, block_size, rng):
    """Block-wise assignment update of harmony 0.1: cells leave, get new R, and come back."""
    n = r.shape[0]
    scale_dist = -dist / sigma_k[None, :]
    scale_dist -= scale_dist.max(axis=1, keepdims=True)
    np.exp(scale_dist, out=scale_dist)
    order = rng.permutation(n)
    n_blocks = int(np.ceil(1.0 / block_size))
    per_block = n // n_blocks + 1
    r = r.copy()
    for i in range(n_blocks):
        cells = order[i * per_block : min((i + 1) * per_block, n)]
        if cells.size == 0:
            break
        phi_c = phi[cells]
        e = e - np.outer(r[cells].sum(axis=0), pr_b)
        o = o - r[cells].T @ phi_c
        rc = scale_dist[cells] * (phi_c @ diversity_penalty(e, o, theta_b).T)
        rc /= rc.sum(axis=1, keepdims=True)
        r[cells] = rc
        e = e + np.outer(rc.sum(axis=0), pr_b)
        o = o + rc.T @ phi_c
    return r, e, o


def _window_converged(obj: list[float], epsilon: float) -> bool:
    old = sum(obj[-2 - i] for i in range(WINDOW))
    new = sum(obj[-1 - i] for i in range(WINDOW))
    return (old - new) / abs(old) < epsilon


def _per_level(value, keys, levels, name) -> np.ndarray:
    values = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if values.size == 1:
        values = np.repeat(values, len(keys))
    if values.size != len(keys):
        raise ValueError(f"{name} needs one value or one per batch key ({len(keys)}), got {values.size}")
    per_key = dict(zip(keys, values))
    return np.array([per_key[key] for key, _ in levels])


def _warn_small_batches(design: Design, n_b: np.ndarray) -> None:
    for (key, level), count in zip(design.levels, n_b):
        if count < 2:
            warnings.warn(
                f"batch {level!r} of {key!r} has {int(count)} cell(s); Harmony cannot correct a batch that small",
                UserWarning,
                stacklevel=3,
            )


def soft_kmeans(Z: np.ndarray, n_clusters: int, *, sigma: float = 0.1, max_iter: int = 20, n_init: int = 10,
                seed: int = 111) -> tuple[np.ndarray, np.ndarray]:
    """Soft k-means on cosine-normalized ``Z`` without correction (Symphony with no batch variable).

    Returns the assignments ``R`` (n x k) and the L2-normalized centroids ``Y`` (d x k).
    """
    z_cos = cosine_normalize(np.asarray(Z, dtype=np.float64))
    rng = np.random.default_rng(seed)
    y = cosine_normalize(kmeans(z_cos, n_clusters, n_init=n_init, seed=int(rng.integers(2**31))).T, axis=0)
    for _ in range(max_iter):
        r = soft_assign(z_cos, y, sigma)
        y = cosine_normalize(centroids(z_cos, r), axis=0)
    return r, y
