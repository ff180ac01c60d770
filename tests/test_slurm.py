"""Building and mapping through a real SLURM cluster (dask-jobqueue) gives the threaded result.

Needs a SLURM controller on this machine (``.ci/slurm_up`` starts a single-node one; CI runs it,
with CI=true, and this test must then run). Elsewhere it is skipped when ``sinfo`` finds no SLURM.
"""

from __future__ import annotations

import os
import shutil
import subprocess
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
