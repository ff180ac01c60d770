"""Wall-time bookkeeping of pipeline stages (reported in ``Reference.params`` and by benchmarks).

The stage running now is also what progress bars name (:func:`current_stage`).
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger("symphony_dask")

_stage: contextvars.ContextVar[str] = contextvars.ContextVar("symphony_dask_stage", default="")


def current_stage() -> str:
    """Name of the innermost :func:`timed` block running in this thread ('' outside any)."""
    return _stage.get()


@contextmanager
def timed(timings: dict[str, float], name: str, *, log: bool = True) -> Iterator[float]:
    """Add the wall time of the block to ``timings[name]`` (seconds) and, if ``log``, log it.

    A stage entered again also logs its total so far.
    """
    start = time.perf_counter()
    token = _stage.set(name)
    try:
        yield start
    finally:
        _stage.reset(token)
        elapsed = time.perf_counter() - start
        before = timings.get(name)
        timings[name] = (before or 0.0) + elapsed
        if log and before is None:
            logger.info("stage %s: %.2f s", name, elapsed)
        elif log:
            logger.info("stage %s: %.2f s (%.2f s in all)", name, elapsed, timings[name])
