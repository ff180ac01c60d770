"""Harmony's state on the cells one process holds, and the steps the driver applies to it.

A :class:`ChunkGroup` keeps some row chunks of the embedding for a whole Harmony run: all of them
in this process on the threaded scheduler, or the chunks one worker was given on a distributed
cluster (there it lives as a dask actor, see :mod:`symphony_dask._harmony.cluster.actor`). It splits
each chunk into *pieces* of at most :data:`~symphony_dask._harmony.piece.PIECE_CELLS` cells, the unit of
work of its threads; every sum it returns is folded over its pieces in a fixed order, so results
depend on the chunks and never on the number of threads or workers.

Per piece (:class:`Piece`) the state is the pre-Harmony PCs ``z``, the corrected PCs ``z_corr``
and each cell's design pattern. The soft assignments ``R`` are never stored: a cell's ``R`` is a
function of its ``z_corr`` row, the centroids of the iteration and the diversity penalty its block
saw, so the steps recompute it from those (d x k and n_blocks x p x k numbers).

Blocks: harmony 0.1 updates 5% of the cells at a time, refreshing O and E between blocks. Every
cell belongs to one of ``n_blocks`` blocks drawn once per run from a hash of its global index and
the seed, so membership does not depend on chunking. Inside a piece, cells are sorted by
(block, pattern): a block is a contiguous slice and its patterns contiguous runs.

Between clustering iterations only the corrections change a piece (``z_corr``), so the state after
``v`` corrections is the initial state with the log of the first ``v`` correction steps applied
(:meth:`ChunkGroup.replay`): that is how a group lost with its worker is rebuilt, and how
:func:`chunk_output` recomputes an output chunk that dask lost.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from symphony_dask._dask.chunked import total
from symphony_dask._harmony.kernels import BlockKernel, Ledger, PenaltyTerms
from symphony_dask._harmony.piece import Piece, piece_bounds
from symphony_dask._harmony.pool import WorkPool

logger = logging.getLogger("symphony_dask")


@dataclass(frozen=True)
class RunSpec:
    """What every piece of a run shares.

    The number of design patterns and blocks, the block hash key, sigma, and what the diversity penalty
    depends on besides ``S``.
    """

    n_patterns: int
    n_blocks: int
    key: int
    sigma: float
    terms: PenaltyTerms


@dataclass(frozen=True)
class CorrectionStep:
    """One Harmony correction, as the driver sent it.

    The centroids ``y`` and block penalties of the clustering iteration before it, the batch terms per pattern
    (p x k x d), and whether it was the last correction.
    """

    y: np.ndarray
    penalties: np.ndarray
    per_pattern: np.ndarray
    final: bool


@dataclass
class IterationSums:
    """What a clustering iteration returns.

    ``S`` per block after it, the penalty each block saw, the objective's ``sum R log w`` and ``sum (m + log
    Z)`` terms, and the centroid sums.
    """

    block_s: np.ndarray
    penalties: np.ndarray
    logw: float
    logz: float
    centroid_sums: np.ndarray


@dataclass
class _Iteration:
    """Scratch of the clustering iteration in progress.

    Per piece, the prepared kernels (two buffers, by block parity: one block is weighed and summed while the
    next is prepared), the futures of the next block's preparation, and the entropy part and centroid sums so
    far.
    """

    number: int
    y: np.ndarray
    order: list[int]
    position: int
    kernels: list[list[BlockKernel | None]]
    prepared: list[Future]
    logz: list[float]
    centroid_sums: list[np.ndarray]


#: Groups of this process by id, for :func:`chunk_output` (a group leaves when it is dropped).
_GROUPS: weakref.WeakValueDictionary[str, ChunkGroup] = weakref.WeakValueDictionary()


class ChunkGroup:
    """The pieces of some chunks and a pool of threads working on them (see the module docstring).

    Steps on all pieces run in the pool, one job per piece; background jobs of one piece run in the
    order they were given. A clustering iteration is driven block by block
    (:meth:`update_block`): once a block's kernels are prepared, every piece weighs its cells with
    the block's penalty (urgent jobs) and the group returns the block's ``S``; the pieces then
    prepare the next block and add this block's centroid sums in the background, while the driver
    reduces ``S`` over groups and computes the next penalty.

    Parameters
    ----------
    group_id
        Registers the group under this id in this process (``None``: not registered).
    chunks
        ``(chunk index, global offset, z, pattern codes)`` per chunk.
    spec
        What the run's pieces share.
    n_threads
        Threads of the pool.
    """

    def __init__(
        self,
        group_id: str | None,
        chunks: Sequence[tuple[int, int, np.ndarray, np.ndarray]],
        spec: RunSpec,
        n_threads: int,
    ) -> None:
        self.group_id = group_id
        self.spec = spec
        self.pieces: list[Piece] = []
        self.chunk_pieces: dict[int, list[int]] = {}
        for index, offset, z, codes in chunks:
            # arrays received from another process may be read-only views of unaligned buffers,
            # on which NumPy falls back to slow loops: copy those (once)
            z, codes = np.require(z, dtype=np.float64, requirements=["C", "A"]), np.asarray(codes)
            self.chunk_pieces[int(index)] = list(range(len(self.pieces), len(self.pieces) + len(piece_bounds(len(z)))))
            self.pieces += [Piece.create(z[a:b], codes[a:b], int(offset) + a, spec) for a, b in piece_bounds(len(z))]
        self.version = 0
        self._last_centroid_sums: np.ndarray | None = None
        self._pool = WorkPool(0 if len(self.pieces) == 1 else max(1, int(n_threads)))
        weakref.finalize(self, self._pool.shutdown)
        self._tails: list[Future | None] = [None] * len(self.pieces)
        self._iteration: _Iteration | None = None
        if group_id is not None:
            _GROUPS[group_id] = self

    @property
    def n_cells(self) -> int:
        return sum(len(p.z) for p in self.pieces)

    def close(self) -> None:
        self._pool.shutdown()

    # -- the pool ----------------------------------------------------------------------------------

    def _submit(self, i: int, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` in the background after every background job already given for piece ``i``."""
        previous = self._tails[i]

        def job() -> Any:
            if previous is not None:
                previous.result()  # started before this job (first in, first out)
            return fn()

        future = self._pool.submit(job)
        self._tails[i] = future
        return future

    def _each(self, fn: Callable[[Piece], Any], pieces: Sequence[int] | None = None) -> list[Any]:
        """``fn(piece)`` for the given pieces (default all), in the pool; results in piece order."""
        indices = range(len(self.pieces)) if pieces is None else pieces
        futures = [self._submit(i, partial(fn, self.pieces[i])) for i in indices]
        return [f.result() for f in futures]

    def _settle(self) -> None:
        for tail in self._tails:
            if tail is not None:
                tail.result()

    # -- checks and the start ----------------------------------------------------------------------

    def n_nonfinite(self) -> int:
        return sum(self._each(Piece.n_nonfinite))

    def take(self, global_index: np.ndarray) -> np.ndarray:
        return np.concatenate(self._each(lambda p: p.take(global_index)))

    def initial_sums(self, y: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        parts = self._each(lambda p: p.initial_sums(y, self.spec.sigma, self.spec.n_patterns))
        return total(*(p[0] for p in parts)), total(*(p[1] for p in parts)), total(*(p[2] for p in parts))

    # -- a clustering iteration, block by block ------------------------------------------------------

    def block_prepared(
        self, number: int, position: int, start: tuple[np.ndarray, Sequence[int]] | None = None
    ) -> list[Future]:
        """Futures of the kernels of block ``order[position]``, to wait for before :meth:`weigh_block`.

        The first block starts the iteration: ``start`` gives its centroids and block order.
        """
        if position == 0:
            if start is None:
                raise RuntimeError(f"clustering iteration {number} needs its centroids and block order")
            self._settle()
            y, order = start
            n = len(self.pieces)
            self._iteration = it = _Iteration(
                number,
                y,
                list(order),
                0,
                [[None, None] for _ in range(n)],
                [],
                [0.0] * n,
                [np.zeros_like(y) for _ in range(n)],
            )
            it.prepared = [self._submit(i, partial(self._prepare, it, i, 0)) for i in range(n)]
        it = self._iteration
        if it is None or it.number != number or it.position != position:
            raise RuntimeError(f"block {position} of clustering iteration {number} was not expected here")
        return it.prepared

    def _prepare(self, it: _Iteration, i: int, position: int) -> None:
        piece, parity = self.pieces[i], position % 2
        it.kernels[i][parity] = piece.kernel(it.order[position], it.y, self.spec.sigma, buffers=parity)

    def weigh_block(self, penalty: np.ndarray) -> list[Future]:
        """Weigh the current block of every piece with ``penalty`` (p x k), as urgent jobs.

        Futures of each piece's ``S``.
        """
        it = self._iteration
        b, parity = it.order[it.position], it.position % 2

        def weigh(i: int) -> np.ndarray:
            piece = self.pieces[i]
            s = np.zeros_like(penalty)
            it.logz[i] += it.kernels[i][parity].weigh(penalty, piece.codes[piece.block(b)], s)
            return s

        return [self._pool.submit(partial(weigh, i), urgent=True) for i in range(len(self.pieces))]

    def after_block(self) -> bool:
        """Queue the background work that follows a weighed block; whether the iteration is complete.

        The work is the next block's kernels and this block's centroid sums.
        """
        it = self._iteration
        parity = it.position % 2
        it.position += 1
        if it.position < len(it.order):
            it.prepared = [self._submit(i, partial(self._prepare, it, i, it.position)) for i in range(len(self.pieces))]
        for i in range(len(self.pieces)):
            self._submit(i, partial(self._add_centroid_sums, it, i, parity))
        return it.position == len(it.order)

    @staticmethod
    def _add_centroid_sums(it: _Iteration, i: int, parity: int) -> None:
        kernel = it.kernels[i][parity]
        it.centroid_sums[i] += kernel.centroid_sums()
        it.kernels[i][parity] = None

    def update_block(
        self, number: int, position: int, penalty: np.ndarray, start: tuple[np.ndarray, Sequence[int]] | None = None
    ) -> BlockResult:
        """``S`` (p x k) of block ``order[position]`` after weighing it with ``penalty``.

        After the last block, also the iteration's sums (see :meth:`block_prepared` for ``start``).
        """
        for future in self.block_prepared(number, position, start):
            future.result()
        s = total(*(f.result() for f in self.weigh_block(penalty)))
        if not self.after_block():
            return BlockResult(s, None)
        self._settle()
        return BlockResult(s, self._end())

    def _end(self) -> tuple[float, np.ndarray]:
        """The iteration's entropy part and centroid sums, once every block is done."""
        it = self._iteration
        self._iteration = None
        return total(*it.logz), total(*it.centroid_sums)

    def cluster_iteration(self, number: int, order: Sequence[int], y: np.ndarray, block_s: np.ndarray) -> IterationSums:
        """A whole clustering iteration when this group holds every cell (no reduction across groups)."""
        return drive_blocks(
            list(order), y, block_s, self.spec.terms, lambda *request: [self.update_block(number, *request)]
        )

    # -- correction --------------------------------------------------------------------------------

    def ridge_sums(self, y: np.ndarray, penalties: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = self._each(lambda p: p.ridge_sums(y, self.spec.sigma, penalties))
        return total(*(p[0] for p in parts)), total(*(p[1] for p in parts))

    def correct(self, version: int, step: CorrectionStep) -> np.ndarray:
        """Apply correction number ``version`` (counted from 1); the new centroid sums.

        Applying the correction this group already has returns its result again, so that the
        driver can repeat a step that another group did not finish.
        """
        if version == self.version and self._last_centroid_sums is not None:
            return self._last_centroid_sums
        if version != self.version + 1:
            raise RuntimeError(f"correction {version} cannot follow correction {self.version}")
        states = self._each(lambda p: p.corrected_state(step, self.spec.sigma))
        for piece, (z_corr, z_clustered, _) in zip(self.pieces, states, strict=True):
            piece.z_corr, piece.z_clustered = z_corr, z_clustered
        self.version = version
        self._last_centroid_sums = total(*(s[2] for s in states))
        return self._last_centroid_sums

    def replay(self, log: Sequence[CorrectionStep]) -> None:
        """Bring the group to the state after every correction in ``log``."""
        for version in range(self.version + 1, len(log) + 1):
            self.correct(version, log[version - 1])

    # -- outputs -----------------------------------------------------------------------------------

    def output(
        self,
        chunk: int,
        what: str,
        y: np.ndarray | None = None,
        penalties: np.ndarray | None = None,
        out: np.ndarray | None = None,
        piece: int | None = None,
    ) -> np.ndarray:
        """Chunk ``chunk``'s corrected PCs (``what='corrected'``) or assignments (``'assignments'``).

        In the original cell order (written into ``out`` if given); only its ``piece``-th piece
        (:func:`~symphony_dask._harmony.piece.piece_bounds`) if given.
        """
        pieces = self.chunk_pieces[chunk] if piece is None else [self.chunk_pieces[chunk][piece]]
        first = self.pieces[pieces[0]].offset
        n = sum(len(self.pieces[i].z) for i in pieces)
        if out is None:
            out = np.empty((n, self.pieces[pieces[0]].z.shape[1] if what == "corrected" else y.shape[1]))

        def write(piece: Piece) -> None:
            rows = out[piece.offset - first : piece.offset - first + len(piece.z)]
            if what == "corrected":
                piece.corrected(rows)
            else:
                piece.assignments(y, self.spec.sigma, penalties, rows)

        self._each(write, pieces)
        return out


def chunk_output(
    z: np.ndarray,
    codes: np.ndarray,
    offset: int,
    chunk: int,
    spec: RunSpec,
    log: Sequence[CorrectionStep],
    group_id: str,
    what: str,
    y: np.ndarray | None = None,
    penalties: np.ndarray | None = None,
    piece: int | None = None,
) -> np.ndarray:
    """An output chunk of a Harmony run (or one ``piece`` of it), from the chunk's PCs and the run's log.

    Taken from the run's group when it is alive in this process (the usual case); otherwise, as
    when dask recomputes a lost output chunk, recomputed from ``z`` by replaying the corrections.
    """
    group = _GROUPS.get(group_id)
    if group is None or chunk not in group.chunk_pieces or group.version != len(log):
        logger.info("Harmony output chunk %d: replaying %d correction(s) from the PCs", chunk, len(log))
        group = ChunkGroup(None, [(chunk, offset, z, codes)], spec, n_threads=1)
        group.replay(log)
        try:
            return group.output(chunk, what, y, penalties, piece=piece)
        finally:
            group.close()
    return group.output(chunk, what, y, penalties, piece=piece)


@dataclass
class BlockResult:
    """A group's answer to a block.

    Its ``S`` (p x k) and, after the last block, the iteration's entropy part and centroid sums.
    """

    s: np.ndarray
    end: tuple[float, np.ndarray] | None


def drive_blocks(
    order: list[int], y: np.ndarray, block_s: np.ndarray, terms: PenaltyTerms, update: Callable[..., list[BlockResult]]
) -> IterationSums:
    """The block loop of a clustering iteration.

    ``update(position, penalty, start)`` weighs the block at ``position`` in every group and returns each
    group's :class:`BlockResult`.
    """
    steps = block_steps(order, y, block_s, terms)
    request = next(steps)
    while True:
        try:
            request = steps.send(update(*request))
        except StopIteration as done:
            return done.value


def block_steps(order: list[int], y: np.ndarray, block_s: np.ndarray, terms: PenaltyTerms):
    """Generator form of the block loop (for an async driver).

    Yields the arguments of each block's update (position, penalty, and for the first block the centroids and
    the order), receives the groups' :class:`BlockResult`, whose ``S`` are added in group order, and returns
    the iteration's :class:`IterationSums`.
    """
    ledger = Ledger.start(block_s, order[0], terms)
    for position, b in enumerate(order):
        parts = yield position, ledger.penalty, ((y, order) if position == 0 else None)
        following = order[position + 1] if position + 1 < len(order) else None
        ledger.advance(b, total(*(p.s for p in parts)), following, terms)
    return IterationSums(
        ledger.new, ledger.penalties, ledger.logw, total(*(p.end[0] for p in parts)), total(*(p.end[1] for p in parts))
    )
