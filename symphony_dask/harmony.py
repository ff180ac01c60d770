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
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import pandas as pd
from dask.delayed import Delayed

from .checks import as_key_list, check_obs_keys
from .chunked import SPLIT_EVERY
from .harmony_chunk import HarmonyChunk, Sums
from .kmeans import SEED_SAMPLE_PER_CLUSTER, kmeans
from .mixture import Design, make_design, ridge_system, solve_batch_terms
from .timing import timed

logger = logging.getLogger("symphony_dask")

Flavor = Literal["harmony1"]
#: Objective window of the clustering convergence test (harmony 0.1).
WINDOW = 3
#: Cells per chunk when ``Z`` is a NumPy array and no ``chunk_size`` is given.
DEFAULT_CHUNK_SIZE = 100_000
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


def cross_entropy(s: np.ndarray, patterns: np.ndarray, pr_b: np.ndarray, theta: np.ndarray, sigma: np.ndarray) -> float:
    """Diversity term of the objective, ``sum_k sigma_k sum_b theta_b log((O+1)/(E+1))_kb O_kb``."""
    phi = patterns[:, 1:]
    o = s.T @ phi
    e = np.outer(s.sum(axis=0), pr_b)
    return float((sigma[:, None] * theta[None, :] * np.log((o + 1.0) / (e + 1.0)) * o).sum())


# ----------------------------------------------------------------------------------------------
# result and public function
# ----------------------------------------------------------------------------------------------


@dataclass
class HarmonyResult:
    """Output of :func:`harmonize`.

    Attributes
    ----------
    Z_corr
        Corrected embedding (cells x d); a dask array with the row chunks of a dask input.
    R
        Soft cluster assignments (cells x k), rows sum to one; chunked like ``Z_corr``.
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

    Z_corr: np.ndarray | da.Array
    R: np.ndarray | da.Array
    centroids: np.ndarray
    n_iter: int
    objective: list[float] = field(default_factory=list)
    converged: bool = False
    timings_s: dict[str, float] = field(default_factory=dict)


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
        Cells per chunk: rechunks a dask ``Z``; splits a NumPy ``Z`` (default 100,000 cells).
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
    run.set_design(design, n_b / n, theta_b)
    return run.harmony(
        ridge_penalty, n_init=n_init, block_size=block_size, max_iter_harmony=max_iter_harmony,
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
    run = _Run(Z, n_clusters=int(n_clusters), sigma=sigma, seed=seed, chunk_size=chunk_size)
    run.set_design(make_design(pd.DataFrame(index=range(n)), []), np.array([]), np.array([]))
    return run.soft_kmeans(n_init, max_iter)


# ----------------------------------------------------------------------------------------------
# the chunked run
# ----------------------------------------------------------------------------------------------


@dataclass
class _Stepped:
    """A chunk state after a step, with the step's result."""

    state: HarmonyChunk
    result: Any


def _step(handle: HarmonyChunk | _Stepped, method: str, *args: Any) -> _Stepped:
    state = handle.state if isinstance(handle, _Stepped) else handle
    return _Stepped(state, getattr(state, method)(*args))


def _result(handle: _Stepped) -> Any:
    return handle.result


def _fold(combine, *parts: Any) -> Any:
    out = parts[0]
    for p in parts[1:]:
        out = combine(out, p)
    return out


def _attribute(handle: HarmonyChunk | _Stepped, name: str) -> np.ndarray:
    return getattr(handle.state if isinstance(handle, _Stepped) else handle, name)


@dataclass
class _Ledger:
    """The bookkeeping of one clustering iteration, carried from block to block.

    ``s`` is the pattern sums S with the current block's cells removed, ``penalty`` the diversity
    penalty per pattern from it, ``old`` the per-block sums before the iteration, ``total`` the
    sums of the blocks done so far.
    """

    s: np.ndarray
    old: np.ndarray
    penalty: np.ndarray
    total: Sums | None


def _first_block(s_total: np.ndarray, consts: tuple, *old_parts: np.ndarray) -> _Ledger:
    old = _fold(operator.add, *old_parts)
    s = s_total - old[0]
    return _Ledger(s, old, pattern_penalty(s, *consts), None)


def _next_block(ledger: _Ledger, b: int, consts: tuple, *parts: Sums) -> _Ledger:
    """Put block ``b - 1``'s cells back with their new assignments and take block ``b``'s out."""
    done = _fold(Sums.merge, *parts)
    total = done if ledger.total is None else ledger.total.merge(done)
    s = ledger.s + done.s
    if b < len(ledger.old):
        s = s - ledger.old[b]
    return _Ledger(s, ledger.old, pattern_penalty(s, *consts), total)


def _ledger_total(ledger: _Ledger) -> Sums:
    return ledger.total


class _Graph:
    """A low-level task graph built step by step (far cheaper per task than ``dask.delayed``).

    Harmony runs thousands of small steps; each clustering iteration is one graph of chunk steps
    and tree reductions, computed by whatever dask scheduler is active.
    """

    def __init__(self, handles: list[Delayed]) -> None:
        self.dsk: dict = {}
        for h in handles:
            self.dsk.update(h.__dask_graph__())
        self.token = uuid.uuid4().hex
        self.count = 0

    def task(self, func, *args: Any) -> tuple:
        self.count += 1
        key = (func.__name__, self.token, self.count)
        self.dsk[key] = (func, *args)
        return key

    def reduce(self, keys: list, combine, split_every: int = SPLIT_EVERY) -> tuple:
        level = list(keys)
        if len(level) == 1:
            return self.task(_fold, combine, level[0])
        while len(level) > 1:
            level = [self.task(_fold, combine, *level[i : i + split_every]) for i in range(0, len(level), split_every)]
        return level[0]

    def delayed(self, key) -> Delayed:
        return Delayed(key, self.dsk)


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
            step = chunk_size or DEFAULT_CHUNK_SIZE
            sizes = tuple(min(step, len(Z) - a) for a in range(0, len(Z), step))
            blocks = [Z[a : a + s] for a, s in zip(np.cumsum((0,) + sizes[:-1]), sizes)]
        self.sizes = sizes
        self.offsets = np.cumsum((0,) + sizes[:-1])
        self.blocks = blocks
        self.n, self.d = int(Z.shape[0]), int(Z.shape[1])
        self.k = n_clusters
        self.sigma = np.full(n_clusters, float(sigma))
        self.rng = np.random.default_rng(seed)
        self.states: list[Any] = []
        self.timings: dict[str, float] = {}
        self.inline = len(sizes) == 1 and not _distributed_client_active()

    def set_design(self, design: Design, pr_b: np.ndarray, theta_b: np.ndarray) -> None:
        """Create the chunk states (persisted) and check the values of ``Z``."""
        self.design, self.pr_b, self.theta_b = design, pr_b, theta_b
        n_patterns = len(design.patterns)
        create = dask.delayed(HarmonyChunk.create, pure=False)
        self.states = [
            create(block, design.codes[a : a + s], int(a), n_patterns)
            for block, a, s in zip(self.blocks, self.offsets, self.sizes)
        ]
        n_bad = self._reduce("n_nonfinite", combine=operator.add)
        if n_bad:
            raise ValueError(f"Z holds {n_bad} NaN or infinite value(s); Harmony needs finite PCs")

    # -- plumbing --------------------------------------------------------------------------------

    def _graph(self) -> tuple[_Graph, list]:
        g = _Graph(self.states)
        return g, [h.key for h in self.states]

    def _apply(self, g: _Graph, handles: list, method: str, *args: Any) -> tuple[list, list]:
        """One step on every chunk: the new state handles, and keys of the step's results alone
        (so that reducing them never moves a chunk's state between workers)."""
        handles = [g.task(_step, h, method, *args) for h in handles]
        return handles, [g.task(_result, h) for h in handles]

    def _persist(self, g: _Graph, handles: list, *keys) -> tuple:
        """Run the graph: keep the chunk states where they are, bring the small results here.

        A single in-memory chunk without a distributed client runs in this thread (nothing to
        parallelize, and no scheduling overhead for Harmony's many small steps).
        """
        scheduler = "sync" if self.inline else None
        persisted = dask.persist(*(g.delayed(h) for h in handles), *(g.delayed(k) for k in keys), scheduler=scheduler)
        self.states = list(persisted[: len(handles)])
        return dask.compute(*persisted[len(handles) :], scheduler=scheduler)

    def _reduce(self, method: str, *args: Any, combine) -> Any:
        """One step on every chunk and the tree reduction of its results."""
        g, handles = self._graph()
        handles, results = self._apply(g, handles, method, *args)
        return self._persist(g, handles, g.reduce(results, combine))[0]

    def _gather(self, name: str) -> np.ndarray | da.Array:
        get = dask.delayed(_attribute, pure=True)
        parts = [
            da.from_delayed(get(st, name), shape=(s, self.d if name == "z_corr" else self.k), dtype=np.float64)
            for st, s in zip(self.states, self.sizes)
        ]
        arr = da.concatenate(parts, axis=0)
        return arr if self.lazy else arr.compute()

    # -- k-means start ---------------------------------------------------------------------------

    def kmeans_start(self, n_init: int, max_iter: int = 25) -> np.ndarray:
        """Seeded k-means on Z_cos: best of ``n_init`` starts on a sample, refined on all cells."""
        m = min(self.n, SEED_SAMPLE_PER_CLUSTER * self.k)
        index = np.sort(self.rng.choice(self.n, m, replace=False)) if m < self.n else np.arange(self.n)
        g, handles = self._graph()
        handles, results = self._apply(g, handles, "take", index)
        sample = np.concatenate(self._persist(g, handles, *results))
        centers = kmeans(sample, self.k, n_init=n_init, max_iter=max_iter, seed=int(self.rng.integers(2**31)))
        if m == self.n:
            return centers
        for _ in range(max_iter):
            sums, counts, _ = self._reduce("lloyd_sums", centers, combine=_add_triples)
            new = centers.copy()
            filled = counts > 0
            new[filled] = sums[filled] / counts[filled, None]
            if np.array_equal(new, centers):
                break
            centers = new
        return centers

    # -- runs ------------------------------------------------------------------------------------

    def _start(self, n_init: int) -> tuple[np.ndarray, Sums]:
        with timed(self.timings, "start"):
            y0 = cosine_normalize(self.kmeans_start(n_init).T, axis=0)
            sums = self._reduce("initial_assignments", y0, self.sigma, combine=Sums.merge)
        return cosine_normalize(sums.centroid_sums, axis=0), sums

    def _objective(self, sums: Sums) -> float:
        cross = cross_entropy(sums.s, self.design.patterns, self.pr_b, self.theta_b, self.sigma)
        return sums.kmeans_error + sums.entropy + cross

    def _cluster_iteration(self, y: np.ndarray, s_total: np.ndarray, n_blocks: int) -> Sums:
        """One clustering iteration: blocks in turn, each updated in parallel across chunks."""
        key = int(self.rng.integers(2**62))
        consts = (self.design.patterns, self.pr_b, self.theta_b)
        g, handles = self._graph()
        handles, old_parts = self._apply(g, handles, "begin_iteration", key, n_blocks)
        ledger = g.task(_first_block, s_total, consts, *old_parts)
        for b in range(n_blocks):
            handles, parts = self._apply(g, handles, "update_block", b, y, self.sigma, ledger)
            ledger = g.task(_next_block, ledger, b + 1, consts, *parts)
        return self._persist(g, handles, g.task(_ledger_total, ledger))[0]

    def _correct(self, ridge_penalty: np.ndarray) -> np.ndarray:
        """Ridge correction of every chunk; returns the new centroids ``Y``."""
        stats = self._reduce("ridge_sums", combine=_add_pairs)
        w = solve_batch_terms(*ridge_system(*stats, self.design.patterns), ridge_penalty)
        centroid_sums = self._reduce("correct", self.design.patterns, w, combine=operator.add)
        return cosine_normalize(centroid_sums, axis=0)

    def harmony(self, ridge_penalty, *, n_init, block_size, max_iter_harmony, max_iter_cluster,
                epsilon_cluster, epsilon_harmony) -> HarmonyResult:
        n_blocks = int(np.ceil(1.0 / block_size))
        y, sums = self._start(n_init)
        obj_kmeans = [self._objective(sums)]
        obj_harmony = [obj_kmeans[-1]]
        converged, n_iter = False, 0
        for n_iter in range(1, max_iter_harmony + 1):
            with timed(self.timings, "clustering"):
                for it in range(max_iter_cluster):
                    y_used = y
                    sums = self._cluster_iteration(y, sums.s, n_blocks)
                    y = cosine_normalize(sums.centroid_sums, axis=0)
                    obj_kmeans.append(self._objective(sums))
                    if it > WINDOW and _window_converged(obj_kmeans, epsilon_cluster):
                        break
            obj_harmony.append(obj_kmeans[-1])
            with timed(self.timings, "correction"):
                y = self._correct(ridge_penalty)
            old, new = obj_harmony[-2], obj_harmony[-1]
            logger.info("Harmony iteration %d: objective %.6g", n_iter, new)
            if (old - new) / abs(old) < epsilon_harmony:
                converged = True
                break
        return HarmonyResult(self._gather("z_corr"), self._gather("r"), y_used, n_iter, obj_harmony, converged,
                             dict(self.timings))

    def soft_kmeans(self, n_init: int, max_iter: int) -> HarmonyResult:
        y, sums = self._start(n_init)
        with timed(self.timings, "clustering"):
            for _ in range(max_iter - 1):
                sums = self._cluster_iteration(y, sums.s, 1)
                y = cosine_normalize(sums.centroid_sums, axis=0)
        return HarmonyResult(self._gather("z_corr"), self._gather("r"), y, 0, [self._objective(sums)], True,
                             dict(self.timings))


def _distributed_client_active() -> bool:
    try:
        from distributed import default_client

        default_client()
    except (ImportError, ValueError):
        return False
    return True


def _add_pairs(a, b):
    return a[0] + b[0], a[1] + b[1]


def _add_triples(a, b):
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


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
