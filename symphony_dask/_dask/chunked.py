"""Lifting one-block kernels over row chunks of cells.

Every heavy step of symphony_dask is a *map* of a pure NumPy kernel over row chunks of cells
followed by a *tree reduction* of small statistics. This module holds the generic pieces:

- :func:`map_reduce`: apply ``kernel(block, *aligned_blocks)`` to each row chunk and combine the
  per-chunk results ``split_every`` at a time into one small result;
- :func:`map_rows`: apply a per-cell kernel and keep the result as a dask array with the same
  row chunks (per-cell outputs are never gathered on the client);
- :func:`one_blas_thread_per_task`: keeps BLAS from oversubscribing the cores under dask threads.

The in-memory path is the one-chunk case: a kernel applied to the whole matrix.
"""

from __future__ import annotations

import contextvars
import operator
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import dask
import dask.array as da
import numpy as np
from threadpoolctl import threadpool_limits

from symphony_dask._dask.progress import notebook_progress, watch_futures

#: How many partial results are combined by one task of a tree reduction.
SPLIT_EVERY = 8


def row_blocks(x: da.Array) -> list[Any]:
    """One delayed object per row chunk of a dask array that has a single column chunk."""
    if x.ndim == 2 and x.numblocks[1] != 1:
        raise ValueError(
            f"expected one chunk along the second axis, got {x.numblocks[1]} chunks {x.chunks[1]}; "
            "rechunk with x.rechunk({1: -1}) first"
        )
    return list(x.to_delayed().ravel())


def tree_reduce(parts: Sequence[Any], combine: Callable[[Any, Any], Any], split_every: int = SPLIT_EVERY) -> Any:
    """Combine delayed partial results by a balanced tree of ``combine`` calls.

    The shape of the tree depends only on the number of parts, so the result is the same on
    any scheduler and worker count.
    """
    if not parts:
        raise ValueError("nothing to reduce: the input has no chunks")
    level = list(parts)
    task = dask.delayed(fold, pure=True)
    while len(level) > 1:
        level = [task(combine, *level[i : i + split_every]) for i in range(0, len(level), split_every)]
    return level[0]


def fold(combine: Callable[[Any, Any], Any], *parts: Any) -> Any:
    """``combine`` the parts left to right."""
    out = parts[0]
    for p in parts[1:]:
        out = combine(out, p)
    return out


def total(*parts: Any) -> Any:
    """The parts added left to right: a fixed order, so that a sum does not depend on which part arrived first."""
    return fold(operator.add, *parts)


def map_reduce(
    kernel: Callable[..., Any],
    x: da.Array,
    *aligned: da.Array,
    combine: Callable[[Any, Any], Any],
    split_every: int = SPLIT_EVERY,
    **kwargs: Any,
) -> Any:
    """Delayed result of ``combine``-reducing ``kernel(block, *aligned_blocks, **kwargs)`` over row chunks.

    ``aligned`` are dask arrays with the same row chunks as ``x`` (per-cell covariates such as batch
    codes). Keyword arguments are passed unchanged to every kernel call; they sit in the graph once,
    not once per task.
    """
    blocks = row_blocks(x)
    lined_up = [aligned_blocks(a, x.chunks[0]) for a in aligned]
    shared = dask.delayed(kwargs, traverse=False)  # one copy in the graph, not one per task
    apply = dask.delayed(_apply, pure=True)
    parts = [apply(kernel, b, *(ab[i] for ab in lined_up), shared) for i, b in enumerate(blocks)]
    return tree_reduce(parts, combine, split_every)


def _apply(kernel: Callable[..., Any], *args: Any) -> Any:
    *blocks, kwargs = args
    return kernel(*blocks, **kwargs)


def aligned_blocks(a: da.Array, rows: tuple[int, ...]) -> list[Any]:
    """One delayed object per block of ``a`` rechunked to the row chunks ``rows`` (and one column chunk).

    A per-cell array lined up with another array's chunks.
    """
    if a.chunks[0] != rows:
        a = a.rechunk({0: rows})
    if a.ndim == 2 and a.numblocks[1] != 1:
        a = a.rechunk({1: -1})
    return list(a.to_delayed().ravel())


def map_rows(
    kernel: Callable[..., np.ndarray],
    x: da.Array,
    *aligned: da.Array,
    n_out: int,
    dtype: Any = np.float64,
    **kwargs: Any,
) -> da.Array:
    """Per-cell output ``kernel(block, *aligned_blocks, **kwargs)`` of shape (rows, n_out) as a dask array.

    The result has the row chunks of ``x`` and one column chunk.
    """
    aligned = tuple(a.rechunk({0: x.chunks[0]}) for a in aligned)
    args = [x, "ij"]
    for a in aligned:
        args += [a, "i" if a.ndim == 1 else "ik"]
    return da.blockwise(
        _call_kernel,
        "ij",
        *args,
        new_axes={},
        adjust_chunks={"j": n_out},
        concatenate=True,
        dtype=dtype,
        meta=np.empty((0, 0), dtype=dtype),
        kernel=kernel,
        **kwargs,
    )


def _call_kernel(block: Any, *rest: Any, kernel: Callable[..., np.ndarray], **kwargs: Any) -> np.ndarray:
    return kernel(block, *rest, **kwargs)


def distributed_client():
    """The active ``distributed`` client, or ``None`` (dask's local schedulers)."""
    try:
        from distributed import default_client
    except ImportError:
        return None
    try:
        return default_client()
    except ValueError:
        return None


#: Seconds a cluster may have no worker at all while a computation waits, before it fails.
NO_WORKERS_TIMEOUT_S = 120.0

_advice: contextvars.ContextVar[str] = contextvars.ContextVar("symphony_dask_advice", default="")


class WorkerFailure(RuntimeError):
    """Workers died running a computation (most often: out of memory), or none were left."""


@contextmanager
def failure_advice(text: str = "") -> Iterator[None]:
    """What to tell the user if a worker dies inside this block (how to make the work fit).

    The text can be given later in the block with :func:`advise`.
    """
    token = _advice.set(text)
    try:
        yield
    finally:
        _advice.reset(token)


def advise(text: str) -> None:
    """Set the advice of the enclosing :func:`failure_advice` block."""
    _advice.set(text)


def compute(*collections: Any) -> tuple:
    """``dask.compute`` on the active scheduler.

    On a distributed cluster, a task that killed its workers becomes a :class:`WorkerFailure` saying what ran
    and how to fix it (see :func:`failure_advice`), and a cluster left without any worker fails after
    :data:`NO_WORKERS_TIMEOUT_S` instead of waiting for ever.
    """
    client = distributed_client()
    if client is None:
        with notebook_progress():
            return dask.compute(*collections)
    futures = client.compute(list(collections))
    with watch_futures(client, futures):
        _wait(client, futures)
    return tuple(client.gather(futures))


def persist_now(x: da.Array) -> da.Array:
    """``x.persist()``, waiting until it is done also on a distributed cluster (see :func:`persist_all`)."""
    return persist_all(x)[0]


def persist_all(*collections: Any) -> tuple:
    """``dask.persist(*collections)``, waiting until it is done also on a distributed cluster.

    A cluster persists in the background; waiting here times the work in the stage that asked for it.
    Collections persisted together share the tasks they have in common. Failures as in :func:`compute`.
    """
    client = distributed_client()
    if client is None:
        with notebook_progress():
            return dask.persist(*collections)
    from distributed import futures_of

    collections = dask.persist(*collections)
    futures = futures_of(collections)
    with watch_futures(client, futures):
        _wait(client, futures)
    return collections


#: Schedulers on which a computation has seen workers.
_had_workers: set[str] = set()


def workers_asked_for(client) -> int:
    """Workers the client's cluster object was scaled to (SLURM jobs times their worker processes).

    0 for a cluster this process did not start.
    """
    spec = getattr(getattr(client, "cluster", None), "worker_spec", None) or {}
    return sum(len(s.get("group", [""])) if isinstance(s, dict) else 1 for s in spec.values())


def _queued(client) -> bool:
    """Whether the client's cluster asked for workers and none has joined since this process first used it.

    Batch jobs waiting in a queue are no reason to give up.
    """
    return client.scheduler.address not in _had_workers and workers_asked_for(client) > 0


def _wait(client, futures: list) -> None:
    from distributed import wait
    from distributed.scheduler import KilledWorker

    alone_since = None
    if client.scheduler_info(n_workers=-1)["workers"]:
        _had_workers.add(client.scheduler.address)
    try:
        while True:
            try:
                wait(futures, timeout=2)
            except TimeoutError:
                if client.scheduler_info(n_workers=-1)["workers"]:
                    alone_since = None
                    _had_workers.add(client.scheduler.address)
                elif _queued(client):
                    alone_since = None  # queued jobs: the wait is the queue's, not a failure
                else:
                    alone_since = alone_since or time.monotonic()
                    if time.monotonic() - alone_since > NO_WORKERS_TIMEOUT_S:
                        client.cancel(futures)
                        raise WorkerFailure(
                            f"the cluster has had no worker for {NO_WORKERS_TIMEOUT_S:.0f} s; its workers died "
                            f"(out of memory?) and none came back. {_advice.get()}".strip()
                        ) from None
                continue
            break
        for future in futures:
            if future.status == "error":
                future.result()  # raises the task's error
    except KilledWorker as err:
        raise WorkerFailure(
            f"workers died running {err.task!r} ({err.allowed_failures + 1} attempt(s), the last on "
            f"{getattr(err.last_worker, 'address', err.last_worker)}), "
            f"most likely out of memory. {_advice.get()}".strip()
        ) from err


def as_row_chunked(values: np.ndarray, like: da.Array) -> da.Array:
    """A small per-cell NumPy array (batch codes, weights) chunked like the rows of ``like``."""
    chunks = (like.chunks[0], *((s,) for s in values.shape[1:]))
    return da.from_array(values, chunks=chunks)


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limits: threadpool_limits | None = None


@contextmanager
def one_blas_thread_per_task() -> Iterator[None]:
    """Limit BLAS to one thread while dask (or Harmony) runs tasks in parallel threads of this process.

    Each task's matrix products would otherwise start their own BLAS threads on top of dask's,
    oversubscribing the cores (benchmarks/README.md has the cost measured). Worker processes
    of a distributed cluster already run with one BLAS thread.

    BLAS's thread count is a setting of the whole process: concurrent and nested uses (calls from
    several threads) share one limit, set by the first to enter and restored exactly as it was by
    the last to leave.
    """
    global _blas_users, _blas_limits
    with _blas_lock:
        if _blas_users == 0:
            _blas_limits = threadpool_limits(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limits.restore_original_limits()
                _blas_limits = None
