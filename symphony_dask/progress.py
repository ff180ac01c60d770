"""Progress of dask passes for the command line, without the per-compute delay of a timer thread.

Dask's ``ProgressBar`` joins a polling thread at the end of each computation. :class:`PassProgress`
draws from the scheduler's own callbacks instead, and only for computations that run longer than
``minimum`` seconds. Each bar is labelled with the running stage (:func:`~symphony_dask.timing.timed`).
On a terminal it is redrawn in place; into a file (a SLURM job's log) it writes one line per pass,
when the pass ends, and no carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from dask.callbacks import Callback

from .timing import current_stage


class PassProgress(Callback):
    """A labelled progress bar for each dask computation (threaded or synchronous scheduler)."""

    def __init__(self, minimum: float = 1.0, width: int = 30, out: TextIO | None = None) -> None:
        super().__init__()
        self.minimum, self.width = minimum, width
        self.out = sys.stderr if out is None else out
        self.terminal = bool(getattr(self.out, "isatty", lambda: False)())

    def _start_state(self, dsk, state) -> None:
        self.start = self.last = time.perf_counter()
        # tasks still to run (as dask's ProgressBar counts them); "waiting_data" lists each
        # task's dependents, not more tasks
        self.total = sum(len(state[k]) for k in ("ready", "waiting", "running"))
        self.done = 0
        self.label = current_stage() or "pass"
        self.shown = False

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        self.done += 1
        if not self.terminal:
            return
        now = time.perf_counter()
        if now - self.start >= self.minimum and now - self.last >= 0.25:
            self.last = now
            self._draw(now)

    def _finish(self, dsk, state, errored) -> None:
        now = time.perf_counter()
        if self.terminal and self.shown:
            self._draw(now)
            self.out.write("\n")
        elif not self.terminal and now - self.start >= self.minimum:
            outcome = "failed after" if errored else "in"
            self.out.write(f"{self.label}: {self.done}/{self.total} tasks {outcome} {now - self.start:.1f} s\n")
        self.out.flush()

    def _draw(self, now: float) -> None:
        frac = min(1.0, self.done / max(self.total, 1))
        bar = "#" * int(frac * self.width)
        self.out.write(f"\r{self.label:<16} [{bar:<{self.width}}] {frac:4.0%} {self.done}/{self.total} tasks"
                       f" | {now - self.start:5.1f} s")
        self.out.flush()
        self.shown = True
