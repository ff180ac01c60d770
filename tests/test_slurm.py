"""Building and mapping through a real SLURM cluster (dask-jobqueue) gives the threaded result.

Needs a SLURM controller on this machine (``.ci/slurm_up`` starts a single-node one; CI runs it,
with CI=true, and this test must then run). Elsewhere it is skipped when ``sinfo`` finds no SLURM.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import R_BUILD

import symphony_dask as sd
from symphony_dask.cluster import connect

CONFIG = Path(__file__).parents[1] / "cluster_configs" / "slurm-local.yaml"
TOL = 1e-10


def _slurm_problem() -> str | None:
    """Why no SLURM can be used here, or None."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM commands (sinfo, sbatch) on this machine"
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if done.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mixed") for s in done.stdout.split()):
        return f"no idle SLURM node: sinfo said {(done.stdout + done.stderr).strip()!r}"
    return None


@pytest.fixture(scope="module")
def slurm():
    problem = _slurm_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the SLURM test, but {problem} (.ci/slurm_up starts one)")
        pytest.skip(problem)


def test_build_and_map_through_slurm_equal_threads(slurm, split, tmp_path):
    ref_cells, query = split
    ref_path, query_path = tmp_path / "ref_cells.h5ad", tmp_path / "query.h5ad"
    ref_cells.write_h5ad(ref_path)
    query.write_h5ad(query_path)

    start = time.perf_counter()
    threaded = sd.build_reference(ref_path, "donor", **R_BUILD)
    threaded_query = sd.map_query(threaded, query_path, "donor", normalize=False)
    threaded_s = time.perf_counter() - start

    client = connect(cluster_file=CONFIG)
    try:
        client.wait_for_workers(2, timeout=180)
        jobs = subprocess.run(["squeue", "-h", "-o", "%j %T"], capture_output=True, text=True).stdout.split("\n")
        assert sum("dask-worker RUNNING" in line for line in jobs) == 2, jobs
        start = time.perf_counter()
        ref = sd.build_reference(ref_path, "donor", **R_BUILD)
        mapped = sd.map_query(ref, query_path, "donor", normalize=False)
        slurm_s = time.perf_counter() - start
        embedding = np.asarray(ref.embedding)
    finally:
        client.close()
        client.cluster.close()
    print(f"pbmcs_small build + map: threads {threaded_s:.2f} s, SLURM (2 jobs) {slurm_s:.2f} s")

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
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # no UMAP: this test is about the driver job and its log (a UMAP placed on workers: test_umap.py)
    argv = ["build", "ref.h5ad", "--out", "ref.zarr", "--batch-key", "donor", "--no-normalize", "--n-hvg", "1000",
            "--hvg-batch-key", "donor", "--n-clusters", "100", "--no-umap", "--cluster", str(CONFIG)]
    done = subprocess.run(["sbatch", "--wait", "--mem=2G", f"--chdir={tmp_path}", f"--output={tmp_path}/driver.log",
                           str(CONFIG.parent / "slurm-driver.sbatch"), *argv],
                          capture_output=True, text=True, timeout=600, env=env)
    log = (tmp_path / "driver.log").read_text()
    print(log)
    assert done.returncode == 0, done.stderr + log
    assert "\r" not in log
    assert "Register worker" not in log  # dask's INFO lines only with --verbose
    for line in ("Dask dashboard:", "waiting for the cluster's 2 worker(s) asked for", "worker(s) joined after",
                 "stage moments:", "Harmony iteration 1:", "stage harmony:", "saved to ref.zarr", "stage times (s):"):
        assert line in log, line
    ref = sd.load_reference(tmp_path / "ref.zarr")
    for name in ("loadings", "centroids", "compression"):
        assert np.abs(getattr(ref, name) - getattr(built_reference, name)).max() <= TOL, name
