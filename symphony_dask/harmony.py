"""Harmony integration as in harmony 0.1 (Korsunsky et al. 2019), the version Symphony was built on,
run over row chunks of cells with tree-reduced sufficient statistics.

Notation (cells are rows here; the paper's matrices are transposed):

- ``Z`` (n x d) PCs, ``Z_cos`` its rows L2-normalized, ``Y`` (d x k) L2-normalized centroids;
- ``R`` (n x k) soft cluster assignments, ``Phi`` (n x B) one-hot batch design of all batch variables;
- ``O = R^T Phi`` observed and ``E = N_k Pr_b^T`` expected cluster-by-batch counts (k x B).

Start: seeded k-means on ``Z_cos`` (:mod:`symphony_dask.kmeans`), then ``R = softmax(-dist / sigma)``.
One Harmony iteration is maximum-diversity soft k-means until its objective settles (window of 3,
``epsilon_cluster``), then the mixture-of-experts ridge correction of ``Z``. Each clustering
iteration recomputes ``Y`` from ``Z_cos`` and ``R`` and updates ``R`` block by block (5% of cells per
block), with O and E refreshed between blocks and the diversity penalty ``((E + 1) / (O + 1)) ** theta``
of harmony 0.1 (newer Harmony versions changed it). Harmony stops when its objective improves by
less than ``epsilon_harmony`` (relative).

Every step is a map over chunks (:class:`~symphony_dask.harmony_chunk.HarmonyChunk`) plus a tree
reduction of sums whose size depends on k, d and the batches only; the per-cell arrays stay in the
chunks (on the workers of a distributed cluster). The client holds ``Y``, the pattern sums ``S``
(from which O and E follow), the ridge systems and the objective history.
"""

from __future__ import annotations

import logging
import operator
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import pandas as pd

from .checks import as_key_list, check_obs_keys
from .chunked import TaskGraph, fold, one_blas_thread_per_task
from .harmony_chunk import HarmonyChunk, Stepped, Sums
from .kmeans import SEED_SAMPLE_PER_CLUSTER, kmeans
from .mixture import Design, make_design, ridge_system, solve_batch_terms
from .timing import timed

logger = logging.getLogger("symphony_dask")

Flavor = Literal["harmony1"]
#: Objective window of the clustering convergence test (harmony 0.1).
WINDOW = 3
#: Most cells per chunk when ``Z`` is a NumPy array and no ``chunk_size`` is given (fewer when
#: that leaves a dask thread without a chunk).
DEFAULT_CHUNK_SIZE = 250_000
#: Fewest cells per chunk worth a task of their own.
MIN_CHUNK_SIZE = 20_000
#: Iterations of Symphony's soft k-means when the reference has no batch variable.
SOFT_KMEANS_ITERATIONS = 20


# ----------------------------------------------------------------------------------------------
# small kernels (also used by mapping)
# ----------------------------------------------------------------------------------------------


def cosine_normalize(z: np.ndarray, axis: int = 1) -> np.ndarray:
    """Divide each row (``axis=1``) or column (``axis=0``) by its L2 norm; zero vectors stay zero."""
    norm = np.linalg.norm(z, axis=axis, keepdims=True)
    return np.divide(z, norm, out=np.zeros_like(z, dtype=np.float64), where=norm > 0)


def soft_assign(z_cos: np.ndarray, y_cos: np.ndarray, sigma: float | np.ndarray) -> np.ndarray:
    """Soft k-means assignments ``softmax_k(-2 (1 - cos) / sigma)`` without diversity penalty (n x k)."""
    a = -2.0 * (1.0 - z_cos @ y_cos) / sigma
    a -= a.max(axis=1, keepdims=True)
    np.exp(a, out=a)
    a /= a.sum(axis=1, keepdims=True)
    return a


def pattern_penalty(s: np.ndarray, patterns: np.ndarray, pr_b: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Diversity penalty of each design pattern (p x k) from the pattern sums ``S`` (p x k).

    ``O = S^T X`` and ``E = N_k Pr_b^T`` (k x B); harmony 0.1's penalty ``((E + 1) / (O + 1)) ** theta``
    is summed over the batches of a pattern (one batch per variable).
    """
    phi = patterns[:, 1:]
    if phi.shape[1] == 0:  # no batch variable: plain soft k-means
        return np.ones_like(s)
    o = s.T @ phi
    e = np.outer(s.sum(axis=0), pr_b)
    return phi @ (((e + 1.0) / (o + 1.0)) ** theta[None, :]).T


def cross_entropy(s: np.ndarray, patterns: np.ndarray, pr_b: np.ndarray, theta: np.ndarray, sigma: float) -> float:
    """Diversity term of the objective, ``sigma sum_kb theta_b log((O+1)/(E+1))_kb O_kb``."""
    phi = patterns[:, 1:]
    o = s.T @ phi
    e = np.outer(s.sum(axis=0), pr_b)
    return float(sigma * (theta[None, :] * np.log((o + 1.0) / (e + 1.0)) * o).sum())


# ----------------------------------------------------------------------------------------------
# result and public function
# ----------------------------------------------------------------------------------------------


class HarmonyResult:
    """Output of :func:`harmonize`.

    Attributes
    ----------
    Z_corr
        Corrected embedding (cells x d); a dask array with the row chunks of a dask input.
    R
        Soft cluster assignments (cells x k) after the last clustering iteration, rows sum to one;
        chunked like ``Z_corr``. Harmony never stores them for all cells: they are recomputed from
        the embedding, the centroids and the block penalties when first asked for.
    centroids
        Harmony's final L2-normalized centroids ``Y`` (d x k).
    n_iter
        Harmony iterations run.
    objective
        Objective after the initialization and after each iteration's clustering.
    converged
        Whether the Harmony objective met ``epsilon_harmony`` before ``max_iter_harmony``.
    timings_s
        Wall time of the k-means start, the clustering and the correction.
    """

    def __init__(self, Z_corr, R, centroids, n_iter, objective, converged, timings_s) -> None:
        self.Z_corr = Z_corr
        self._R = R
        self.centroids = centroids
        self.n_iter = n_iter
        self.objective = objective
        self.converged = converged
        self.timings_s = timings_s

    @property
    def R(self) -> np.ndarray | da.Array:
        if callable(self._R):
            self._R = self._R()
        return self._R

    def __repr__(self) -> str:
        return (f"HarmonyResult({self.Z_corr.shape[0]} cells, k={self.centroids.shape[1]}, n_iter={self.n_iter}, "
                f"converged={self.converged})")


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
    lamb: float | Sequence[float] = 1.0,
    block_size: float = 0.05,
    max_iter_harmony: int = 10,
    max_iter_cluster: int = 200,
    epsilon_cluster: float = 1e-5,
    epsilon_harmony: float = 1e-4,
    n_init: int = 10,
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
        warning); with none left, ``Z`` is clustered by soft k-means and not corrected.
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
        Iteration limits and relative objective tolerances of Harmony and of its clustering
        (a negative epsilon never stops early).
    n_init
        Number of k-means starts for the initial centroids (R uses 10).
    seed
        Seeds the k-means start and the block draws.
    flavor
        ``'harmony1'``: the algorithm of harmony 0.1 used by the Symphony paper.
    chunk_size
        Cells per chunk: rechunks a dask ``Z``; splits a NumPy ``Z`` (default: up to 250,000 cells,
        one chunk per dask thread at least, chunks of 20,000 cells at least).
        Results do not depend on it beyond round-off.

    Returns
    -------
    HarmonyResult
        NumPy arrays for a NumPy ``Z``; dask arrays with ``Z``'s row chunks for a dask ``Z``.
    """
    if flavor != "harmony1":
        raise ValueError(f"flavor must be 'harmony1', got {flavor!r}")
    keys = as_key_list(batch_keys)
    if not keys:
        raise ValueError("harmonize needs at least one batch key")
    if Z.ndim != 2:
        raise ValueError(f"Z must be a cells x d matrix, got shape {Z.shape}")
    n = int(Z.shape[0])
    if len(meta) != n:
        raise ValueError(f"meta has {len(meta)} rows but Z has {n} cells")
    check_obs_keys(meta, keys, where="meta")
    if not 0 < block_size <= 1:
        raise ValueError(f"block_size must be in (0, 1], got {block_size}")
    if max_iter_harmony < 1 or max_iter_cluster < 1:
        raise ValueError("max_iter_harmony and max_iter_cluster must be at least 1")
    k = default_n_clusters(n) if n_clusters is None else int(n_clusters)
    _check_clusters(k, n)
    theta_k, tau_k, lamb_k = (_per_key(v, keys, name) for v, name in ((theta, "theta"), (tau, "tau"), (lamb, "lamb")))
    varying = [key for key in keys if meta[key].nunique() > 1]
    for key in set(keys) - set(varying):
        warnings.warn(f"batch variable {key!r} has a single level; there is nothing to integrate over it",
                      UserWarning, stacklevel=2)
    with one_blas_thread_per_task():
        return _integrate(Z, meta, varying, k, theta_k, tau_k, lamb_k, sigma=sigma, seed=seed,
                          chunk_size=chunk_size, n_init=n_init, block_size=block_size,
                          max_iter_harmony=max_iter_harmony, max_iter_cluster=max_iter_cluster,
                          epsilon_cluster=epsilon_cluster, epsilon_harmony=epsilon_harmony)


def _integrate(Z, meta, varying, k, theta_k, tau_k, lamb_k, *, sigma, seed, chunk_size, n_init, block_size,
               max_iter_harmony, max_iter_cluster, epsilon_cluster, epsilon_harmony) -> HarmonyResult:
    n = int(Z.shape[0])
    run = _Run(Z, n_clusters=k, sigma=sigma, seed=seed, chunk_size=chunk_size)
    if not varying:
        warnings.warn("no batch variable has two levels: clustering by soft k-means without correction",
                      UserWarning, stacklevel=2)
        run.set_design(make_design(meta, []), np.array([]), np.array([]))
        return run.soft_kmeans(n_init, SOFT_KMEANS_ITERATIONS)
    design = make_design(meta, varying)
    n_b = design.level_counts()
    _warn_small_batches(design, n_b)
    theta_b = np.array([theta_k[key] for key, _ in design.levels])
    tau_b = np.array([tau_k[key] for key, _ in design.levels])
    if np.any(tau_b > 0):  # discount the penalty of batches with few cells per cluster
        discount = 1.0 - np.exp(-((n_b / (k * np.where(tau_b > 0, tau_b, 1.0))) ** 2))
        theta_b = np.where(tau_b > 0, theta_b * discount, theta_b)
    ridge_penalty = np.concatenate([[0.0], [lamb_k[key] for key, _ in design.levels]])
    run.set_design(design, n_b / n, theta_b, n_blocks=int(np.ceil(1.0 / block_size)))
    return run.harmony(
        ridge_penalty, n_init=n_init, max_iter_harmony=max_iter_harmony,
        max_iter_cluster=max_iter_cluster, epsilon_cluster=epsilon_cluster, epsilon_harmony=epsilon_harmony,
    )


def soft_kmeans(Z: np.ndarray | da.Array, n_clusters: int, *, sigma: float = 0.1,
                max_iter: int = SOFT_KMEANS_ITERATIONS, n_init: int = 10, seed: int = 111,
                chunk_size: int | None = None) -> HarmonyResult:
    """Soft k-means on cosine-normalized ``Z`` without correction (Symphony with no batch variable).

    ``max_iter`` alternations of ``R = softmax(-dist / sigma)`` and ``Y = normalize(Z_cos^T R)`` from
    a k-means start, as R Symphony's ``soft_kmeans``; ``Z_corr`` is ``Z``.
    """
    n = int(Z.shape[0])
    _check_clusters(int(n_clusters), n)
    with one_blas_thread_per_task():
        run = _Run(Z, n_clusters=int(n_clusters), sigma=sigma, seed=seed, chunk_size=chunk_size)
        run.set_design(make_design(pd.DataFrame(index=range(n)), []), np.array([]), np.array([]))
        return run.soft_kmeans(n_init, max_iter)


# ----------------------------------------------------------------------------------------------
# the chunked run
# ----------------------------------------------------------------------------------------------


def _step(handle: HarmonyChunk | Stepped, method: str, *args: Any) -> Stepped:
    state = handle.state if isinstance(handle, Stepped) else handle
    out = getattr(state, method)(*args)
    return out if isinstance(out, Stepped) else Stepped(state, out)


def _result(handle: Stepped) -> Any:
    return handle.result


def _output(handle: HarmonyChunk | Stepped, method: str, *args: Any) -> np.ndarray:
    return getattr(handle.state if isinstance(handle, Stepped) else handle, method)(*args)


@dataclass
class _Ledger:
    """The bookkeeping of one clustering iteration, carried from block to block.

    ``old`` and ``new`` hold ``sum R`` per block and pattern before and after this iteration's
    updates; ``s`` is the current total with block ``current``'s cells taken out, ``penalty`` the
    diversity penalty per pattern from it, and ``penalties`` the penalty each block saw (from which
    the blocks' assignments can be recomputed); ``logw`` and ``logz`` accumulate the entropy terms
    and ``centroid_sums`` the new centroid sums.
    """

    old: np.ndarray
    new: np.ndarray
    penalties: np.ndarray
    current: int
    s: np.ndarray
    penalty: np.ndarray
    logw: float = 0.0
    logz: float = 0.0
    centroid_sums: np.ndarray | float = 0.0


def _first_block(old: np.ndarray, first: int, consts: tuple) -> _Ledger:
    s = old.sum(axis=0) - old[first]
    penalty = pattern_penalty(s, *consts)
    penalties = np.empty_like(old)
    penalties[first] = penalty
    return _Ledger(old, old.copy(), penalties, first, s, penalty)


def _next_block(ledger: _Ledger, following: int | None, consts: tuple, *parts: Sums) -> _Ledger:
    """Put the current block's cells back with their new assignments and take the following block's out."""
    done = fold(Sums.merge, *parts)
    new = ledger.new.copy()
    new[ledger.current] = done.s
    s = ledger.s + done.s
    logw = ledger.logw + float((done.s * np.log(ledger.penalty)).sum())
    out = _Ledger(ledger.old, new, ledger.penalties, ledger.current, s, ledger.penalty, logw,
                  ledger.logz + done.logz, ledger.centroid_sums + done.centroid_sums)
    if following is not None:
        out.current = following
        out.s = s - ledger.old[following]
        out.penalty = pattern_penalty(out.s, *consts)
        out.penalties = ledger.penalties.copy()
        out.penalties[following] = out.penalty
    return out


def _iteration_sums(ledger: _Ledger) -> tuple:
    return ledger.new, ledger.penalties, ledger.logw, ledger.logz, ledger.centroid_sums


class _Run:
    """One Harmony (or soft k-means) run: chunk states and the loop over them."""

    def __init__(self, Z, *, n_clusters: int, sigma: float, seed: int, chunk_size: int | None) -> None:
        self.lazy = isinstance(Z, da.Array)
        if self.lazy:
            Z = Z.rechunk({0: chunk_size, 1: -1}) if chunk_size else Z.rechunk({1: -1})
            sizes = Z.chunks[0]
            blocks = list(Z.to_delayed().ravel())
        else:
            Z = np.asarray(Z, dtype=np.float64)
            step = chunk_size or _default_chunk_size(len(Z))
            sizes = tuple(min(step, len(Z) - a) for a in range(0, len(Z), step))
            blocks = [Z[a : a + s] for a, s in zip(np.cumsum((0,) + sizes[:-1]), sizes)]
        self.sizes = sizes
        self.offsets = np.cumsum((0,) + sizes[:-1])
        self.blocks = blocks
        self.n, self.d = int(Z.shape[0]), int(Z.shape[1])
        self.k = n_clusters
        self.sigma = float(sigma)
        self.rng = np.random.default_rng(seed)
        self.states: list[Any] = []
        self.timings: dict[str, float] = {}
        # one in-memory chunk without a distributed client: the steps run here, without a scheduler
        self.inline = not self.lazy and len(sizes) == 1 and not _distributed_client_active()

    def set_design(self, design: Design, pr_b: np.ndarray, theta_b: np.ndarray, n_blocks: int = 1) -> None:
        """Create the chunk states (persisted) and check the values of ``Z``."""
        self.design, self.pr_b, self.theta_b = design, pr_b, theta_b
        self.n_blocks = n_blocks
        n_patterns = len(design.patterns)
        key = int(self.rng.integers(2**62))
        create = HarmonyChunk.create if self.inline else dask.delayed(HarmonyChunk.create, pure=False)
        self.states = [
            create(block, design.codes[a : a + s], int(a), n_patterns, n_blocks, key)
            for block, a, s in zip(self.blocks, self.offsets, self.sizes)
        ]
        n_bad = self._reduce("n_nonfinite", combine=operator.add)
        if n_bad:
            raise ValueError(f"Z holds {n_bad} NaN or infinite value(s); Harmony needs finite PCs")

    # -- plumbing --------------------------------------------------------------------------------

    def _graph(self) -> tuple[TaskGraph, list]:
        if self.inline:  # the states are the objects themselves
            return TaskGraph(), list(self.states)
        g = TaskGraph(self.states)
        return g, [h.key for h in self.states]

    def _apply(self, g: TaskGraph, handles: list, method: str, *args: Any) -> tuple[list, list]:
        """One step on every chunk: the new state handles, and keys of the step's results alone
        (so that reducing them never moves a chunk's state between workers)."""
        handles = [g.task(_step, h, method, *args) for h in handles]
        return handles, [g.task(_result, h) for h in handles]

    def _persist(self, g: TaskGraph, handles: list, *keys) -> tuple:
        """Run the graph: keep the chunk states where they are, bring the small results here.

        A single in-memory chunk without a distributed client runs in this thread (nothing to
        parallelize, and no scheduling overhead for Harmony's many small steps): the same steps.
        """
        if self.inline:
            values = g.run([*handles, *keys])
            self.states = values[: len(handles)]
            return tuple(values[len(handles) :])
        persisted = dask.persist(*(g.delayed(h) for h in handles), *(g.delayed(k) for k in keys))
        self.states = list(persisted[: len(handles)])
        return dask.compute(*persisted[len(handles) :])

    def _reduce(self, method: str, *args: Any, combine) -> Any:
        """One step on every chunk and the tree reduction of its results."""
        g, handles = self._graph()
        handles, results = self._apply(g, handles, method, *args)
        return self._persist(g, handles, g.reduce(results, combine))[0]

    def _gather(self, method: str, width: int, *args: Any) -> np.ndarray | da.Array:
        """A per-cell output of the chunks (``method`` of each state), in the original cell order:
        a dask array over the chunks for a dask input, one NumPy array otherwise."""
        get = dask.delayed(_output, pure=False)
        parts = [get(st, method, *args) for st in self.states]
        if self.lazy:
            return da.concatenate(
                [da.from_delayed(p, shape=(s, width), dtype=np.float64) for p, s in zip(parts, self.sizes)], axis=0
            )
        out = np.empty((self.n, width))
        for part, a, s in zip(parts, self.offsets, self.sizes):
            out[a : a + s] = part.compute(scheduler="sync" if self.inline else None)
        return out

    # -- k-means start ---------------------------------------------------------------------------

    def kmeans_start(self, n_init: int, max_iter: int = 25) -> np.ndarray:
        """Seeded k-means on Z_cos: best of ``n_init`` starts (k-means++ then Lloyd) on a seeded sample
        of at most 256 cells per cluster, drawn by global cell index; all cells when there are fewer.

        The sample bounds the start's cost; the full data enter at once through Harmony's first
        clustering iteration, which recomputes the centroids from all cells.
        """
        m = min(self.n, SEED_SAMPLE_PER_CLUSTER * self.k)
        index = np.sort(self.rng.choice(self.n, m, replace=False)) if m < self.n else np.arange(self.n)
        g, handles = self._graph()
        handles, results = self._apply(g, handles, "take", index)
        sample = np.concatenate(self._persist(g, handles, *results))
        return kmeans(sample, self.k, n_init=n_init, max_iter=max_iter, seed=int(self.rng.integers(2**31)))

    # -- runs ------------------------------------------------------------------------------------

    def _start(self, n_init: int) -> tuple[np.ndarray, _IterationState]:
        with timed(self.timings, "start"):
            y0 = cosine_normalize(self.kmeans_start(n_init).T, axis=0)
            sums = self._reduce("initial_assignments", y0, self.sigma, combine=Sums.merge)
        ones = np.ones_like(sums.s)
        state = _IterationState(sums.s, ones, 0.0, sums.logz, sums.centroid_sums, y0)
        return cosine_normalize(sums.centroid_sums, axis=0), state

    def _objective(self, it: _IterationState) -> float:
        """k-means error + sigma-weighted entropy + diversity cross-entropy (harmony 0.1)."""
        kmeans_error = 2.0 * self.n - 2.0 * float((it.y * it.centroid_sums).sum())
        entropy = self.sigma * (it.logw - it.logz) - kmeans_error
        cross = cross_entropy(it.block_s.sum(axis=0), self.design.patterns, self.pr_b, self.theta_b, self.sigma)
        return kmeans_error + entropy + cross

    def _cluster_iteration(self, y: np.ndarray, block_s: np.ndarray) -> _IterationState:
        """One clustering iteration: blocks in a seeded order, each updated in parallel across chunks."""
        order = self.rng.permutation(self.n_blocks).tolist()
        consts = (self.design.patterns, self.pr_b, self.theta_b)
        g, handles = self._graph()
        ledger = g.task(_first_block, block_s, order[0], consts)
        for i, b in enumerate(order):
            handles, parts = self._apply(g, handles, "update_block", b, y, self.sigma, ledger)
            following = order[i + 1] if i + 1 < len(order) else None
            ledger = g.task(_next_block, ledger, following, consts, *parts)
        new, penalties, logw, logz, centroid_sums = self._persist(g, handles, g.task(_iteration_sums, ledger))[0]
        return _IterationState(new, penalties, logw, logz, centroid_sums, y)

    def _correct(self, ridge_penalty: np.ndarray, it: _IterationState, final: bool) -> np.ndarray:
        """Ridge correction of every chunk; returns the new centroids ``Y``."""
        stats = self._reduce("ridge_sums", it.y, self.sigma, it.penalties, combine=_add_pairs)
        w = solve_batch_terms(*ridge_system(*stats, self.design.patterns), ridge_penalty)
        per_pattern = np.einsum("pa,kad->pkd", self.design.patterns, w)
        centroid_sums = self._reduce("correct", per_pattern, it.y, self.sigma, it.penalties, final,
                                     combine=operator.add)
        return cosine_normalize(centroid_sums, axis=0)

    def _result(self, it: _IterationState, n_iter: int, objective: list[float], converged: bool) -> HarmonyResult:
        r = partial(self._gather, "assignments", self.k, it.y, self.sigma, it.penalties)
        return HarmonyResult(self._gather("corrected", self.d), r() if self.lazy else r, it.y, n_iter, objective,
                             converged, dict(self.timings))

    def harmony(self, ridge_penalty, *, n_init, max_iter_harmony, max_iter_cluster, epsilon_cluster,
                epsilon_harmony) -> HarmonyResult:
        y, it = self._start(n_init)
        obj_kmeans = [self._objective(it)]
        obj_harmony = [obj_kmeans[-1]]
        converged, n_iter = False, 0
        for n_iter in range(1, max_iter_harmony + 1):
            with timed(self.timings, "clustering"):
                for i in range(max_iter_cluster):
                    it = self._cluster_iteration(y, it.block_s)
                    y = cosine_normalize(it.centroid_sums, axis=0)
                    obj_kmeans.append(self._objective(it))
                    if i > WINDOW and _window_converged(obj_kmeans, epsilon_cluster):
                        break
            obj_harmony.append(obj_kmeans[-1])
            old, new = obj_harmony[-2], obj_harmony[-1]
            converged = (old - new) / abs(old) < epsilon_harmony
            logger.info("Harmony iteration %d: objective %.6g", n_iter, new)
            with timed(self.timings, "correction"):
                y = self._correct(ridge_penalty, it, final=converged or n_iter == max_iter_harmony)
            if converged:
                break
        return self._result(it, n_iter, obj_harmony, converged)

    def soft_kmeans(self, n_init: int, max_iter: int) -> HarmonyResult:
        y, it = self._start(n_init)
        with timed(self.timings, "clustering"):
            for _ in range(max_iter - 1):
                it = self._cluster_iteration(y, it.block_s)
                y = cosine_normalize(it.centroid_sums, axis=0)
        result = self._result(it, 0, [self._objective(it)], True)
        result.centroids = y  # R Symphony's soft_kmeans returns the centroids of the final R
        return result


@dataclass
class _IterationState:
    """What the driver keeps of a clustering iteration: per-block sums and penalties, entropy
    terms, centroid sums, and the centroids ``y`` the iteration used."""

    block_s: np.ndarray
    penalties: np.ndarray
    logw: float
    logz: float
    centroid_sums: np.ndarray
    y: np.ndarray


def _default_chunk_size(n: int) -> int:
    """Chunks of at most DEFAULT_CHUNK_SIZE cells, at least one per dask thread when cells allow."""
    threads = dask.config.get("num_workers", None) or os.cpu_count() or 1
    return max(MIN_CHUNK_SIZE, min(DEFAULT_CHUNK_SIZE, -(-n // threads)))


def _distributed_client_active() -> bool:
    try:
        from distributed import default_client

        default_client()
    except (ImportError, ValueError):
        return False
    return True


def _add_pairs(a, b):
    return a[0] + b[0], a[1] + b[1]


def _window_converged(obj: list[float], epsilon: float) -> bool:
    old = sum(obj[-2 - i] for i in range(WINDOW))
    new = sum(obj[-1 - i] for i in range(WINDOW))
    return (old - new) / abs(old) < epsilon


def _check_clusters(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"n_clusters={k} is impossible with {n} cells; try n_clusters={default_n_clusters(n)}")


def _per_key(value, keys: list[str], name: str) -> dict[str, float]:
    values = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if values.size == 1:
        values = np.repeat(values, len(keys))
    if values.size != len(keys):
        raise ValueError(f"{name} needs one value or one per batch key ({len(keys)}), got {values.size}")
    return dict(zip(keys, values.tolist()))


def _warn_small_batches(design: Design, n_b: np.ndarray) -> None:
    for (key, level), count in zip(design.levels, n_b):
        if count < 2:
            warnings.warn(
                f"batch {level!r} of {key!r} has {int(count)} cell(s); Harmony cannot correct a batch that small",
                UserWarning,
                stacklevel=3,
            )
