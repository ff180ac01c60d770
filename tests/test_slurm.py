"""Building and mapping through a real SLURM cluster (dask-jobqueue) gives the threaded result.

Needs the two-node SLURM that ``.ci/slurm_up`` starts on this machine: nodes node1 and node2, each
in a network namespace of its own (10.77.0.11, 10.77.0.12), the driver on the bridge sdbr0
(10.77.0.1). CI runs it, with CI=true, and these tests must then run; elsewhere they are skipped
when ``sinfo`` finds no such SLURM.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from _helpers import CLI_BUILD, CLUSTER_CONFIGS, R_BUILD, build_argv

import symphony_dask as sd
from symphony_dask._dask.cluster import connect
from symphony_dask._harmony.cluster import groups as harmony_groups
from symphony_dask._reference import stages

CONFIG = CLUSTER_CONFIGS / "slurm-local.yaml"
TOL = 1e-10
#: The nodes of .ci/slurm_up and their addresses; the driver's, on the bridge.
NODES = {"node1": "10.77.0.11", "node2": "10.77.0.12"}
DRIVER_HOST = "10.77.0.1"

pytestmark = [pytest.mark.slurm, pytest.mark.cluster, pytest.mark.slow]


def _slurm_problem() -> str | None:
    """Why no SLURM can be used here, or None."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM commands (sinfo, sbatch) on this machine"
    done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, capture_output=True, text=True, timeout=30)
    states = dict(line.split() for line in done.stdout.splitlines() if len(line.split()) == 2)
    if done.returncode != 0 or any(states.get(n, "").rstrip("*~#") not in ("idle", "mixed") for n in NODES):
        return f"no idle SLURM nodes {', '.join(NODES)}: sinfo said {(done.stdout + done.stderr).strip()!r}"
    if not Path("/sys/class/net/sdbr0").exists():
        return "no bridge sdbr0 to the SLURM nodes' network namespaces"
    return None


@pytest.fixture(scope="module")
def slurm():
    problem = _slurm_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the SLURM test, but {problem} (.ci/slurm_up starts one)")
        pytest.skip(problem)


def _run_job(sbatch_args: list[str], env: dict[str, str], timeout: float) -> str:
    """Submit a batch job and wait for it to end; its ``scontrol show job`` line. (Not ``sbatch
    --wait``: that polls at 2, 10 and then every 32 s, and a job of 11 s took 42 s.)"""
    job = (
        subprocess.run(["sbatch", "--parsable", *sbatch_args], check=True, capture_output=True, text=True, env=env)
        .stdout.strip()
        .split(";")[0]
    )
    deadline = time.monotonic() + timeout
    while True:
        state = subprocess.run(
            ["scontrol", "-o", "show", "job", job], check=False, capture_output=True, text=True
        ).stdout
        if not any(f"JobState={s} " in state for s in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")):
            return state
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], check=False)
            raise TimeoutError(f"job {job} still not done after {timeout:.0f} s: {state}")
        time.sleep(0.5)


def _host(address: str) -> str:
    return address.partition("://")[2].rsplit(":", 1)[0].strip("[]")


def test_build_and_map_through_slurm_equal_threads(slurm, split, tmp_path, monkeypatch, caplog):
    """A worker job on each node, each worker at its node's address; Harmony in two chunk groups,
    one per worker, the leader reaching its peer on the other node by the Harmony channel."""
    ref_cells, query = split
    ref_path, query_path = tmp_path / "ref_cells.h5ad", tmp_path / "query.h5ad"
    ref_cells.write_h5ad(ref_path)
    query.write_h5ad(query_path)
    # pbmcs_small's 910 cells in two chunks and two chunk groups (the cluster's default: one group
    # per 50,000 cells), so that Harmony's channel runs between the nodes
    kw = dict(R_BUILD, chunk_size=455)
    monkeypatch.setattr(stages, "HARMONY_CHUNK_SIZE", 1)
    monkeypatch.setattr(harmony_groups, "MIN_GROUP_CELLS", 300)
    made = []

    class Recording(harmony_groups.ClusterGroups):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(harmony_groups, "ClusterGroups", Recording)

    start = time.perf_counter()
    threaded = sd.build_reference(ref_path, "donor", **kw)
    threaded_query = sd.map_query(threaded, query_path, "donor", normalize=False)
    threaded_s = time.perf_counter() - start

    client = connect(cluster_file=CONFIG)
    try:
        client.wait_for_workers(2, timeout=180)
        squeue = subprocess.run(
            ["squeue", "-h", "-o", "%i %j %T %N"], check=False, capture_output=True, text=True
        ).stdout
        print(f"squeue (job, name, state, node):\n{squeue}")
        jobs = [line.split() for line in squeue.splitlines() if " dask-worker RUNNING " in line]
        assert sorted(job[3] for job in jobs) == sorted(NODES), squeue  # one worker job on each node
        workers = client.scheduler_info(n_workers=-1)["workers"]
        print(f"scheduler {client.scheduler.address}, workers {sorted(workers)}")
        assert _host(client.scheduler.address) == DRIVER_HOST
        assert sorted(_host(w) for w in workers) == sorted(NODES.values())
        start = time.perf_counter()
        with caplog.at_level(logging.WARNING, logger="symphony_dask"):
            ref = sd.build_reference(ref_path, "donor", **kw)
        mapped = sd.map_query(ref, query_path, "donor", normalize=False)
        slurm_s = time.perf_counter() - start
        embedding = np.asarray(ref.embedding)
    finally:
        client.close()
        client.cluster.close()
    print(f"pbmcs_small build + map: threads {threaded_s:.2f} s, SLURM (2 jobs) {slurm_s:.2f} s")

    # Harmony ran in two groups on the two nodes, and the peer's channel listened at its worker's
    # address (the leader reached it there: no fallback to dask's RPC)
    assert len(made) == 1 and len(made[0]) == 2, made
    groups = made[0]
    assert sorted(_host(w) for w in groups.workers) == sorted(NODES.values()), groups.workers
    print(f"Harmony groups on {groups.workers}, peer channel at {groups.endpoints[1]}")
    assert groups.endpoints[1] is not None and groups.endpoints[1][0] == _host(groups.workers[1]), groups.endpoints
    assert not groups.without_channel
    assert "no channel" not in caplog.text and "lost" not in caplog.text, caplog.text

    for name in ("loadings", "centroids", "cluster_sizes", "compression", "mean", "std"):
        assert np.abs(getattr(ref, name) - getattr(threaded, name)).max() <= TOL, name
    assert np.abs(embedding - np.asarray(threaded.embedding)).max() <= TOL
    for key in ("X_symphony", "X_symphony_pca", "X_symphony_R"):
        assert np.abs(mapped.obsm[key] - threaded_query.obsm[key]).max() <= TOL, key


def test_driver_job_builds_through_worker_jobs_with_a_plain_log(slurm, split, tmp_path, built_reference):
    """cluster_configs/slurm-driver.sbatch runs symphony-dask in a job of its own, which submits the
    worker jobs of slurm-local.yaml and waits for them; its log has one line per stage and no
    carriage returns (progress bars are not redrawn into files)."""
    ref_cells, _ = split
    ref_cells.write_h5ad(tmp_path / "ref.h5ad")
    # the driver job runs on a node, where sdbr0 is not: its scheduler takes the node's eth0 too
    config = yaml.safe_load(CONFIG.read_text())
    del config["cluster"]["scheduler_options"]
    (tmp_path / "slurm-local.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # no UMAP: this test is about the driver job and its log (a UMAP placed on workers: test_umap.py)
    argv = build_argv(
        "ref.h5ad", "ref.zarr", "--no-normalize", *CLI_BUILD, "--no-umap", "--cluster", "slurm-local.yaml"
    )
    state = _run_job(
        [
            "--mem=2G",
            f"--chdir={tmp_path}",
            f"--output={tmp_path}/driver.log",
            str(CONFIG.parent / "slurm-driver.sbatch"),
            *argv,
        ],
        env=env,
        timeout=600,
    )
    log = (tmp_path / "driver.log").read_text()
    print(log)
    assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, state + log
    assert any(f"Dask dashboard: http://{address}:" in log for address in NODES.values())  # driver on a node
    assert "\r" not in log
    assert "Register worker" not in log  # dask's INFO lines only with --verbose
    for line in (
        "Dask dashboard:",
        "waiting for the cluster's 2 worker(s) asked for",
        "worker(s) joined after",
        "stage moments:",
        "Harmony iteration 1:",
        "stage harmony:",
        "saved to ref.zarr",
        "stage times (s):",
    ):
        assert line in log, line
    ref = sd.load_reference(tmp_path / "ref.zarr")
    for name in ("loadings", "centroids", "compression"):
        assert np.abs(getattr(ref, name) - getattr(built_reference, name)).max() <= TOL, name
