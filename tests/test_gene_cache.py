"""The gene cache of a build (issue #24): the same reference whether it is kept in memory or on disk, no
scratch left behind (also when the build fails), and the same reference on a cluster, also when a worker
dies during the passes that read it."""

from __future__ import annotations

import logging
import os
import signal

import dask
import numpy as np
import pytest
from _helpers import OnMessage

import symphony_dask as sd
from symphony_dask._preprocessing import gene_cache
from symphony_dask._reference import stages

#: Small enough for seconds, large enough for several chunks, donors and a Krylov PCA.
BUILD = dict(n_hvg=300, hvg_batch_key="donor", n_pcs=10, n_clusters=20, chunk_size=1_000, pca_solver="krylov",
             umap=False, neighbor_index=False, max_iter_harmony=3)  # fmt: skip


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    """6,000 cells x 2,000 genes of raw counts in 4 donors, in an AnnData zarr store."""
    from symphony_dask.datasets.synthetic import write_synthetic_atlas

    path = tmp_path_factory.mktemp("atlas") / "atlas.zarr"
    write_synthetic_atlas(path, 6_000, n_genes=2_000, n_types=6, n_donors=4, seed=3, workers=1)
    return path


@pytest.fixture(scope="module")
def in_memory(atlas):
    return sd.build_reference(atlas, "donor", **BUILD)


def _same(a: sd.Reference, b: sd.Reference) -> None:
    for name in ("loadings", "centroids", "compression", "embedding"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def _scratch(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith("symphony-gene-cache-")]


def test_memory_and_disk_give_the_same_reference_and_leave_nothing(atlas, in_memory, tmp_path, monkeypatch):
    record = in_memory.params["gene_cache"]
    assert record["storage"] == "memory" and record["genes"] == in_memory.n_genes and record["bytes"] > 0
    monkeypatch.setattr(gene_cache, "MEMORY_FRACTION", 0.0)  # nothing fits: the cache goes to disk
    with dask.config.set({"temporary-directory": str(tmp_path)}):
        on_disk = sd.build_reference(atlas, "donor", **BUILD)
    assert on_disk.params["gene_cache"] == dict(record, storage="disk")
    _same(on_disk, in_memory)
    assert _scratch(tmp_path) == []


def test_the_scratch_folder_goes_when_the_build_fails(atlas, tmp_path, monkeypatch):
    seen = []

    def fail(cache, *args, **kwargs):
        seen.extend(_scratch(tmp_path))
        raise RuntimeError("the PCA failed")

    monkeypatch.setattr(gene_cache, "MEMORY_FRACTION", 0.0)
    monkeypatch.setattr(stages, "fit_cached_pca", fail)
    with dask.config.set({"temporary-directory": str(tmp_path)}), pytest.raises(RuntimeError, match="PCA failed"):
        sd.build_reference(atlas, "donor", **BUILD)
    assert len(seen) == 1 and _scratch(tmp_path) == []


@pytest.mark.slow
@pytest.mark.cluster
def test_a_cluster_gives_the_same_reference_also_when_a_worker_dies(atlas, in_memory, local_cluster, caplog):
    """The cache lives on the workers; a worker killed during the PCA's passes loses its chunks of it, which
    are made again from the atlas: the reference is the one a cluster gives without a failure."""
    cluster, client = local_cluster(n_workers=2, processes=True)
    with cluster, client:
        expected = sd.build_reference(atlas, "donor", **BUILD)
        assert expected.params["gene_cache"]["storage"] == "memory"

        def kill() -> None:
            address = sorted(client.scheduler_info()["workers"])[0]
            os.kill(client.run(os.getpid, workers=[address])[address], signal.SIGKILL)

        handler = OnMessage("PCA of", kill)
        logging.getLogger("symphony_dask").addHandler(handler)
        try:
            with caplog.at_level(logging.INFO, logger="symphony_dask"):
                again = sd.build_reference(atlas, "donor", **BUILD)
        finally:
            logging.getLogger("symphony_dask").removeHandler(handler)
    assert handler.fired
    _same(again, expected)
    for name in ("loadings", "embedding"):
        assert np.abs(getattr(expected, name) - getattr(in_memory, name)).max() <= 1e-10, name
