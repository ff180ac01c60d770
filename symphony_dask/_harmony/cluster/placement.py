"""Where the chunk groups of a cluster run: contiguous runs of chunks, one run per worker.

A group holds a contiguous run of chunks, so that its sums fold in chunk order, and goes to the
worker that already holds most of its cells' PCs, so that few of them move.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def contiguous_runs(sizes: Sequence[int], n_groups: int) -> list[list[int]]:
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


def place(
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
