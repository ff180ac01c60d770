"""A reference built on a distributed worker whose memory limit is below the size of the data."""

from __future__ import annotations

import os

import dask
import zarr
from distributed import Client, LocalCluster

import symphony_dask as sd

LIMIT = 2**30  # 1 GiB for the worker process


def test_worker_with_less_memory_than_the_data_builds_the_reference(synthetic_atlas, tmp_path):
    path, summary = synthetic_atlas
    stored = sum(zarr.open_group(str(path))["X"][name].nbytes for name in ("data", "indices", "indptr"))
    assert stored > LIMIT  # the matrix alone (float32 values, int32 indices) exceeds the worker's memory
    memory = {
        "distributed.worker.memory.target": False,
        "distributed.worker.memory.spill": False,
        "distributed.worker.memory.pause": False,
        "distributed.worker.memory.terminate": 0.95,
    }
    with dask.config.set(memory):
        with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=LIMIT, dashboard_address=":0") as cluster:
            with Client(cluster) as client:
                pids = client.run(os.getpid)
                # default chunk size: as many cells as 3/4 of the worker's memory holds
                # no UMAP: this test is about the passes over the matrix (placement on workers: test_umap.py)
                ref = sd.build_reference(path, "donor", n_hvg=1000, max_iter_harmony=2, max_iter_cluster=5,
                                         umap=False)
                ref.save(tmp_path / "ref.zarr")
                assert client.run(os.getpid) == pids, "the worker was restarted"
    loaded = sd.load_reference(tmp_path / "ref.zarr")
    assert loaded.n_cells == summary["cells"] and loaded.n_genes == 1000
    # the integrated reference separates the synthetic cell types: most 5-NN labels are right
    query = sd.map_query(loaded, path, "donor", chunk_size=10_000)
    sd.transfer_labels(loaded, query, "cell_type", k=5)
    assert (query.obs["cell_type_pred"] == query.obs["cell_type"]).mean() > 0.9
