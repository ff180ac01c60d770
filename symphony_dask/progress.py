"""Progress of dask passes for the command line, without the per-compute delay of a timer thread.

Harmony runs hundreds of small computations; dask's ``ProgressBar`` joins a polling thread at the end
of each one. :class:`PassProgress` draws from the scheduler's own callbacks instead, and only for
computations that run longer than ``minimum`` seconds.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from dask.callbacks import Callback


class PassProgress(Callback):
    """A text progress bar for each dask computation (threaded or synchronous scheduler)."""

    def __init__(self, minimum: float = 1.0, width: int = 40, out: TextIO = sys.stderr) -> None:
        super().__init__()
        self.minimum, self.width, self.out = minimum, width, out

    def _start_state(self, dsk, state) -> None:
        self.start = self.last = time.perf_counter()
        self.total = sum(len(state[k]) for k in ("ready", "waiting", "waiting_data", "running"))
        self.done = 0
        self.shown = False

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self.start >= self.minimum and now - self.last >= 0.25:
            self.last = now
            self._draw(now)

    def _finish(self, dsk, state, errored) -> None:
        if self.shown:
            self._draw(time.perf_counter())
            self.out.write("\n")
            self.out.flush()

    def _draw(self, now: float) -> None:
        frac = min(1.0, self.done / max(self.total, 1))
        bar = "#" * int(frac * self.width)
        self.out.write(f"\r[{bar:<{self.width}}] {frac:4.0%} | {now - self.start:5.1f} s")
        self.out.flush()
        self.shown = True
