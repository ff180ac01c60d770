"""Harmony integration (Korsunsky et al.

2019) as in harmony 0.1, the version Symphony was built on, or as in Harmony 2 (R harmony 2.0, harmonypy 2.1,
scanpy 1.13's default): the public functions. The loop lives in :mod:`symphony_dask._harmony.driver`, the work
on chunks of cells in :mod:`symphony_dask._harmony.chunk` and :mod:`symphony_dask._harmony.cluster.groups`,
and the pure kernels (also used by mapping and compression) in :mod:`symphony_dask._harmony.kernels`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import dask.array as da
import numpy as np
import pandas as pd

from symphony_dask._dask.chunked import one_blas_thread_per_task
from symphony_dask._harmony.driver import HarmonyRun, RidgeSettings
from symphony_dask._harmony.mixture import Design, make_design
from symphony_dask._harmony.result import HarmonyResult
from symphony_dask._harmony.settings import Flavor, HarmonySettings, check_harmony_settings
from symphony_dask._io.validation import as_key_list, check_batch_values, check_obs_keys, option

__all__ = ["Flavor", "HarmonyResult", "HarmonySettings", "default_n_clusters", "harmonize", "soft_kmeans"]

#: Iterations of Symphony's soft k-means when the reference has no batch variable.
SOFT_KMEANS_ITERATIONS = 20


def default_n_clusters(n_cells: int) -> int:
    """Symphony's default number of clusters, ``min(100, round(n / 30))`` (at least 1)."""
    return max(1, min(100, round(n_cells / 30)))


def harmonize(
    Z: np.ndarray | da.Array,
    meta: pd.DataFrame,
    batch_keys: str | Sequence[str],
    *,
    n_clusters: int | None = None,
    theta: float | Sequence[float] = 2.0,
    tau: float | Sequence[float] = 0.0,
    sigma: float = 0.1,
    lamb: float | Sequence[float] | None = None,
    alpha: float | None = None,
    batch_prop_cutoff: float | None = None,
    block_size: float = 0.05,
    max_iter_harmony: int = 10,
    max_iter_cluster: int | None = None,
    epsilon_cluster: float | None = None,
    epsilon_harmony: float | None = None,
    n_init: int | None = None,
    seed: int = 111,
    flavor: Flavor = "harmony1",
    chunk_size: int | None = None,
) -> HarmonyResult:
    """Integrate the embedding ``Z`` over the batch variables ``batch_keys`` of ``meta`` with Harmony.

    Parameters
    ----------
    Z
        Cells x d embedding (e.g. PCs), a NumPy or dask array.
    meta
        Per-cell annotations, one row per row of ``Z``.
    batch_keys
        Column(s) of ``meta`` to integrate over. A column with a single level is ignored (with a
        warning); with none left, ``Z`` is clustered by soft k-means and not corrected. Each must
        name groups of cells, as for :func:`~symphony_dask.build_reference`.
    n_clusters
        Number of soft clusters ``k``; default ``min(100, round(n / 30))``.
    theta, tau
        Diversity penalty and its small-batch discount: one value, or one per batch variable.
    lamb
        Ridge penalty: one value, or one per batch variable. Default: 1 for harmony1; for harmony2
        estimated per cluster and batch as ``alpha`` times the batch's expected cells in the cluster
        (a value given fixes it, as in harmonypy).
    alpha, batch_prop_cutoff
        harmony2 only (default 0.2 and 1e-5): the factor of the estimated ridge penalty, and the
        share of a cluster at or below which a batch is left out of that cluster's correction.
    sigma
        Soft k-means entropy regularization.
    block_size
        Fraction of cells updated together in the clustering step.
    max_iter_harmony, max_iter_cluster, epsilon_cluster, epsilon_harmony
        Iteration limits and relative objective tolerances of Harmony and of its clustering
        (a negative epsilon never stops early). Defaults: harmony1 200, 1e-5 and 1e-4; harmony2
        4, 1e-3 and 1e-2.
    n_init
        Number of k-means starts for the initial centroids: 10 for harmony1 (as R), 1 for harmony2
        (as harmonypy 2.1).
    seed
        Seeds the k-means start and the block draws.
    flavor
        ``'harmony1'``: the algorithm of harmony 0.1 used by the Symphony paper. ``'harmony2'``: R
        harmony 2.0's and harmonypy 2.1's, with their defaults (a stabilised diversity penalty,
        centroids from the ridge intercepts, an estimated ridge penalty, small batches left out of
        a cluster's correction; see :mod:`symphony_dask._harmony.driver`). harmony1 ignores ``alpha``
        and ``batch_prop_cutoff`` (with a warning when given); harmony2 uses every setting.
    chunk_size
        Cells per chunk: rechunks a dask ``Z``; splits a NumPy ``Z`` (default: a dask ``Z`` keeps its
        chunks, a NumPy ``Z`` is one chunk). Results do not depend on it beyond round-off, nor on the
        scheduler, the number of threads or workers.

    Returns
    -------
    HarmonyResult
        NumPy arrays for a NumPy ``Z``; dask arrays with ``Z``'s row chunks for a dask ``Z``.
    """
    keys = as_key_list(batch_keys)
    if not keys:
        raise ValueError("harmonize needs at least one batch key")
    settings = HarmonySettings.from_arguments(locals(), flavor=flavor).resolved(len(keys))
    return harmonize_with(Z, meta, keys, settings, n_clusters=n_clusters, chunk_size=chunk_size)


def harmonize_with(
    Z: np.ndarray | da.Array,
    meta: pd.DataFrame,
    keys: list[str],
    settings: HarmonySettings,
    *,
    n_clusters: int | None = None,
    chunk_size: int | None = None,
) -> HarmonyResult:
    """:func:`harmonize` with its settings resolved (:meth:`HarmonySettings.resolved`) and checked."""
    if Z.ndim != 2:
        raise ValueError(f"Z must be a cells x d matrix, got shape {Z.shape}")
    n = int(Z.shape[0])
    if len(meta) != n:
        raise ValueError(f"meta has {len(meta)} rows but Z has {n} cells")
    check_obs_keys(meta, keys, where="meta")
    check_batch_values(meta, keys, where="meta")
    k = default_n_clusters(n) if n_clusters is None else int(n_clusters)
    check_clusters(k, n)
    varying = [key for key in keys if meta[key].nunique() > 1]
    for key in set(keys) - set(varying):
        warnings.warn(
            f"batch variable {key!r} has a single level; there is nothing to integrate over it",
            UserWarning,
            stacklevel=3,
        )
    with one_blas_thread_per_task():
        return _integrate(Z, meta, keys, varying, k, settings, chunk_size)


def _integrate(Z, meta, keys, varying, k, settings: HarmonySettings, chunk_size) -> HarmonyResult:
    n = int(Z.shape[0])
    if not varying:
        warnings.warn(
            "no batch variable has two levels: clustering by soft k-means without correction", UserWarning, stacklevel=4
        )
        return _soft_kmeans(
            Z,
            make_design(meta, []),
            k,
            sigma=settings.sigma,
            seed=settings.seed,
            chunk_size=chunk_size,
            n_init=settings.n_init,
            max_iter=SOFT_KMEANS_ITERATIONS,
        )
    theta_k, tau_k = _per_key(settings.theta, keys), _per_key(settings.tau, keys)
    lamb_k = None if settings.lamb is None else _per_key(settings.lamb, keys)
    design = make_design(meta, varying)
    n_b = design.level_counts()
    _warn_small_batches(design, n_b)
    theta_b = np.array([theta_k[key] for key, _ in design.levels])
    tau_b = np.array([tau_k[key] for key, _ in design.levels])
    if np.any(tau_b > 0):  # discount the penalty of batches with few cells per cluster
        discount = 1.0 - np.exp(-((n_b / (k * np.where(tau_b > 0, tau_b, 1.0))) ** 2))
        theta_b = np.where(tau_b > 0, theta_b * discount, theta_b)
    penalty = None if lamb_k is None else np.concatenate([[0.0], [lamb_k[key] for key, _ in design.levels]])
    if settings.flavor == "harmony1":
        ridge = RidgeSettings(penalty)
    else:
        ridge = RidgeSettings(penalty, settings.alpha, settings.batch_prop_cutoff)
    run = HarmonyRun(
        Z,
        design,
        n_b / n,
        theta_b,
        n_clusters=k,
        sigma=settings.sigma,
        seed=settings.seed,
        n_blocks=int(np.ceil(1.0 / settings.block_size)),
        chunk_size=chunk_size,
        flavor=settings.flavor,
    )
    return run.harmony(
        ridge,
        n_init=settings.n_init,
        max_iter_harmony=settings.max_iter_harmony,
        max_iter_cluster=settings.max_iter_cluster,
        epsilon_cluster=settings.epsilon_cluster,
        epsilon_harmony=settings.epsilon_harmony,
    )


def soft_kmeans(
    Z: np.ndarray | da.Array,
    n_clusters: int,
    *,
    sigma: float = 0.1,
    max_iter: int = SOFT_KMEANS_ITERATIONS,
    n_init: int = 10,
    seed: int = 111,
    chunk_size: int | None = None,
) -> HarmonyResult:
    """Soft k-means on cosine-normalized ``Z`` without correction (Symphony with no batch variable).

    ``max_iter`` alternations of ``R = softmax(-dist / sigma)`` and ``Y = normalize(Z_cos^T R)`` from
    a k-means start, as R Symphony's ``soft_kmeans``; ``Z_corr`` is ``Z``.
    """
    n = int(Z.shape[0])
    check_clusters(int(n_clusters), n)
    check_harmony_settings(0, sigma=sigma, max_iter=max_iter, n_init=n_init)
    with one_blas_thread_per_task():
        return _soft_kmeans(
            Z,
            make_design(pd.DataFrame(index=range(n)), []),
            int(n_clusters),
            sigma=sigma,
            seed=seed,
            chunk_size=chunk_size,
            n_init=n_init,
            max_iter=max_iter,
        )


def _soft_kmeans(Z, design: Design, k: int, *, sigma, seed, chunk_size, n_init, max_iter) -> HarmonyResult:
    run = HarmonyRun(
        Z, design, np.array([]), np.array([]), n_clusters=k, sigma=sigma, seed=seed, n_blocks=1, chunk_size=chunk_size
    )
    return run.soft_kmeans(n_init, max_iter)


def check_clusters(k: int, n: int) -> None:
    """Raise, naming a number that works, unless ``1 <= k <= n``."""
    if not 1 <= k <= n:
        raise ValueError(
            f"{option('n_clusters', k)} is impossible with {n} cells; try {option('n_clusters', default_n_clusters(n))}"
        )


def _per_key(value, keys: list[str]) -> dict[str, float]:
    """Each key's value of a setting given as one value or one per key (see :func:`check_harmony_settings`)."""
    values = np.atleast_1d(np.asarray(value, dtype=np.float64))
    return dict(zip(keys, np.broadcast_to(values, len(keys)).tolist(), strict=True))


def _warn_small_batches(design: Design, n_b: np.ndarray) -> None:
    for (key, level), count in zip(design.levels, n_b, strict=True):
        if count < 2:
            warnings.warn(
                f"batch {level!r} of {key!r} has {int(count)} cell(s); Harmony cannot correct a batch that small",
                UserWarning,
                stacklevel=3,
            )
