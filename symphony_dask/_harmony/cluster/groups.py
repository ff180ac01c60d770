"""How the Harmony driver reaches its chunk groups: one in this process, or one per worker of a cluster.

On a cluster each group is kept on its worker as a dask actor
(:class:`~symphony_dask._harmony.cluster.actor.ActorChunkGroup`) and called directly. Harmony's
clustering visits 20 blocks per iteration, each a reduction across all cells followed by a new
penalty; as tasks, every block would be a barrier of the task graph and a round trip through the
scheduler. So the chunks stay with the groups for the whole run and the driver talks to the groups
without the scheduler: with one group (the threaded scheduler, or a cluster whose data fit one
worker) a clustering iteration is one call; with several, a block is one direct call to each
group's worker, while the groups compute the heavy half of the next block in the background (see
:class:`~symphony_dask._harmony.chunk.ChunkGroup`).

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
import os
import secrets
import time
import uuid
from collections.abc import Sequence
from typing import Any

import dask
import numpy as np

from symphony_dask._harmony.chunk import ChunkGroup, CorrectionStep, IterationSums, RunSpec
from symphony_dask._harmony.cluster.actor import ActorChunkGroup, Lost, NoChannel, actor_call
from symphony_dask._harmony.cluster.channel import TOKEN_BYTES
from symphony_dask._harmony.cluster.internals import actor_address, connection
from symphony_dask._harmony.cluster.placement import contiguous_runs, place

logger = logging.getLogger("symphony_dask")

#: Fewest cells per group on a cluster: below it, one more worker costs more in block round trips
#: than it saves in work.
MIN_GROUP_CELLS = 50_000
#: Seconds to wait for a live worker when groups must be rebuilt.
RECOVERY_TIMEOUT = 120.0
#: Seconds to wait for a lost worker's replacement (a nanny restarts it) before using the others.
REPLACEMENT_WAIT = 10.0


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


class ClusterGroups:
    """One group per worker (at most one per :data:`MIN_GROUP_CELLS` cells), as dask actors called from the client.

    Each group holds a contiguous run of chunks; the calls go out from the client's event loop.

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
        self.slots = contiguous_runs(sizes, n_groups)
        self.workers = place(self.slots, [c[2] for c in self.chunks], sizes, workers, client)
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
        return await actor_call(connection(self.client, actor_address(actor)), actor, method, *args)

    async def call_all(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every group; results in slot order."""
        results = await asyncio.gather(*(self._call(s, method, *args) for s in range(len(self))))
        lost = [s for s, r in enumerate(results) if isinstance(r, Lost)]
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
            if isinstance(result, Lost):
                raise GroupsLost(result.slots, [result.cause])
            if not isinstance(result, NoChannel):
                return result
            for slot, cause in zip(result.slots, result.causes, strict=True):
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
            for slot, endpoint in zip(slots, self.client.sync(self._open, slots), strict=True):
                self.endpoints[slot] = None if isinstance(endpoint, Lost) else endpoint

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
        lost = [s for s, r in zip(slots, results, strict=True) if isinstance(r, Lost)]
        if lost:
            raise GroupsLost(lost, [r.cause for r in results if isinstance(r, Lost)])
        self._open_channels(slots)

    def _live_workers(self, dead: set[str], n_lost: int) -> dict[str, dict]:
        """The workers to rebuild lost groups on, never one of the ``dead`` addresses.

        The scheduler may still list a killed worker for a moment, and a group pinned to it would
        wait forever. As many workers as before if a nanny restarts them within
        :data:`REPLACEMENT_WAIT` seconds, else whichever live workers there are within
        :data:`RECOVERY_TIMEOUT`.
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


def local_threads() -> int:
    """Threads for a group in this process: dask's ``num_workers``, one for its synchronous scheduler, else the CPUs."""
    scheduler = dask.config.get("scheduler", None)
    if scheduler in ("sync", "synchronous", "single-threaded"):
        return 1
    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
