"""A chunk group on a worker, as a dask actor, and the direct calls that reach it.

On a cluster each group lives on its worker as an :class:`ActorChunkGroup`. The group in the first
slot leads each clustering iteration: it runs the block loop on its worker's event loop and sends
each block to its peers over a :class:`~symphony_dask._harmony.cluster.channel.Channel`, or through
dask's RPC where the channel cannot be used. A call that cannot reach its group's worker gives a
:class:`Lost` marker instead of raising, so that the caller can rebuild the group
(:meth:`~symphony_dask._harmony.cluster.groups.ClusterGroups.recover`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np

from symphony_dask._dask.chunked import total
from symphony_dask._harmony.chunk import BlockResult, ChunkGroup, IterationSums, block_steps
from symphony_dask._harmony.cluster.channel import Channel, serve
from symphony_dask._harmony.cluster.internals import (
    actor_address,
    call_actor,
    connection,
    is_actor_lost_error,
    missing_actor_key,
)

#: Seconds a peer whose channel failed has to answer through dask's RPC before it counts as lost.
PEER_TIMEOUT = 5.0


class Lost:
    """A call that could not reach its group's worker (``slots``: the groups lost, where known)."""

    def __init__(self, cause: BaseException, slots: list[int] | None = None) -> None:
        self.cause = cause
        self.slots = slots or [0]


class NoChannel:
    """Peers (by slot) whose channel could not be used, each for its ``cause``, though they answer dask's RPC."""

    def __init__(self, slots: list[int], causes: list[BaseException]) -> None:
        self.slots = slots
        self.causes = causes


class ActorChunkGroup(ChunkGroup):
    """A :class:`~symphony_dask._harmony.chunk.ChunkGroup` living on a worker as a dask actor.

    The group in the first slot leads each clustering iteration (:meth:`lead_iteration`): it runs the
    block loop on its worker's event loop and sends each block to its peers over a
    :class:`~symphony_dask._harmony.cluster.channel.Channel` (or dask's RPC where the cluster's comms are
    not plain TCP, or the channel cannot be used), so a block costs one message to each peer and
    back, and the client one call per iteration.
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
        """Listen for the leader's channel (see :mod:`symphony_dask._harmony.cluster.channel`).

        Returns the endpoint, or ``None`` where the worker's comms are not plain TCP.
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
    ) -> IterationSums | Lost | NoChannel:
        """A whole clustering iteration over this group (slot 0) and its ``peers`` (slots 1, 2, ...).

        The peers are reached at ``endpoints`` (``None``: through dask's RPC). Returns a
        :class:`Lost` naming the slots of peers that could not be reached, or else a
        :class:`NoChannel` naming those reached only through dask's RPC (the iteration is then to
        be repeated with their endpoints ``None``).
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
                for slot, (peer, endpoint) in enumerate(zip(peers, endpoints, strict=True), start=1)
            ]
            parts = await asyncio.gather(*calls)
            lost = [slot for slot, r in enumerate(parts) if isinstance(r, Lost)]
            if lost:
                for slot in lost:
                    self._drop_channel(slot)
                return Lost(parts[lost[0]].cause, lost)
            unreachable = [slot for slot, r in enumerate(parts) if isinstance(r, NoChannel)]
            if unreachable:
                return NoChannel(unreachable, [parts[slot].causes[0] for slot in unreachable])
            try:
                request = steps.send(parts)
            except StopIteration as done:
                return done.value

    async def _peer_block(
        self, slot: int, peer: Any, endpoint: tuple[str, int] | None, token: bytes, *request: Any
    ) -> BlockResult | Lost | NoChannel:
        """The block ``request`` on the peer of ``slot``.

        Where the peer's channel cannot be opened or breaks, a :class:`Lost` unless the peer answers
        through dask's RPC, else a :class:`NoChannel`.
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
            return NoChannel([slot], [err]) if lost is None else lost
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
    """Call ``method`` of ``actor`` with ``rpc`` (a connection to its worker), or a :class:`Lost` if that is gone.

    The call goes through the worker's ``actor_execute`` handler
    (:func:`~symphony_dask._harmony.cluster.internals.call_actor`), without the per-call future
    machinery of :class:`distributed.Actor`. The worker counts as gone when it cannot be reached
    or no longer holds the actor.
    """
    try:
        return await call_actor(rpc, actor, method, *args)
    except Exception as err:
        if _is_lost(err):
            return Lost(err)
        raise


async def _peer_call(peer: Any, method: str, *args: Any) -> Any:
    from distributed import get_worker

    return await actor_call(connection(get_worker(), actor_address(peer)), peer, method, *args)


async def _unanswered(peer: Any) -> Lost | None:
    """``None`` if ``peer`` answers through dask's RPC within :data:`PEER_TIMEOUT` seconds, else a :class:`Lost`."""
    try:
        answer = await asyncio.wait_for(_peer_call(peer, "ping"), PEER_TIMEOUT)
    except asyncio.TimeoutError as err:
        return Lost(err)
    return answer if isinstance(answer, Lost) else None


def _is_lost(err: BaseException) -> bool:
    """Whether a failed actor call means that the actor's worker is gone."""
    if isinstance(err, OSError):  # includes distributed's CommClosedError
        return True
    if is_actor_lost_error(err):
        return True
    key = missing_actor_key(err)
    return key is not None and key.startswith("harmony-")
