"""The Harmony driver: harmony 0.1's loop (and harmony 2's) over chunk groups that hold the cells.

Start: seeded k-means on ``Z_cos`` (:mod:`symphony_dask._harmony.kmeans`), then ``R = softmax(-dist / sigma)``.
One Harmony iteration is maximum-diversity soft k-means until its objective settles (window of 3,
``epsilon_cluster``), then the mixture-of-experts ridge correction of ``Z``. Each clustering
iteration recomputes ``Y`` from ``Z_cos`` and ``R`` and updates ``R`` block by block (5% of cells per
block) in a seeded order, with O and E refreshed between blocks and the diversity penalty
``((E + 1) / (O + 1)) ** theta`` of harmony 0.1. Harmony stops when its objective improves by
less than ``epsilon_harmony`` (relative).

Harmony 2 (R harmony 2.0, harmonypy 2.1; ``flavor="harmony2"``) differs in four places: the
penalty is the stabilized ``((2 E + 1) / (O + E + 1)) ** theta``; the centroids stay fixed through
an iteration's clustering rounds, and from the second iteration on ``R`` restarts from the plain
softmax of the corrected cells before them; the ridge penalty of a cluster and batch is
``alpha E_kb`` and batches with a share of a cluster at most ``batch_prop_cutoff`` are left out of
its correction (:func:`~symphony_dask._harmony.mixture.solve_harmony2_terms`); and the next centroids are
the cosine-normalized intercepts of the ridge fits.

The driver holds only what does not grow with the cells: ``Y``, the pattern sums ``S`` per block
(from which O and E follow), the ridge systems, the objective history and the log of correction
steps. The cells stay with the chunk groups (:mod:`symphony_dask._harmony.cluster.groups`): in this
process, or on the workers of a distributed cluster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np

from symphony_dask._dask.chunked import distributed_client, total
from symphony_dask._dask.timing import timed
from symphony_dask._harmony.chunk import CorrectionStep, IterationSums, RunSpec, chunk_output, piece_bounds
from symphony_dask._harmony.cluster import groups as harmony_groups
from symphony_dask._harmony.cluster.groups import GroupsLost, LocalGroups, local_threads
from symphony_dask._harmony.kernels import PenaltyTerms, cosine_normalize
from symphony_dask._harmony.kmeans import SEED_SAMPLE_PER_CLUSTER, kmeans
from symphony_dask._harmony.mixture import Design, ridge_system, solve_batch_terms, solve_harmony2_terms
from symphony_dask._harmony.result import HarmonyResult, OutputCall

logger = logging.getLogger("symphony_dask")

#: Objective window of the clustering convergence test (harmony 0.1).
WINDOW = 3
#: Times a run rebuilds lost groups before it gives up.
MAX_RECOVERIES = 10


@dataclass(frozen=True)
class RidgeSettings:
    """The ridge correction's penalty, fixed or (harmony 2) estimated.

    ``penalty`` ((1 + B,), the intercept's first) is fixed, or for harmony 2 ``None`` to estimate
    it as ``alpha E``; harmony 2 leaves out batches whose share of a cluster is at most ``cutoff``.
    """

    penalty: np.ndarray | None
    alpha: float = 0.2
    cutoff: float = 1e-5


@dataclass
class _Iteration:
    """What the driver keeps of a clustering iteration: its sums and the centroids ``y`` it used."""

    sums: IterationSums
    y: np.ndarray


class HarmonyRun:
    """One Harmony (or soft k-means) run over the chunks of ``Z``.

    Parameters
    ----------
    Z
        Cells x d, NumPy or dask.
    design
        The cells' batch design (patterns and each cell's pattern code).
    pr_b, theta_b
        Batch proportions and per-batch diversity penalty (empty without batch variables).
    n_clusters, sigma, seed, n_blocks
        Harmony's settings.
    chunk_size
        Cells per chunk (``None``: the chunks of a dask ``Z``; one chunk for NumPy on threads).
    flavor
        ``'harmony1'`` or ``'harmony2'`` (see the module docstring).
    """

    def __init__(
        self,
        Z: np.ndarray | da.Array,
        design: Design,
        pr_b: np.ndarray,
        theta_b: np.ndarray,
        *,
        n_clusters: int,
        sigma: float,
        seed: int,
        n_blocks: int,
        chunk_size: int | None,
        flavor: str = "harmony1",
    ) -> None:
        self.flavor = flavor
        self.rng = np.random.default_rng(seed)
        self.n, self.d = int(Z.shape[0]), int(Z.shape[1])
        self.k = n_clusters
        self.sigma = float(sigma)
        self.n_blocks = n_blocks
        self.design = design
        self.terms = PenaltyTerms(design.patterns, pr_b, theta_b, stabilized=flavor == "harmony2")
        self.spec = RunSpec(len(design.patterns), n_blocks, int(self.rng.integers(2**62)), self.sigma, self.terms)
        self.lazy = isinstance(Z, da.Array)
        self.log: list[CorrectionStep] = []
        self.timings: dict[str, float] = {}
        self._iterations = 0
        codes = design.codes.astype(np.min_scalar_type(max(len(design.patterns) - 1, 0)))
        client = distributed_client()
        if client is None:
            self._set_local(Z, codes, chunk_size)
        else:
            self._set_cluster(client, Z, codes, chunk_size)
        try:
            n_bad = sum(self._attempt(self.groups.call, "n_nonfinite"))
            if n_bad:
                raise ValueError(f"Z holds {n_bad} NaN or infinite value(s); Harmony needs finite PCs")
        except BaseException:
            self.groups.finish()  # harmony() and soft_kmeans() do it once the run is under way
            raise

    # -- where the chunks live -----------------------------------------------------------------------

    def _set_local(self, Z, codes: np.ndarray, chunk_size: int | None) -> None:
        if self.lazy:
            Z = Z.rechunk({0: chunk_size, 1: -1}) if chunk_size else Z.rechunk({1: -1})
            sizes = Z.chunks[0]
            blocks = dask.compute(*Z.to_delayed().ravel())
        else:
            Z = np.asarray(Z, dtype=np.float64)
            step = chunk_size or max(len(Z), 1)
            sizes = tuple(min(step, len(Z) - a) for a in range(0, len(Z), step))
            offsets = np.cumsum((0, *sizes[:-1]))
            blocks = [Z[a : a + s] for a, s in zip(offsets, sizes, strict=True)]
        self.sizes, self.offsets = tuple(int(s) for s in sizes), np.cumsum((0, *sizes[:-1]))
        self.codes = [codes[a : a + s] for a, s in zip(self.offsets, self.sizes, strict=True)]
        self.z_chunks: list[Any] = list(blocks)
        chunks = [
            (i, int(a), z, c) for i, (a, z, c) in enumerate(zip(self.offsets, self.z_chunks, self.codes, strict=True))
        ]
        self.groups: LocalGroups | harmony_groups.ClusterGroups = LocalGroups(chunks, self.spec, local_threads())

    def _set_cluster(self, client, Z, codes: np.ndarray, chunk_size: int | None) -> None:
        from distributed import futures_of

        if not self.lazy:
            Z = da.from_array(np.asarray(Z, dtype=np.float64), chunks=(chunk_size or max(self.n, 1), -1))
        elif chunk_size:
            Z = Z.rechunk({0: chunk_size, 1: -1})
        else:
            Z = Z.rechunk({1: -1})
        workers = len(client.scheduler_info(n_workers=-1)["workers"]) or 1
        wanted = min(workers, max(1, self.n // harmony_groups.MIN_GROUP_CELLS))
        if chunk_size is None and Z.numblocks[0] < wanted:  # one chunk per group at least
            Z = Z.rechunk({0: -(-self.n // wanted)})
        Z = Z.astype(np.float64).persist()
        by_key = {f.key: f for f in futures_of(Z)}
        self.sizes = tuple(int(s) for s in Z.chunks[0])
        self.offsets = np.cumsum((0, *self.sizes[:-1]))
        self.codes = [codes[a : a + s] for a, s in zip(self.offsets, self.sizes, strict=True)]
        self.z_chunks = [by_key[key] for key in (k[0] if isinstance(k, list) else k for k in Z.__dask_keys__())]
        chunks = [
            (i, int(a), f, c) for i, (a, f, c) in enumerate(zip(self.offsets, self.z_chunks, self.codes, strict=True))
        ]
        self.groups = harmony_groups.ClusterGroups(client, chunks, self.sizes, self.spec)
        self.client = client

    def _attempt(self, step, *args: Any) -> Any:
        """Run a step; if groups were lost with their workers, rebuild them and run it again."""
        for attempt in range(MAX_RECOVERIES + 1):
            try:
                return step(*args)
            except GroupsLost as lost:
                if attempt == MAX_RECOVERIES:
                    raise RuntimeError(
                        f"Harmony lost workers {MAX_RECOVERIES + 1} times in one step; giving up"
                    ) from lost
                self.groups.recover(lost.slots, self.log)
        raise AssertionError("unreachable")

    # -- start ---------------------------------------------------------------------------------------

    def _kmeans_start(self, n_init: int, max_iter: int = 25) -> np.ndarray:
        """Seeded k-means on Z_cos: best of ``n_init`` starts (k-means++ then Lloyd) on a seeded sample.

        The sample holds at most 256 cells per cluster, drawn by global cell index (all cells when
        there are fewer). It bounds the start's cost; the full data enter at once through Harmony's
        first clustering iteration, which recomputes the centroids from all cells.
        """
        m = min(self.n, SEED_SAMPLE_PER_CLUSTER * self.k)
        index = np.sort(self.rng.choice(self.n, m, replace=False)) if m < self.n else np.arange(self.n)
        sample = np.concatenate(self._attempt(self.groups.call, "take", index))
        return kmeans(sample, self.k, n_init=n_init, max_iter=max_iter, seed=int(self.rng.integers(2**31)))

    def _start(self, n_init: int) -> tuple[np.ndarray, _Iteration]:
        """The k-means start and ``R = softmax(-dist / sigma)`` from it.

        Returns the centroids of the first clustering iteration (harmony 0.1: ``Z_cos^T R``
        normalized; harmony 2: the start's) and the start's iteration (its sums).
        """
        with timed(self.timings, "start", log=False):
            y0 = cosine_normalize(self._kmeans_start(n_init).T, axis=0)
            it = self._plain_assignments(y0)
        logger.info("Harmony start (k-means of %d clusters): %.2f s", self.k, self.timings["start"])
        return (y0 if self.flavor == "harmony2" else cosine_normalize(it.sums.centroid_sums, axis=0)), it

    def _plain_assignments(self, y: np.ndarray) -> _Iteration:
        """The sums of ``R = softmax(-dist / sigma)`` (no diversity penalty) of the current cells."""
        parts = self._attempt(self.groups.call, "initial_sums", y)
        block_s = total(*(p[0] for p in parts))
        logz = total(*(p[1] for p in parts))
        centroid_sums = total(*(p[2] for p in parts))
        return _Iteration(IterationSums(block_s, np.ones_like(block_s), 0.0, logz, centroid_sums), y)

    # -- iterations ----------------------------------------------------------------------------------

    def _objective(self, it: _Iteration) -> float:
        """k-means error + sigma-weighted entropy + diversity cross-entropy (harmony 0.1)."""
        s = it.sums
        kmeans_error = 2.0 * self.n - 2.0 * float((it.y * s.centroid_sums).sum())
        entropy = self.sigma * (s.logw - s.logz) - kmeans_error
        cross = self.terms.cross_entropy(s.block_s.sum(axis=0), self.sigma)
        return kmeans_error + entropy + cross

    def _cluster_iteration(self, y: np.ndarray, block_s: np.ndarray) -> _Iteration:
        """One clustering iteration: blocks in a seeded order, each updated in every group."""
        order = self.rng.permutation(self.n_blocks).tolist()
        self._iterations += 1
        sums = self._attempt(self.groups.cluster_iteration, self._iterations, order, y, block_s)
        return _Iteration(sums, y)

    def _correct(self, ridge: RidgeSettings, it: _Iteration, final: bool) -> np.ndarray:
        """Ridge correction of every chunk; returns the new centroids ``Y``."""
        parts = self._attempt(self.groups.call, "ridge_sums", it.y, it.sums.penalties)
        s, t = total(*(p[0] for p in parts)), total(*(p[1] for p in parts))
        patterns = self.design.patterns
        if self.flavor == "harmony2":
            w, intercepts, fitted = solve_harmony2_terms(
                s, t, patterns, self.design.variables(), alpha=ridge.alpha, cutoff=ridge.cutoff, penalty=ridge.penalty
            )
        else:
            w = solve_batch_terms(*ridge_system(s, t, patterns), ridge.penalty)
        step = CorrectionStep(it.y, it.sums.penalties, np.einsum("pa,kad->pkd", patterns, w), final)
        self.log.append(step)
        centroid_sums = total(*self._attempt(self.groups.call, "correct", len(self.log), step))
        if self.flavor == "harmony2":
            y = it.y.copy()
            y[:, fitted] = cosine_normalize(intercepts[fitted].T, axis=0)
            return y
        return cosine_normalize(centroid_sums, axis=0)

    def harmony(self, ridge: RidgeSettings, **settings: Any) -> HarmonyResult:
        try:
            return self._harmony(ridge, **settings)
        finally:
            self.groups.finish()

    def soft_kmeans(self, n_init: int, max_iter: int) -> HarmonyResult:
        try:
            return self._soft_kmeans(n_init, max_iter)
        finally:
            self.groups.finish()

    def _harmony(
        self,
        ridge: RidgeSettings,
        *,
        n_init: int,
        max_iter_harmony: int,
        max_iter_cluster: int,
        epsilon_cluster: float,
        epsilon_harmony: float,
    ) -> HarmonyResult:
        y, it = self._start(n_init)
        obj_kmeans = [self._objective(it)]
        obj_harmony = [obj_kmeans[-1]]
        converged, n_iter = False, 0
        for n_iter in range(1, max_iter_harmony + 1):
            before = dict(self.timings)
            with timed(self.timings, "clustering", log=False):
                if self.flavor == "harmony2" and n_iter > 1:  # R restarts from the corrected cells
                    it = self._plain_assignments(y)
                for i in range(max_iter_cluster):
                    it = self._cluster_iteration(y, it.sums.block_s)
                    if self.flavor == "harmony1":
                        y = cosine_normalize(it.sums.centroid_sums, axis=0)
                    obj_kmeans.append(self._objective(it))
                    if i > WINDOW and _window_converged(obj_kmeans, epsilon_cluster):
                        break
            obj_harmony.append(obj_kmeans[-1])
            old, new = obj_harmony[-2], obj_harmony[-1]
            converged = (old - new) / abs(old) < epsilon_harmony
            with timed(self.timings, "correction", log=False):
                y = self._correct(ridge, it, final=converged or n_iter == max_iter_harmony)
            spent = {k: v - before.get(k, 0.0) for k, v in self.timings.items()}
            logger.info(
                "Harmony iteration %d: objective %.6g; clustering %.2f s (%d rounds), correction %.2f s",
                n_iter,
                new,
                spent["clustering"],
                i + 1,
                spent["correction"],
            )
            if converged:
                break
        return self._result(it, n_iter, obj_harmony, converged)

    def _soft_kmeans(self, n_init: int, max_iter: int) -> HarmonyResult:
        y, it = self._start(n_init)
        with timed(self.timings, "clustering"):
            for _ in range(max_iter - 1):
                it = self._cluster_iteration(y, it.sums.block_s)
                y = cosine_normalize(it.sums.centroid_sums, axis=0)
        result = self._result(it, 0, [self._objective(it)], True)
        result.centroids = y  # R Symphony's soft_kmeans returns the centroids of the final R
        return result

    # -- outputs -------------------------------------------------------------------------------------

    def _calls(self, what: str, *args: Any, by_piece: bool = False) -> list[OutputCall]:
        """The :func:`~symphony_dask._harmony.chunk.chunk_output` calls that give a per-cell output, in cell order.

        One call per chunk, or with ``by_piece`` one per piece of at most 32,768 cells.
        """
        log = dask.delayed(list(self.log), traverse=False)
        calls = []
        for i, (a, s) in enumerate(zip(self.offsets, self.sizes, strict=True)):
            group_id, worker = self.groups.location(i)
            z = dask.delayed(self.z_chunks[i]) if self.lazy or worker else self.z_chunks[i]
            pieces = list(enumerate(piece_bounds(s))) if by_piece else [(None, (0, s))]
            calls += [
                OutputCall(
                    (z, self.codes[i], int(a), i, self.spec, log, group_id, what, *args), piece, worker, stop - start
                )
                for piece, (start, stop) in pieces
            ]
        return calls

    def _outputs(self, what: str, width: int, *args: Any) -> da.Array:
        """A per-cell output as a dask array over the chunks.

        Each chunk's part is taken from its group, or recomputed from its PCs and the log if the
        group is gone (see :func:`~symphony_dask._harmony.chunk.chunk_output`).
        """
        parts = []
        for call in self._calls(what, *args):
            with call.placement():
                part = dask.delayed(chunk_output, pure=False)(*call.args, piece=call.piece)
            parts.append(da.from_delayed(part, shape=(call.rows, width), dtype=np.float64))
        return da.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]

    def _result(self, it: _Iteration, n_iter: int, objective: list[float], converged: bool) -> HarmonyResult:
        assignments = self._outputs("assignments", self.k, it.y, it.sums.penalties)
        # built now: a closure over the run would keep its chunk groups alive with the result
        pieces = self._calls("assignments", it.y, it.sums.penalties, by_piece=True) if self.lazy else None
        if isinstance(self.groups, LocalGroups):
            group = self.groups.group
            z_corr = np.empty((self.n, self.d))
            for i, (a, s) in enumerate(zip(self.offsets, self.sizes, strict=True)):
                group.output(i, "corrected", out=z_corr[a : a + s])
            if self.lazy:
                z_corr = da.from_array(z_corr, chunks=(self.sizes, self.d))
        else:
            z_corr = self._outputs("corrected", self.d)
            z_corr = z_corr.persist(optimize_graph=False) if self.lazy else z_corr.compute(optimize_graph=False)
        r = assignments if self.lazy else (lambda: assignments.compute(optimize_graph=False))
        return HarmonyResult(
            z_corr,
            it.y,
            n_iter,
            objective,
            converged,
            dict(self.timings),
            cluster_iterations=self._iterations,
            _assignments=r,
            _groups=self.groups,
            _assignment_pieces=pieces,
        )


def _window_converged(obj: list[float], epsilon: float) -> bool:
    old = sum(obj[-2 - i] for i in range(WINDOW))
    new = sum(obj[-1 - i] for i in range(WINDOW))
    return (old - new) / abs(old) < epsilon
