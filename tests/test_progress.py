"""What the command line shows while it works: labeled progress bars, stage lines, queue waits."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time

import dask.array as da
import numpy as np
import pytest
from distributed import Worker

from symphony_dask._dask import chunked
from symphony_dask._dask.cluster import wait_for_workers
from symphony_dask._dask.progress import PassProgress
from symphony_dask._dask.timing import timed


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _slow(block: np.ndarray) -> np.ndarray:
    time.sleep(0.08)
    return block * 2


def _pass() -> da.Array:
    """A map over 8 chunks and a tree reduction (the shape of a pass over the matrix)."""
    return da.ones((800, 10), chunks=(100, 10)).map_blocks(_slow).sum()


def test_into_a_file_one_line_per_pass_and_no_carriage_returns():
    out = io.StringIO()
    with PassProgress(minimum=0.0, out=out), timed({}, "moments"):
        _pass().compute(scheduler="threads")
        _pass().compute(scheduler="threads")
    assert "\r" not in out.getvalue()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    for line in lines:
        done, total = map(int, re.fullmatch(r"moments: (\d+)/(\d+) tasks in \d+\.\d s", line).groups())
        assert done == total > 8


def test_on_a_terminal_the_bar_is_labeled_and_reaches_100_percent():
    out = Terminal()
    with PassProgress(minimum=0.0, out=out), timed({}, "pca"):
        _pass().compute(scheduler="threads")
    draws = out.getvalue().rstrip("\n").split("\r")[1:]
    assert len(draws) >= 2 and all(d.startswith("pca ") for d in draws)
    last = draws[-1]
    done, total = map(int, re.search(r"(\d+)/(\d+) tasks", last).groups())
    assert " 100% " in last and done == total and out.getvalue().endswith("\n")


def test_short_passes_draw_nothing():
    out = Terminal()
    with PassProgress(minimum=5.0, out=out):
        da.ones(10, chunks=5).sum().compute(scheduler="threads")
    assert out.getvalue() == ""


def test_stage_lines_give_each_call_its_own_time(caplog):
    timings: dict[str, float] = {}
    with caplog.at_level(logging.INFO, logger="symphony_dask"):
        for pause in (0.05, 0.1):
            with timed(timings, "clustering"):
                time.sleep(pause)
    first, second = (r.getMessage() for r in caplog.records)
    assert re.fullmatch(r"stage clustering: 0\.0[5-9] s", first)
    assert re.fullmatch(r"stage clustering: 0\.1\d s \(0\.1[5-9] s in all\)", second)


class QueuedWorker(Worker):
    """A worker that joins 4 s after it is asked for, like a batch job waiting in a queue."""

    async def start_unsafe(self):
        await asyncio.sleep(4)
        return await super().start_unsafe()


@pytest.fixture()
def queued_cluster(local_cluster):
    cluster, client = local_cluster(n_workers=0, processes=False, worker_class=QueuedWorker)
    cluster.scale(1)
    return client


@pytest.mark.slow
@pytest.mark.cluster
def test_the_command_line_says_it_waits_for_queued_workers(queued_cluster):
    out = io.StringIO()
    wait_for_workers(queued_cluster, out=out, report_every=1.5)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("waiting for the cluster's 1 worker(s) asked for: batch jobs may wait in the queue")
    assert any(re.fullmatch(r"still waiting for a worker after \d s", line) for line in lines[1:-1])
    assert re.fullmatch(r"1 worker\(s\) joined after \d s; starting", lines[-1])


@pytest.mark.slow
@pytest.mark.cluster
def test_a_computation_waits_for_queued_workers_beyond_the_no_worker_limit(queued_cluster, monkeypatch):
    """No worker yet, but workers asked for: the wait is the queue's, not a failure (the limit is for
    clusters whose workers are gone)."""
    monkeypatch.setattr(chunked, "NO_WORKERS_TIMEOUT_S", 1.0)
    (total,) = chunked.compute(da.ones(100, chunks=10).sum())
    assert total == 100
