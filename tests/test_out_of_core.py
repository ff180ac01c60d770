"""Data bigger than a worker's memory, on the synthetic atlas (1.1 GB of CSR arrays): a reference built
on one worker, query shards mapped on two, and a chunk too big for its worker named in the error.

The three share the atlas (written once per session, ~20 s) and so live in one file: run in parallel
(pytest-xdist, ``--dist loadfile``), one process writes it."""

from __future__ import annotations

import os

import dask
import numpy as np
import pytest
import zarr
from _helpers import NO_SPILL

import symphony_dask as sd
from symphony_dask._dask.chunked import WorkerFailure
from symphony_dask.datasets.synthetic import write_synthetic_atlas

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

LIMIT = 2**30  # 1 GiB for the worker process


def test_worker_with_less_memory_than_the_data_builds_the_reference(synthetic_atlas, tmp_path, local_cluster):
    path, summary = synthetic_atlas
    stored = sum(zarr.open_group(str(path))["X"][name].nbytes for name in ("data", "indices", "indptr"))
    assert stored > LIMIT  # the matrix alone (float32 values, int32 indices) exceeds the worker's memory
    with dask.config.set(NO_SPILL):
        cluster, client = local_cluster(n_workers=1, threads_per_worker=2, memory_limit=LIMIT)
        with cluster, client:  # closed here: the mapping below runs on threads
            pids = client.run(os.getpid)
            # default chunk size: what a task's share of the worker's memory holds (here the least, 1,000 cells)
            # no UMAP: this test is about the passes over the matrix (placement on workers: test_umap.py)
            ref = sd.build_reference(path, "donor", n_hvg=1000, max_iter_harmony=2, max_iter_cluster=5, umap=False)
            ref.save(tmp_path / "ref.zarr")
            assert client.run(os.getpid) == pids, "the worker was restarted"
    loaded = sd.load_reference(tmp_path / "ref.zarr")
    assert loaded.n_cells == summary["cells"] and loaded.n_genes == 1000
    # the integrated reference separates the synthetic cell types: most 5-NN labels are right
    query = sd.map_query(loaded, path, "donor", chunk_size=10_000)
    sd.transfer_labels(loaded, query, "cell_type", k=5)
    assert (query.obs["cell_type_pred"] == query.obs["cell_type"]).mean() > 0.9


def test_workers_with_less_memory_than_the_query_map_its_shards(synthetic_atlas, tmp_path, local_cluster):
    """Shards are read and mapped on the workers: 1.3 GB of query matrices, 1 GiB per worker."""
    atlas, _ = synthetic_atlas
    model = dict(n_genes=10_000, n_types=15, n_donors=6, seed=1)  # the atlas's cell types and donors
    write_synthetic_atlas(tmp_path / "ref.zarr", 20_000, **model)
    shards = [atlas]
    for i in range(2):
        write_synthetic_atlas(tmp_path / f"extra_{i}.zarr", 10_000, **model)
        shards.append(tmp_path / f"extra_{i}.zarr")
    # no UMAP: this test is about reading and mapping shards (placement on workers: test_umap.py)
    ref = sd.build_reference(tmp_path / "ref.zarr", "donor", n_hvg=1000, max_iter_harmony=2, umap=False)
    with dask.config.set(NO_SPILL):
        cluster, client = local_cluster(n_workers=2, memory_limit=2**30)
        with cluster, client:  # closed here: the label transfer below runs on threads
            client.wait_for_workers(2)
            pids = client.run(os.getpid)
            mapped = sd.map_query(ref, shards, "donor", chunk_size=10_000)
            assert client.run(os.getpid) == pids, "a worker was restarted"
    assert mapped.n_obs == 120_000 and np.isfinite(mapped.obsm["X_symphony"]).all()
    sd.transfer_labels(ref, mapped, "cell_type")
    assert (mapped.obs["cell_type_pred"] == mapped.obs["cell_type"]).mean() > 0.9


def test_worker_killed_for_memory_names_the_chunk_size(synthetic_atlas, local_cluster):
    """A chunk too big for the worker: the worker is killed, and the error says which chunk size
    and how much memory, and what to do (it used to be dask's KilledWorker text, or a hang)."""
    path, _ = synthetic_atlas
    with dask.config.set({**NO_SPILL, "distributed.scheduler.allowed-failures": 0}):
        local_cluster(n_workers=1, memory_limit="600MiB")
        with pytest.raises(
            WorkerFailure,
            match=(
                r"workers died running .* most likely out of memory\. The matrix "
                r"is read in chunks of 50,000 cells x 10,000 genes, with 0\.6 GiB "
                r"of memory per task: pass a smaller chunk size \(e\.g\. "
                r"chunk_size=12500"
            ),
        ):
            sd.build_reference(path, "donor", chunk_size=50_000)
