"""Connecting to a Dask cluster described by a file in ``cluster_configs/`` or by a scheduler address.

A cluster file is YAML with a ``cluster`` mapping whose ``kind`` says which cluster to start:

- ``local``: a ``distributed.LocalCluster``; the other keys are its arguments;
- ``slurm``: a ``dask_jobqueue.SLURMCluster`` (``pip install ".[slurm]"`` from the repository
  root); ``jobs`` is the number of jobs to start, the other keys are its arguments;
- ``kubernetes``: a ``dask_kubernetes.operator.KubeCluster`` (``pip install ".[kubernetes]"``)
  created from the DaskCluster resource in ``spec`` (a path relative to the cluster file), or
  connected to the running DaskCluster ``name``.

:func:`read_cluster_config` refuses a file that is not such a mapping, an unknown key (naming the
valid ones) and a value of the wrong type, naming the file, before any cluster is started.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import yaml
from distributed import Client, LocalCluster

from symphony_dask._dask.chunked import workers_asked_for

logger = logging.getLogger("symphony_dask")

KINDS = ("local", "slurm", "kubernetes")
#: Keys of a ``kubernetes`` cluster mapping besides ``kind`` (exactly one of ``spec`` and ``name``).
KUBERNETES_KEYS = ("spec", "name", "namespace")
#: Types of the values checked when a cluster file is read, per kind: a wrong one would fail deep in
#: dask or, worse, be used (YAML reads an unquoted 4:00:00 as the number 14400). ``None`` (YAML
#: ``null``) leaves dask's default wherever a key may be left out.
VALUE_TYPES: dict[str, dict[str, tuple[type, ...]]] = {
    "local": {
        "n_workers": (int,),
        "threads_per_worker": (int,),
        "processes": (bool,),
        "memory_limit": (str, int, float),
        "dashboard_address": (str,),
        "host": (str,),
        "interface": (str,),
        "local_directory": (str,),
    },
    "slurm": {
        "jobs": (int,),
        "cores": (int,),
        "processes": (int,),
        "memory": (str,),
        "walltime": (str,),
        "queue": (str,),
        "account": (str,),
        "project": (str,),
        "interface": (str,),
        "local_directory": (str,),
        "log_directory": (str,),
        "job_name": (str,),
        "python": (str,),
        "scheduler_options": (dict,),
        "job_extra_directives": (list,),
        "job_script_prologue": (list,),
        "worker_extra_args": (list,),
    },
    "kubernetes": {"spec": (str,), "name": (str,), "namespace": (str,)},
}
#: SLURM's names of job settings that dask_jobqueue names otherwise.
SLURM_TERMS = {"partition": "queue", "time": "walltime", "mem": "memory", "cpus_per_task": "cores", "nodes": "jobs"}
#: Keys that must have a value (not ``null``) when given.
REQUIRED_VALUES = ("kind", "jobs", "spec", "name")


def read_cluster_config(path: str | Path) -> dict[str, Any]:
    """The ``cluster`` mapping of a cluster file, with its keys and the types of their values checked.

    Raises
    ------
    ValueError
        Naming the file and what is wrong in it: YAML it cannot read, no ``cluster`` mapping, an
        unknown ``kind`` or key (listing the valid ones), or a value of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no cluster config file at {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict) or "kind" not in config["cluster"]:
        if not isinstance(config, dict):
            found = "nothing" if config is None else f"a {type(config).__name__}"
        elif "cluster" not in config:
            found = f"keys {', '.join(map(repr, config))}"
        else:
            found = f"a 'cluster' {type(config['cluster']).__name__}"
            found += "" if isinstance(config["cluster"], dict) else " (write its keys one per line, without '- ')"
        raise ValueError(
            f"{path} must hold a 'cluster' mapping with a 'kind' (one of {', '.join(KINDS)}), found "
            f"{found}; see cluster_configs/*.yaml"
        )
    if len(config) > 1:
        extra = ", ".join(repr(key) for key in config if key != "cluster")
        raise ValueError(f"{path}: unknown top-level key(s) {extra}; a cluster file holds one mapping, 'cluster'")
    cluster = dict(config["cluster"])
    kind = cluster["kind"]
    if kind not in KINDS:
        raise ValueError(f"{path}: unknown cluster kind {kind!r}; known kinds: {', '.join(KINDS)}")
    _check_keys(path, cluster, _valid_keys(kind))
    _check_values(path, cluster, VALUE_TYPES[kind])
    if kind == "kubernetes":
        _check_kubernetes(path, cluster)
    return cluster


def _valid_keys(kind: str) -> tuple[str, list[str]] | None:
    """What the keys of a ``kind`` mapping are passed to, and the keys it takes (``None``.

    Not known, for a cluster package that is not installed).
    """
    if kind == "kubernetes":
        return "", ["kind", *KUBERNETES_KEYS]
    if kind == "local":
        from distributed import Nanny, Worker

        return " (those of distributed.LocalCluster and its workers)", [
            "kind",
            *_parameters(LocalCluster, Nanny, Worker),
        ]
    try:
        from dask_jobqueue import SLURMCluster
        from dask_jobqueue.slurm import SLURMJob
    except ImportError:
        return None
    return " (those of dask_jobqueue.SLURMCluster)", [
        "kind",
        "jobs",
        *_parameters(SLURMCluster, *SLURMJob.__mro__[:-1]),
    ]


def _parameters(*classes: type) -> list[str]:
    """The keyword arguments the ``__init__`` of these classes name, sorted."""
    names = set()
    for cls in classes:
        for parameter in inspect.signature(cls.__init__).parameters.values():
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                names.add(parameter.name)
    names.discard("self")
    return sorted(names)


def _check_keys(path: Path, cluster: dict[str, Any], valid: tuple[str, list[str]] | None) -> None:
    if valid is None:
        return
    what, keys = valid
    for key in cluster:
        if key not in keys:
            terms = SLURM_TERMS if cluster["kind"] == "slurm" else {}
            close = [terms[key]] if key in terms else difflib.get_close_matches(str(key), keys, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"{path}: unknown key {key!r} for a {cluster['kind']} cluster; {hint}the valid keys"
                f"{what} are: {', '.join(keys)}"
            )


def _check_values(path: Path, cluster: dict[str, Any], types: dict[str, tuple[type, ...]]) -> None:
    for key, value in cluster.items():
        if value is None and key not in REQUIRED_VALUES:
            continue
        expected = types.get(key)
        wrong_int = isinstance(value, bool) and bool not in (expected or ())  # YAML's true is no number
        if expected is not None and (not isinstance(value, expected) or wrong_int):
            names = " or ".join(
                {
                    str: "text",
                    int: "a whole number",
                    float: "a number",
                    bool: "true or false",
                    dict: "a mapping",
                    list: "a list",
                }[t]
                for t in expected
            )
            quote = ' (quote it, as walltime: "4:00:00": YAML reads 4:00:00 as a number)' if key == "walltime" else ""
            raise ValueError(f"{path}: {key} must be {names}, got {value!r} ({type(value).__name__}){quote}")
        if key == "jobs" and value < 1:
            raise ValueError(f"{path}: jobs must be at least 1, got {value}")


def _check_kubernetes(path: Path, cluster: dict[str, Any]) -> None:
    if ("spec" in cluster) == ("name" in cluster):
        raise ValueError(
            f"{path}: a kubernetes cluster needs either 'spec' (a DaskCluster resource file to create) "
            "or 'name' (a running DaskCluster to connect to), not both or neither"
        )
    if "spec" in cluster and not (path.parent / cluster["spec"]).is_file():
        raise ValueError(
            f"{path}: spec {cluster['spec']!r} names no file (looked for {path.parent / cluster['spec']}; "
            "the path is relative to the cluster file)"
        )


def make_cluster(path: str | Path) -> tuple[Any, int | None]:
    """The cluster a cluster file describes and the number of SLURM jobs to scale it to.

    For SLURM, no job is submitted yet.
    """
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
    """Return once the cluster has a worker.

    Until then say what it waits for, every ``report_every`` seconds (SLURM jobs may wait in the queue for
    minutes or hours).
    """
    if client.scheduler_info(n_workers=-1)["workers"]:
        return
    out = sys.stderr if out is None else out
    asked = workers_asked_for(client)
    which = f"{asked} worker(s) asked for" if asked else "workers"
    print(
        f"waiting for the cluster's {which}: batch jobs may wait in the queue (SLURM: squeue --me); Ctrl-C stops",
        file=out,
        flush=True,
    )
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
            f'this cluster kind needs {module.split(".")[0]}: pip install ".[{extra}]" from the symphony_dask '
            f"repository root (or pip install {module.split('.')[0].replace('_', '-')})"
        ) from err
