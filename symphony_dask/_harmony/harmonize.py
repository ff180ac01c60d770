"""Harmony integration (Korsunsky et al. 2019) as in harmony 0.1, the version Symphony was built on,
or as in Harmony 2 (R harmony 2.0, harmonypy 2.1, scanpy 1.13's default): the public functions.
The loop lives in :mod:`symphony_dask._harmony.driver`, the work on chunks of cells in :mod:`symphony_dask._harmony.chunk` and :mod:`symphony_dask._harmony.cluster.groups`, and the
pure kernels (also used by mapping and compression) in :mod:`symphony_dask._harmony.kernels`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import dask.array as da
import numpy as np
import pandas as pd

from symphony_dask._dask.chunked import one_blas_thread_per_task
from symphony_dask._harmony.driver import HarmonyResult, HarmonyRun, RidgeSettings
from symphony_dask._harmony.mixture import Design, make_design
from symphony_dask._io.validation import as_key_list, check_batch_values, check_obs_keys, option

__all__ = ["HarmonyResult", "default_n_clusters", "harmonize", "soft_kmeans"]

Flavor = Literal["harmony1", "harmony2"]
#: Settings whose default depends on the flavor: harmony 0.1's as Symphony runs it, and harmonypy
#: 2.1's (``lamb=None``: the ridge penalty estimated as ``alpha E``; ``n_init=1``: one k-means++ start).
FLAVOR_DEFAULTS: dict[str, dict[str, float | int | None]] = {
    "harmony1": dict(lamb=1.0, max_iter_cluster=200, epsilon_cluster=1e-5, epsilon_harmony=1e-4, n_init=10),
    "harmony2": dict(
        lamb=None,
        alpha=0.2,
        batch_prop_cutoff=1e-5,
        max_iter_cluster=4,
        epsilon_cluster=1e-3,
        epsilon_harmony=1e-2,
        n_init=1,
    ),
}
#: Settings a flavor does not use.
IGNORED = {"harmony1": ("alpha", "batch_prop_cutoff"), "harmony2": ()}
#: Iterations of Symphony's soft k-means when the reference has no batch variable.
SOFT_KMEANS_ITERATIONS = 20


def flavor_settings(flavor: str, **given: float | Sequence[float] | None) -> dict:
    """The settings in ``given`` with those left ``None`` set to the flavor's defaults
    (:data:`FLAVOR_DEFAULTS`); the settings the flavor does not use are warned about and ``None``.
    """
    if flavor not in FLAVOR_DEFAULTS:
        raise ValueError(f"flavor must be 'harmony1' or 'harmony2', got {flavor!r}")
    for name in IGNORED[flavor]:
        if given.get(name) is not None:
            warnings.warn(f"{name} is a harmony2 setting; flavor={flavor!r} ignores it", UserWarning, stacklevel=3)
    return {
        name: None if name in IGNORED[flavor] else FLAVOR_DEFAULTS[flavor].get(name) if value is None else value
        for name, value in given.items()
    }


@dataclass(frozen=True)
class _Range:
    """The values a Harmony setting may take, as a test and in words, and what the setting does."""

    allows: Callable[[float], bool]
    words: str
    what: str
    integer: bool = False
    per_key: bool = False


#: The numeric Harmony settings :func:`check_harmony_settings` checks (``None`` always stands for
#: the flavor's default, or for ``lamb``, ``alpha`` and ``batch_prop_cutoff``, for "not used").
RANGES = {
    "theta": _Range(lambda v: v >= 0, "at least 0", "the diversity penalty", per_key=True),
    "tau": _Range(lambda v: v >= 0, "at least 0", "the small-batch discount of the penalty", per_key=True),
    "lamb": _Range(lambda v: v >= 0, "at least 0", "the ridge penalty", per_key=True),
    "sigma": _Range(lambda v: v > 0, "greater than 0", "the soft k-means entropy regularization"),
    "alpha": _Range(lambda v: v >= 0, "at least 0", "the factor of the estimated ridge penalty"),
    "batch_prop_cutoff": _Range(
        lambda v: 0 <= v <= 1,
        "between 0 and 1",
        "the share of a cluster below which a batch is left out of its correction",
    ),
    "block_size": _Range(
        lambda v: 0 < v <= 1, "greater than 0 and at most 1", "the fraction of cells updated together"
    ),
    "max_iter_harmony": _Range(lambda v: v >= 1, "at least 1", "the most Harmony iterations", integer=True),
    "max_iter_cluster": _Range(
        lambda v: v >= 1, "at least 1", "the most clustering iterations per Harmony iteration", integer=True
    ),
    "max_iter": _Range(lambda v: v >= 1, "at least 1", "the most soft k-means iterations", integer=True),
    "n_init": _Range(lambda v: v >= 1, "at least 1", "the number of k-means starts", integer=True),
    "epsilon_cluster": _Range(
        lambda v: not np.isnan(v),
        "a number (a negative one never stops early)",
        "the relative tolerance of the clustering objective",
    ),
    "epsilon_harmony": _Range(
        lambda v: not np.isnan(v),
        "a number (a negative one never stops early)",
        "the relative tolerance of Harmony's objective",
    ),
}


def check_harmony_settings(n_keys: int, **settings: float | Sequence[float] | None) -> None:
    """Raise, before any work, when a Harmony setting of :data:`RANGES` is out of its range, or a
    per-key one (``theta``, ``tau``, ``lamb``) has neither one value nor one per batch key (of ``n_keys``).

    Settings are named as the caller spells them (:func:`~symphony_dask._io.validation.option`); ``None``
    (a default) is not checked.
    """
    for name, value in settings.items():
        if value is None:
            continue
        rule = RANGES[name]
        kind = "whole number" if rule.integer else "number"
        try:
            values = np.atleast_1d(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError):
            raise TypeError(
                f"{option(name, value)}: {rule.what} must be a {kind}{', or one per batch key' if rule.per_key else ''}"
            ) from None
        if values.ndim != 1 or (values.size != 1 and not (rule.per_key and values.size == n_keys)):
            expected = f"one value or one per batch key ({n_keys})" if rule.per_key else "one value"
            raise ValueError(f"{option(name, value)}: {rule.what} takes {expected}, got {values.size}")
        for v in values.tolist():
            if not rule.allows(v) or np.isinf(v) or (rule.integer and not v.is_integer()):
                raise ValueError(f"{option(name, value)}: {rule.what} must be a finite {kind} {rule.words}")


def default_n_clusters(n_cells: int) -> int:
    """Symphony's default number of clusters, ``min(100, round(n / 30))`` (at least 1)."""
    return max(1, min(100, int(round(n_cells / 30))))


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
    settings = flavor_settings(
        flavor,
        lamb=lamb,
        alpha=alpha,
        batch_prop_cutoff=batch_prop_cutoff,
        max_iter_cluster=max_iter_cluster,
        epsilon_cluster=epsilon_cluster,
        epsilon_harmony=epsilon_harmony,
        n_init=n_init,
    )
    keys = as_key_list(batch_keys)
    if not keys:
        raise ValueError("harmonize needs at least one batch key")
    if Z.ndim != 2:
        raise ValueError(f"Z must be a cells x d matrix, got shape {Z.shape}")
    n = int(Z.shape[0])
    if len(meta) != n:
        raise ValueError(f"meta has {len(meta)} rows but Z has {n} cells")
    check_obs_keys(meta, keys, where="meta")
    check_batch_values(meta, keys, where="meta")
    check_harmony_settings(
        len(keys),
        theta=theta,
        tau=tau,
        sigma=sigma,
        block_size=block_size,
        max_iter_harmony=max_iter_harmony,
        **settings,
    )
    k = default_n_clusters(n) if n_clusters is None else int(n_clusters)
    check_clusters(k, n)
    theta_k, tau_k = _per_key(theta, keys), _per_key(tau, keys)
    lamb_k = None if settings["lamb"] is None else _per_key(settings["lamb"], keys)
    varying = [key for key in keys if meta[key].nunique() > 1]
    for key in set(keys) - set(varying):
        warnings.warn(
            f"batch variable {key!r} has a single level; there is nothing to integrate over it",
            UserWarning,
            stacklevel=2,
        )
    with one_blas_thread_per_task():
        return _integrate(
            Z,
            meta,
            varying,
            k,
            theta_k,
            tau_k,
            lamb_k,
            sigma=sigma,
            seed=seed,
            flavor=flavor,
            chunk_size=chunk_size,
            n_init=settings["n_init"],
            block_size=block_size,
            alpha=settings["alpha"],
            batch_prop_cutoff=settings["batch_prop_cutoff"],
            max_iter_harmony=max_iter_harmony,
            max_iter_cluster=settings["max_iter_cluster"],
            epsilon_cluster=settings["epsilon_cluster"],
            epsilon_harmony=settings["epsilon_harmony"],
        )


def _integrate(
    Z,
    meta,
    varying,
    k,
    theta_k,
    tau_k,
    lamb_k,
    *,
    sigma,
    seed,
    flavor,
    chunk_size,
    n_init,
    block_size,
    alpha,
    batch_prop_cutoff,
    max_iter_harmony,
    max_iter_cluster,
    epsilon_cluster,
    epsilon_harmony,
) -> HarmonyResult:
    n = int(Z.shape[0])
    if not varying:
        warnings.warn(
            "no batch variable has two levels: clustering by soft k-means without correction", UserWarning, stacklevel=3
        )
        return _soft_kmeans(
            Z,
            make_design(meta, []),
            k,
            sigma=sigma,
            seed=seed,
            chunk_size=chunk_size,
            n_init=n_init,
            max_iter=SOFT_KMEANS_ITERATIONS,
        )
    design = make_design(meta, varying)
    n_b = design.level_counts()
    _warn_small_batches(design, n_b)
    theta_b = np.array([theta_k[key] for key, _ in design.levels])
    tau_b = np.array([tau_k[key] for key, _ in design.levels])
    if np.any(tau_b > 0):  # discount the penalty of batches with few cells per cluster
        discount = 1.0 - np.exp(-((n_b / (k * np.where(tau_b > 0, tau_b, 1.0))) ** 2))
        theta_b = np.where(tau_b > 0, theta_b * discount, theta_b)
    penalty = None if lamb_k is None else np.concatenate([[0.0], [lamb_k[key] for key, _ in design.levels]])
    ridge = RidgeSettings(penalty) if flavor == "harmony1" else RidgeSettings(penalty, alpha, batch_prop_cutoff)
    run = HarmonyRun(
        Z,
        design,
        n_b / n,
        theta_b,
        n_clusters=k,
        sigma=sigma,
        seed=seed,
        n_blocks=int(np.ceil(1.0 / block_size)),
        chunk_size=chunk_size,
        flavor=flavor,
    )
    return run.harmony(
        ridge,
        n_init=n_init,
        max_iter_harmony=max_iter_harmony,
        max_iter_cluster=max_iter_cluster,
        epsilon_cluster=epsilon_cluster,
        epsilon_harmony=epsilon_harmony,
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
    return dict(zip(keys, np.broadcast_to(values, len(keys)).tolist()))


def _warn_small_batches(design: Design, n_b: np.ndarray) -> None:
    for (key, level), count in zip(design.levels, n_b):
        if count < 2:
            warnings.warn(
                f"batch {level!r} of {key!r} has {int(count)} cell(s); Harmony cannot correct a batch that small",
                UserWarning,
                stacklevel=3,
            )
