"""What a user can rely on when a cluster misbehaves: a cluster left without workers, a cluster
that closes after the build (workers that run out of memory: test_out_of_core.py)."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import R_BUILD

import symphony_dask as sd
from symphony_dask._dask import chunked
from symphony_dask._dask.chunked import WorkerFailure

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_cluster_without_workers_fails_instead_of_hanging(split, monkeypatch, local_cluster):
    """The no-worker limit ends the wait with an error that says so (before, the build hung)."""
    monkeypatch.setattr(chunked, "NO_WORKERS_TIMEOUT_S", 3.0)
    ref_cells, _ = split
    local_cluster(n_workers=0)
    with pytest.raises(WorkerFailure, match="the cluster has had no worker for 3 s"):
        sd.build_reference(ref_cells, "donor", **R_BUILD)


def test_reference_built_on_a_cluster_outlives_it(split, built_reference, tmp_path, local_cluster):
    """The corrected embedding comes to the client when the build ends: label transfer and saving
    work after the cluster is gone (they raised "Missing dependency" before)."""
    ref_cells, query = split
    ref_cells.write_h5ad(tmp_path / "ref.h5ad")
    cluster, client = local_cluster(n_workers=2)
    with cluster, client:  # closed here: what follows runs without it
        ref = sd.build_reference(tmp_path / "ref.h5ad", "donor", **R_BUILD)
    assert isinstance(ref.embedding, np.ndarray)
    np.testing.assert_allclose(ref.embedding, built_reference.embedding, atol=1e-10)
    mapped = sd.map_query(ref, query, "donor", normalize=False)
    sd.transfer_labels(ref, mapped, "cell_type")
    assert (mapped.obs["cell_type_pred"] == mapped.obs["cell_type"]).mean() > 0.9
    ref.save(tmp_path / "ref.zarr")
