"""The threads of a chunk group: urgent jobs before background ones."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class WorkPool:
    """Threads that take urgent jobs before background ones (first in, first out within each).

    A block's weighing is urgent (the driver waits for its ``S``); the next block's preparation and
    the centroid sums are background work that fills the time of the reduction across groups.
    With ``n_threads=0`` every job runs at once in the caller's thread (one piece: nothing to
    share, and no hand-offs between threads).
    """

    def __init__(self, n_threads: int) -> None:
        self._urgent: deque = deque()
        self._background: deque = deque()
        self._ready = threading.Condition()
        self._closed = False
        self.inline = n_threads == 0
        for i in range(int(n_threads)):
            threading.Thread(target=self._work, name=f"symphony-harmony-{i}", daemon=True).start()

    def submit(self, fn: Callable[[], Any], urgent: bool = False) -> Future:
        """Run ``fn`` in a thread of the pool (at once in this thread if the pool has none)."""
        future: Future = Future()
        if self.inline:
            future.set_running_or_notify_cancel()
            try:
                future.set_result(fn())
            except BaseException as err:
                future.set_exception(err)
            return future
        with self._ready:
            (self._urgent if urgent else self._background).append((future, fn))
            self._ready.notify()
        return future

    def shutdown(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def _work(self) -> None:
        while True:
            with self._ready:
                while not (self._urgent or self._background or self._closed):
                    self._ready.wait()
                if self._closed:
                    return
                future, fn = (self._urgent or self._background).popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as err:  # handed to whoever waits on the future
                    future.set_exception(err)
            del future, fn  # an idle thread holds nothing of the last job (and of its group)
