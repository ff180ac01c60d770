"""Connecting to a Dask cluster described by a file in ``cluster_configs/`` or by a scheduler address.

A cluster file is YAML with a ``cluster`` mapping whose ``kind`` says which cluster to start; the
other keys are passed to that cluster's constructor::

    cluster:
      kind: local          # distributed.LocalCluster
      n_workers: 2
      threads_per_worker: 1
      memory_limit: 4GiB
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from distributed import Client, LocalCluster

logger = logging.getLogger("symphony_dask")

KINDS = ("local",)


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
    options = read_cluster_config(cluster_file)
    options.pop("kind")
    return Client(LocalCluster(**options))
