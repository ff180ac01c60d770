"""Progress of dask passes: bars in terminals, lines in log files, widgets in Jupyter.

Dask's ``ProgressBar`` joins a polling thread at the end of each computation. :class:`PassProgress`
draws from the scheduler's own callbacks instead, and only for computations that run longer than
``minimum`` seconds. Each bar is labeled with the running stage (:func:`~symphony_dask._dask.timing.timed`).
On a terminal it is redrawn in place; into a file (a SLURM job's log) it writes one line per pass,
when the pass ends, and no carriage returns; in a Jupyter kernel with ipywidgets it is a widget.

In a notebook every pass shows a widget bar without being asked (:func:`notebook_progress` on the
threaded scheduler, :func:`watch_futures` on a distributed cluster, fed by the scheduler); the
dask setting ``symphony_dask.progress.minimum`` (seconds, default 1) sets how long a pass runs
before its bar appears.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import dask
from dask.callbacks import Callback

from symphony_dask._dask.timing import current_stage

#: Seconds a pass runs before its bar appears, unless dask's config sets ``symphony_dask.progress.minimum``.
MINIMUM_S = 1.0


def minimum_s() -> float:
    """Seconds a pass runs before its bar appears (dask config ``symphony_dask.progress.minimum``)."""
    return float(dask.config.get("symphony_dask.progress.minimum", MINIMUM_S))


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel that can show ipywidgets."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None or not hasattr(shell, "kernel"):
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


class WidgetBar:
    """A labeled bar in a notebook: stage name, bar, tasks done and seconds."""

    def __init__(self, label: str) -> None:
        from IPython.display import display
        from ipywidgets import HTML, FloatProgress, HBox, Label, Layout

        self.label = Label(label, layout=Layout(width="16em"))
        self.bar = FloatProgress(min=0.0, max=1.0, layout=Layout(width="24em"))
        self.text = HTML("")
        display(HBox([self.label, self.bar, self.text]))

    def update(self, done: int, total: int, seconds: float) -> None:
        self.bar.value = min(1.0, done / max(total, 1))
        self.text.value = f"{done}/{total} tasks | {seconds:.1f} s"

    def finish(self, done: int, total: int, seconds: float, *, errored: bool) -> None:
        self.update(done, total, seconds)
        self.bar.bar_style = "danger" if errored else "success"


class PassProgress(Callback):
    """A labeled progress bar for each dask computation (threaded or synchronous scheduler).

    Parameters
    ----------
    minimum
        Seconds a computation runs before its bar appears (its line, into a file).
    width
        Characters of a terminal bar.
    out
        Where text goes (standard error by default).
    notebook
        Draw ipywidgets bars instead of text (see :func:`in_notebook`).
    """

    def __init__(
        self, minimum: float = 1.0, width: int = 30, out: TextIO | None = None, *, notebook: bool = False
    ) -> None:
        super().__init__()
        self.minimum, self.width = minimum, width
        self.out = sys.stderr if out is None else out
        self.notebook = notebook
        self.terminal = notebook or bool(getattr(self.out, "isatty", lambda: False)())

    def _start_state(self, dsk, state) -> None:
        self.start = self.last = time.perf_counter()
        # tasks still to run (as dask's ProgressBar counts them); "waiting_data" lists each
        # task's dependents, not more tasks
        self.total = sum(len(state[k]) for k in ("ready", "waiting", "running"))
        self.done = 0
        self.label = current_stage() or "pass"
        self.shown = False
        self.widget: WidgetBar | None = None

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
        if self.notebook:
            if self.widget is None and now - self.start >= self.minimum:
                self.widget = WidgetBar(self.label)
            if self.widget is not None:
                self.widget.finish(self.done, self.total, now - self.start, errored=errored)
            return
        if self.terminal and self.shown:
            self._draw(now)
            self.out.write("\n")
        elif not self.terminal and now - self.start >= self.minimum:
            outcome = "failed after" if errored else "in"
            self.out.write(f"{self.label}: {self.done}/{self.total} tasks {outcome} {now - self.start:.1f} s\n")
        self.out.flush()

    def _draw(self, now: float) -> None:
        if self.notebook:
            if self.widget is None:
                self.widget = WidgetBar(self.label)
            self.widget.update(self.done, self.total, now - self.start)
            return
        frac = min(1.0, self.done / max(self.total, 1))
        bar = "#" * int(frac * self.width)
        self.out.write(
            f"\r{self.label:<16} [{bar:<{self.width}}] {frac:4.0%} {self.done}/{self.total} tasks"
            f" | {now - self.start:5.1f} s"
        )
        self.out.flush()
        self.shown = True


def notebook_progress() -> contextlib.AbstractContextManager:
    """Widget bars for the dask computations of the block, in a Jupyter kernel.

    Nothing elsewhere (terminals get their bars from the command line).
    """
    if not in_notebook():
        return contextlib.nullcontext()
    return PassProgress(minimum=minimum_s(), notebook=True)


#: Seconds the end of a pass waits for the scheduler's last report to its notebook bar.
FEED_WAIT_S = 1.0


@contextlib.contextmanager
def watch_futures(client: Any, futures: list) -> Iterator[None]:
    """A widget bar for ``futures`` of a distributed cluster while the block waits on them, in a Jupyter kernel.

    The scheduler reports the tasks left (distributed's progress feed) to the client's event loop, which
    updates the bar; nothing outside a notebook.
    """
    if not in_notebook():
        yield
        return
    import threading

    from distributed.diagnostics.progressbar import ProgressBar

    label, minimum = current_stage() or "pass", minimum_s()
    stopped = threading.Event()

    class _Fed(ProgressBar):
        widget: WidgetBar | None = None

        def _draw_bar(self, remaining: int, all: int, **kwargs: Any) -> None:
            if self.widget is None and self.elapsed >= minimum:
                self.widget = WidgetBar(label)
            if self.widget is not None:
                self.widget.update(all - remaining, all, self.elapsed)

        def _draw_stop(self, remaining: int, status: str, **kwargs: Any) -> None:
            total = self._last_response.get("all", 0)
            if self.widget is None and self.elapsed >= minimum:
                self.widget = WidgetBar(label)
            if self.widget is not None:
                self.widget.finish(total - remaining, total, self.elapsed, errored=status == "error")
            stopped.set()

    bar = _Fed(futures, scheduler=client.scheduler.address, interval="250ms", complete=True)
    client.loop.add_callback(bar.listen)
    try:
        yield
    finally:
        # a pass long enough for a bar waits for the scheduler's last report to it (<= 250 ms)
        shown = bar.elapsed >= minimum and stopped.wait(FEED_WAIT_S)
        if not shown and not stopped.is_set():  # stop listening
            comm = getattr(bar, "comm", None)
            if comm is not None:
                client.loop.add_callback(comm.close)
