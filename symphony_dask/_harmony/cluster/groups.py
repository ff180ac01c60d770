"""How the Harmony driver reaches its chunk groups: one group in this process, or one group per
worker of a distributed cluster, kept there as a dask actor and called directly.

Harmony's clustering visits 20 blocks per iteration, each a reduction across all cells followed by
a new penalty. Through the scheduler, each block was a barrier of the task graph (a scheduler
round trip per block, thousands per run). Here the chunks stay with the groups for the whole run
and the driver talks to the groups without the scheduler: with one group (the threaded scheduler,
or a cluster whose data fit one worker) a clustering iteration is one call; with several, a
block is one direct call to each group's worker, while the groups compute the heavy half of the
next block in the background (see :class:`~symphony_dask._harmony.chunk.ChunkGroup`).

A worker lost during the run takes its group with it: the driver raises :class:`GroupsLost`, and
:meth:`ClusterGroups.recover` creates the group again on a live worker (dask recomputes the
chunks' PCs from their lineage if they were lost too) and replays the corrections so far, after
which the step is repeated. Every sum is folded in chunk order, so the result is the same bit for
bit as without the loss.

A peer that cannot be reached on its channel (a firewall between the workers that rejects or drops
the connection, or a connection broken in mid-run) but still answers through dask's RPC is not
lost: its blocks go through dask's RPC for the rest of the run, the client logs that once, and
the clustering iteration is repeated.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Sequence
from typing import Any

import dask
import numpy as np
from distributed.protocol import to_serialize

from symphony_dask._dask.chunked import total
from symphony_dask._harmony.chunk import BlockResult, ChunkGroup, CorrectionStep, IterationSums, RunSpec, block_steps
from symphony_dask._harmony.cluster.channel import TOKEN_BYTES, Channel, serve

logger = logging.getLogger("symphony_dask")

#: Fewest cells per group on a cluster: below it, one more worker costs more in block round trips
#: than it saves in work (measured on a 2-process LocalCluster).
MIN_GROUP_CELLS = 50_000
#: Seconds to wait for a live worker when groups must be rebuilt.
RECOVERY_TIMEOUT = 120.0
#: Seconds to wait for a lost worker's replacement (a nanny restarts it) before using the others.
REPLACEMENT_WAIT = 10.0
#: Seconds a peer whose channel failed has to answer through dask's RPC before it counts as lost.
PEER_TIMEOUT = 5.0


class GroupsLost(Exception):
    """Groups (by slot) whose worker was lost during a step."""

    def __init__(self, slots: list[int], causes: list[BaseException]) -> None:
        super().__init__(f"lost the chunk groups in slots {slots}: {causes[0]!r}")
        self.slots = slots
        self.causes = causes


class LocalGroups:
    """All chunks in one group in this process, worked on by ``n_threads`` threads."""

    def __init__(
        self, chunks: Sequence[tuple[int, int, np.ndarray, np.ndarray]], spec: RunSpec, n_threads: int
    ) -> None:
        self.group = ChunkGroup(f"harmony-{uuid.uuid4().hex}", chunks, spec, n_threads)

    def __len__(self) -> int:
        return 1

    def call(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.group, method)(*args)]

    def cluster_iteration(self, number: int, order: list[int], y: np.ndarray, block_s: np.ndarray) -> IterationSums:
        return self.group.cluster_iteration(number, order, y, block_s)

    def location(self, chunk: int) -> tuple[str, str | None]:
        return self.group.group_id, None

    def finish(self) -> None:  # nothing between groups to close
        pass

    def recover(self, slots: list[int], log: Sequence[CorrectionStep]) -> None:  # nothing to lose here
        raise RuntimeError("a group in this process cannot be lost")


class ActorChunkGroup(ChunkGroup):
    """A :class:`ChunkGroup` living on a worker as a dask actor.

    The group in the first slot leads each clustering iteration (:meth:`lead_iteration`): it runs the
    block loop on its worker's event loop and sends each block to its peers over a
    :class:`~symphony_dask._harmony.cluster.channel.Channel` (or dask's RPC where the cluster's comms are not
    plain TCP, or the channel cannot be used), so a block costs one message to each peer and back,
    and the client one call per iteration.
    """

    _server: asyncio.AbstractServer | None = None
    _channels: dict[int, Channel] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # one block at a time: a block sent on a channel that then broke may still be running when
        # the leader, having fallen back to dask's RPC, starts the iteration again
        self._one_block = asyncio.Lock()

    async def update_block_async(
        self, number: int, position: int, penalty: np.ndarray, start: tuple[np.ndarray, Sequence[int]] | None = None
    ) -> BlockResult:
        """:meth:`~ChunkGroup.update_block`, waiting on the event loop instead of in a thread."""
        async with self._one_block:
            await _all(self.block_prepared(number, position, start))
            s = total(*await _all(self.weigh_block(penalty)))
            if not self.after_block():
                return BlockResult(s, None)
            await _all([tail for tail in self._tails if tail is not None])
            return BlockResult(s, self._end())

    async def ping(self) -> None:
        """Nothing: that this answers through dask's RPC shows the group and its worker are there."""

    async def cluster_iteration_async(
        self, number: int, order: list[int], y: np.ndarray, block_s: np.ndarray
    ) -> IterationSums:
        """:meth:`~ChunkGroup.cluster_iteration` on the event loop (no thread hop per call)."""
        if self._pool.inline:  # one piece: a few milliseconds of work, no waiting on threads
            return self.cluster_iteration(number, order, y, block_s)
        return await asyncio.to_thread(self.cluster_iteration, number, order, y, block_s)

    async def _channel_block(self, number: int, position: int, penalty: np.ndarray, start) -> tuple:
        result = await self.update_block_async(number, position, penalty, start)
        return result.s, result.end

    async def open_channel(self, token: bytes) -> tuple[str, int] | None:
        """Listen for the leader's channel (see :mod:`symphony_dask._harmony.cluster.channel`); the endpoint,
        or ``None`` where the worker's comms are not plain TCP.
        """
        from distributed import get_worker

        scheme, _, location = get_worker().address.partition("://")
        if scheme != "tcp":
            return None
        await self.close_channel()
        host = location.rsplit(":", 1)[0].strip("[]")
        self._server = await serve(host, token, self._channel_block)
        return host, int(self._server.sockets[0].getsockname()[1])

    async def close_channel(self) -> None:
        """Stop listening, and close this group's connections to its peers."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for channel in (self._channels or {}).values():
            channel.close()
        self._channels = None

    async def lead_iteration(
        self,
        number: int,
        order: list[int],
        y: np.ndarray,
        block_s: np.ndarray,
        peers: list[Any],
        endpoints: list[tuple[str, int] | None],
        token: bytes,
    ) -> IterationSums | _Lost | _NoChannel:
        """A whole clustering iteration over this group (slot 0) and its ``peers`` (slots 1, 2, ...),
        reached at ``endpoints`` (``None``: through dask's RPC); a :class:`_Lost` naming the slots of
        peers that could not be reached, or else a :class:`_NoChannel` naming those reached only
        through dask's RPC (the iteration is then to be repeated with their endpoints ``None``).
        """
        if self._channels is None:
            self._channels = {}
        steps = block_steps(order, y, block_s, self.spec.terms)
        request = next(steps)
        while True:
            position, penalty, start = request
            wire = None if start is None else (start[0], np.asarray(start[1], dtype=np.int64))
            calls = [self.update_block_async(number, position, penalty, start)]
            calls += [
                self._peer_block(slot, peer, endpoint, token, number, position, penalty, wire)
                for slot, (peer, endpoint) in enumerate(zip(peers, endpoints), start=1)
            ]
            parts = await asyncio.gather(*calls)
            lost = [slot for slot, r in enumerate(parts) if isinstance(r, _Lost)]
            if lost:
                for slot in lost:
                    self._drop_channel(slot)
                return _Lost(parts[lost[0]].cause, lost)
            unreachable = [slot for slot, r in enumerate(parts) if isinstance(r, _NoChannel)]
            if unreachable:
                return _NoChannel(unreachable, [parts[slot].causes[0] for slot in unreachable])
            try:
                request = steps.send(parts)
            except StopIteration as done:
                return done.value

    async def _peer_block(
        self, slot: int, peer: Any, endpoint: tuple[str, int] | None, token: bytes, *request: Any
    ) -> BlockResult | _Lost | _NoChannel:
        """The block ``request`` on the peer of ``slot``; where its channel cannot be opened or
        breaks, a :class:`_Lost` unless the peer answers through dask's RPC, else a :class:`_NoChannel`.
        """
        if endpoint is None:
            return await _peer_call(peer, "update_block_async", *request)
        try:
            channel = self._channels.get(slot)
            if channel is None or channel.endpoint != tuple(endpoint):
                self._drop_channel(slot)
                channel = self._channels[slot] = await Channel.open(tuple(endpoint), token)
            s, end = await channel.call(*request)
        except OSError as err:  # refused, timed out, broken (see Channel.open and Channel.call)
            self._drop_channel(slot)
            lost = await _unanswered(peer)
            return _NoChannel([slot], [err]) if lost is None else lost
        return BlockResult(s, end)

    def _drop_channel(self, slot: int) -> None:
        channel = self._channels.pop(slot, None)
        if channel is not None:
            channel.close()


async def _all(futures: list) -> list:
    """Results of concurrent futures, awaited on the event loop (at once when all are done)."""
    if all(f.done() for f in futures):
        return [f.result() for f in futures]
    return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))


async def actor_call(rpc: Any, actor: Any, method: str, *args: Any) -> Any:
    """Call ``method`` of ``actor`` through the worker's ``actor_execute`` handler with ``rpc`` (a
    connection pool's rpc to the actor's worker): what :class:`distributed.Actor` does for a method
    call, without its per-call future machinery (~1 ms of Python per call here). A
    :class:`_Lost` if the worker, or the actor on it, is gone.
    """
    try:
        response = await rpc.actor_execute(
            function=method, actor=actor.key, args=[to_serialize(a) for a in args], kwargs={}
        )
        if response["status"] != "OK":
            raise response["exception"]
        return response["result"]
    except Exception as err:
        if _is_lost(err):
            return _Lost(err)
        raise


async def _peer_call(peer: Any, method: str, *args: Any) -> Any:
    from distributed import get_worker

    return await actor_call(get_worker().rpc(peer._address), peer, method, *args)


async def _unanswered(peer: Any) -> _Lost | None:
    """``None`` if ``peer`` answers through dask's RPC within :data:`PEER_TIMEOUT` seconds, else a
    :class:`_Lost`.
    """
    try:
        answer = await asyncio.wait_for(_peer_call(peer, "ping"), PEER_TIMEOUT)
    except asyncio.TimeoutError as err:
        return _Lost(err)
    return answer if isinstance(answer, _Lost) else None


class ClusterGroups:
    """One group per worker (at most one per :data:`MIN_GROUP_CELLS` cells), each holding a
    contiguous run of chunks, as dask actors called from the client's event loop.

    Parameters
    ----------
    client
        The distributed client.
    chunks
        Per chunk: (index, global offset, future of its PCs, pattern codes).
    sizes
        Cells per chunk.
    spec
        What the run's pieces share.
    """

    def __init__(
        self, client, chunks: Sequence[tuple[int, int, Any, np.ndarray]], sizes: Sequence[int], spec: RunSpec
    ) -> None:
        self.client = client
        self.chunks = list(chunks)
        self.spec = spec
        workers = client.scheduler_info(n_workers=-1)["workers"]
        if not workers:
            client.wait_for_workers(1, timeout=RECOVERY_TIMEOUT)
            workers = client.scheduler_info(n_workers=-1)["workers"]
        n_groups = max(1, min(len(workers), sum(sizes) // MIN_GROUP_CELLS, len(sizes)))
        self.n_workers = len(workers)
        self.slots = _contiguous_runs(sizes, n_groups)
        self.workers = _place(self.slots, [c[2] for c in self.chunks], sizes, workers, client)
        self.ids: list[str] = [""] * n_groups
        self.futures: list[Any] = [None] * n_groups
        self.actors: list[Any] = [None] * n_groups
        for slot in range(n_groups):
            self._create(slot, workers)
        for slot, future in enumerate(self.futures):
            self.actors[slot] = future.result()
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.endpoints: list[tuple[str, int] | None] = [None] * n_groups
        #: workers whose groups the leader could not reach on a channel: reached through dask's RPC
        self.without_channel: set[str] = set()
        try:
            self._open_channels(range(1, n_groups))
        except BaseException:
            self.finish()
            raise

    def __len__(self) -> int:
        return len(self.slots)

    def _create(self, slot: int, workers: dict[str, dict]) -> None:
        address = self.workers[slot]
        self.ids[slot] = f"harmony-{uuid.uuid4().hex}"
        self.futures[slot] = self.client.submit(
            ActorChunkGroup,
            self.ids[slot],
            [self.chunks[i] for i in self.slots[slot]],
            self.spec,
            workers[address]["nthreads"],
            actor=True,
            workers=[address],
            allow_other_workers=False,
            pure=False,
            key=self.ids[slot],
        )

    # -- calls -------------------------------------------------------------------------------------

    async def _call(self, slot: int, method: str, *args: Any) -> Any:
        actor = self.actors[slot]
        return await actor_call(self.client.rpc(actor._address), actor, method, *args)

    async def call_all(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every group; results in slot order."""
        results = await asyncio.gather(*(self._call(s, method, *args) for s in range(len(self))))
        lost = [s for s, r in enumerate(results) if isinstance(r, _Lost)]
        if lost:
            raise GroupsLost(lost, [results[s].cause for s in lost])
        return results

    def call(self, method: str, *args: Any) -> list[Any]:
        return self.client.sync(self.call_all, method, *args)

    def cluster_iteration(self, number: int, order: list[int], y: np.ndarray, block_s: np.ndarray) -> IterationSums:
        """One clustering iteration: one call to the group of slot 0, which leads the others."""
        if len(self) == 1:
            return self.call("cluster_iteration_async", number, order, y, block_s)[0]
        while True:  # repeated when peers turn out unreachable on their channels (at most once each)
            result = self.client.sync(
                self._call,
                0,
                "lead_iteration",
                number,
                order,
                y,
                block_s,
                self.actors[1:],
                self.endpoints[1:],
                self.token,
            )
            if isinstance(result, _Lost):
                raise GroupsLost(result.slots, [result.cause])
            if not isinstance(result, _NoChannel):
                return result
            for slot, cause in zip(result.slots, result.causes):
                self._fall_back(slot, cause)

    def _fall_back(self, slot: int, cause: BaseException) -> None:
        """Reach the group of ``slot`` through dask's RPC from now on: its channel failed with ``cause``."""
        host, port = self.endpoints[slot]
        logger.warning(
            "Harmony: no channel to the chunk group on %s (%s port %d: %s: %s); its blocks go "
            "through dask's RPC for the rest of the run",
            self.workers[slot],
            host,
            port,
            type(cause).__name__,
            cause,
        )
        self.endpoints[slot] = None
        self.without_channel.add(self.workers[slot])

    def _open_channels(self, slots) -> None:
        """Have the peers of ``slots`` listen for the leader, except on workers without channels."""
        self.endpoints = list(self.endpoints)
        slots = [s for s in slots if s > 0]
        for slot in slots:
            self.endpoints[slot] = None
        slots = [s for s in slots if self.workers[s] not in self.without_channel]
        if slots:
            for slot, endpoint in zip(slots, self.client.sync(self._open, slots)):
                self.endpoints[slot] = None if isinstance(endpoint, _Lost) else endpoint

    async def _open(self, slots: list[int]) -> list[Any]:
        return await asyncio.gather(*(self._call(s, "open_channel", self.token) for s in slots))

    def finish(self) -> None:
        """Close the channels between the groups (the groups themselves stay for the outputs)."""
        self.client.sync(self.call_all_quietly, "close_channel")

    async def call_all_quietly(self, method: str) -> None:
        await asyncio.gather(*(self._call(s, method) for s in range(len(self))), return_exceptions=True)

    # -- placement and recovery ----------------------------------------------------------------------

    def location(self, chunk: int) -> tuple[str, str]:
        """The id and worker of the group holding ``chunk``."""
        slot = next(s for s, members in enumerate(self.slots) if chunk in members)
        return self.ids[slot], self.workers[slot]

    def recover(self, slots: list[int], log: Sequence[CorrectionStep]) -> None:
        """Create the groups of ``slots`` again on live workers and replay ``log`` on them."""
        workers = self._live_workers(dead={self.workers[slot] for slot in slots}, n_lost=len(slots))
        for slot in slots:
            self.futures[slot].release()
            taken = {self.workers[s] for s in range(len(self)) if s not in slots}
            free = sorted(set(workers) - taken) or sorted(workers)
            self.workers[slot] = free[0]
            self._create(slot, workers)
            logger.warning(
                "Harmony: chunk group %d lost with its worker; rebuilt on %s from the PCs and %d correction(s)",
                slot,
                self.workers[slot],
                len(log),
            )
        for slot in slots:
            self.actors[slot] = self.futures[slot].result()
        results = self.client.sync(self._replay, slots, list(log))
        lost = [s for s, r in zip(slots, results) if isinstance(r, _Lost)]
        if lost:
            raise GroupsLost(lost, [r.cause for r in results if isinstance(r, _Lost)])
        self._open_channels(slots)

    def _live_workers(self, dead: set[str], n_lost: int) -> dict[str, dict]:
        """The workers to rebuild lost groups on, never one of the ``dead`` addresses (the scheduler
        may still list a killed worker for a moment, and a group pinned to it would wait forever):
        as many as before if a nanny restarts them within REPLACEMENT_WAIT seconds, else whichever
        live workers there are within RECOVERY_TIMEOUT.
        """
        start = time.monotonic()
        while True:
            info = self.client.scheduler_info(n_workers=-1)["workers"]
            live = {address: meta for address, meta in info.items() if address not in dead}
            waited = time.monotonic() - start
            if len(live) >= self.n_workers or (live and waited >= REPLACEMENT_WAIT):
                return live
            if waited >= RECOVERY_TIMEOUT:
                raise RuntimeError(
                    f"Harmony lost {n_lost} worker(s) and no worker came back within {RECOVERY_TIMEOUT:.0f} s; "
                    "check the cluster (its workers may have run out of memory: try a smaller chunk_size)"
                )
            time.sleep(0.1)

    async def _replay(self, slots: list[int], log: list[CorrectionStep]) -> list[Any]:
        return await asyncio.gather(*(self._call(s, "replay", log) for s in slots))


class _Lost:
    """A call that could not reach its group's worker (``slots``: the groups lost, where known)."""

    def __init__(self, cause: BaseException, slots: list[int] | None = None) -> None:
        self.cause = cause
        self.slots = slots or [0]


class _NoChannel:
    """Peers (by slot) whose channel could not be used, each for its ``cause``, though they answer
    through dask's RPC.
    """

    def __init__(self, slots: list[int], causes: list[BaseException]) -> None:
        self.slots = slots
        self.causes = causes


def _is_lost(err: BaseException) -> bool:
    """Whether a failed actor call means that the actor's worker is gone."""
    if isinstance(err, OSError):  # includes distributed's CommClosedError
        return True
    if isinstance(err, RuntimeError) and "Actor was lost" in str(err):
        return True
    return isinstance(err, KeyError) and str(err).strip("'\"").startswith("harmony-")


def _contiguous_runs(sizes: Sequence[int], n_groups: int) -> list[list[int]]:
    """Split chunk indices into ``n_groups`` contiguous runs of nearly equal cell counts."""
    ends = np.cumsum(sizes)
    total = int(ends[-1])
    runs: list[list[int]] = []
    start = 0
    for g in range(n_groups):
        if g == n_groups - 1:
            stop = len(sizes)
        else:
            target = total * (g + 1) / n_groups
            stop = int(np.argmin(np.abs(ends - target))) + 1
            stop = min(max(stop, start + 1), len(sizes) - (n_groups - g - 1))
        runs.append(list(range(start, stop)))
        start = stop
    return runs


def _place(
    slots: list[list[int]], futures: list[Any], sizes: Sequence[int], workers: dict[str, dict], client
) -> list[str]:
    """A distinct worker per slot, preferring the worker that already holds most of its cells."""
    who_has = client.who_has(futures)
    free = sorted(workers)
    chosen = []
    for slot in slots:
        held = dict.fromkeys(free, 0)
        for i in slot:
            for address in who_has.get(futures[i].key, ()):
                if address in held:
                    held[address] += sizes[i]
        best = max(free, key=lambda a: (held[a], workers[a]["nthreads"], -free.index(a)))
        chosen.append(best)
        free.remove(best)
    return chosen


def local_threads() -> int:
    """Threads for a group in this process: dask's ``num_workers``, one for its synchronous
    scheduler, else the number of CPUs.
    """
    import os

    scheduler = dask.config.get("scheduler", None)
    if scheduler in ("sync", "synchronous", "single-threaded"):
        return 1
    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
