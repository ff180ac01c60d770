"""Connecting to a Dask cluster described by a file in ``cluster_configs/`` or by a scheduler address.

A cluster file is YAML with a ``cluster`` mapping whose ``kind`` says which cluster to start:

- ``local``: a ``distributed.LocalCluster``; the other keys are its arguments;
- ``slurm``: a ``dask_jobqueue.SLURMCluster`` (``pip install ".[slurm]"`` from the repository
  root); ``jobs`` is the number of jobs to start, the other keys are its arguments;
- ``kubernetes``: a ``dask_kubernetes.operator.KubeCluster`` (``pip install ".[kubernetes]"``)
  created from the DaskCluster resource in ``spec`` (a path relative to the cluster file), or
  connected to the running DaskCluster ``name``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import yaml
from distributed import Client, LocalCluster

from .chunked import workers_asked_for

logger = logging.getLogger("symphony_dask")

KINDS = ("local", "slurm", "kubernetes")


def read_cluster_config(path: str | Path) -> dict[str, Any]:
    """The ``cluster`` mapping of a cluster file, with its ``kind`` checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no cluster config file at {path}")
    config = yaml.safe_load(path.read_text()) or {}
    cluster = config.get("cluster")
    if not isinstance(cluster, dict) or "kind" not in cluster:
        raise ValueError(f"{path} must hold a 'cluster' mapping with a 'kind' (one of {', '.join(KINDS)})")
    if cluster["kind"] not in KINDS:
        raise ValueError(f"{path}: unknown cluster kind {cluster['kind']!r}; known kinds: {', '.join(KINDS)}")
    return dict(cluster)


def make_cluster(path: str | Path) -> tuple[Any, int | None]:
    """The cluster a cluster file describes (for SLURM, no job submitted yet) and the number of
    SLURM jobs to scale it to."""
    options = read_cluster_config(path)
    kind = options.pop("kind")
    if kind == "local":
        return LocalCluster(**options), None
    if kind == "slurm":
        slurm_cluster = _optional("dask_jobqueue", "SLURMCluster", "slurm")
        jobs = int(options.pop("jobs", 1))
        return slurm_cluster(**{k: v for k, v in options.items() if v is not None}), jobs
    kube_cluster = _optional("dask_kubernetes.operator", "KubeCluster", "kubernetes")
    namespace = options.get("namespace")
    if "name" in options:
        return kube_cluster.from_name(options["name"], namespace=namespace), None
    spec = yaml.safe_load((Path(path).parent / options["spec"]).read_text())
    return kube_cluster(custom_cluster_spec=spec, namespace=namespace), None


def connect(*, cluster_file: str | Path | None = None, scheduler: str | None = None) -> Client | None:
    """A client for the cluster in ``cluster_file`` or at ``scheduler``; ``None`` for neither.

    Without either, dask's default (threaded) scheduler of the current process is used.
    """
    if cluster_file is not None and scheduler is not None:
        raise ValueError("give a cluster file or a scheduler address, not both")
    if scheduler is not None:
        return Client(scheduler)
    if cluster_file is None:
        return None
    cluster, jobs = make_cluster(cluster_file)
    if jobs:
        cluster.scale(jobs=jobs)
    return Client(cluster)


#: Seconds between "still waiting" lines while a new cluster's workers are queued.
WAIT_REPORT_S = 60.0


def wait_for_workers(client: Client, *, out: TextIO | None = None, report_every: float = WAIT_REPORT_S) -> None:
    """Return once the cluster has a worker; until then say what it waits for, every
    ``report_every`` seconds (SLURM jobs may wait in the queue for minutes or hours)."""
    if client.scheduler_info(n_workers=-1)["workers"]:
        return
    out = sys.stderr if out is None else out
    asked = workers_asked_for(client)
    which = f"{asked} worker(s) asked for" if asked else "workers"
    print(f"waiting for the cluster's {which}: batch jobs may wait in the queue (SLURM: squeue --me); "
          "Ctrl-C stops", file=out, flush=True)
    start = time.monotonic()
    while True:
        try:
            client.wait_for_workers(1, timeout=report_every)
            break
        except TimeoutError:
            print(f"still waiting for a worker after {_duration(time.monotonic() - start)}", file=out, flush=True)
    n = len(client.scheduler_info(n_workers=-1)["workers"])
    print(f"{n} worker(s) joined after {_duration(time.monotonic() - start)}; starting", file=out, flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _optional(module: str, name: str, extra: str) -> Any:
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except ImportError as err:
        raise ValueError(
            f"this cluster kind needs {module.split('.')[0]}: pip install \".[{extra}]\" from the symphony_dask "
            f"repository root (or pip install {module.split('.')[0].replace('_', '-')})"
        ) from err
