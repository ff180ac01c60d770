"""Results do not depend on chunk size, input type or scheduler (to 1e-10)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from _helpers import R_BUILD

import symphony_dask as sd

pytestmark = pytest.mark.slow  # each build here takes 2 to 5 s on two cores, 10 s with sparse formats

TOL = 1e-10
ELEMENTS = ("mean", "std", "loadings", "centroids", "cluster_sizes", "compression", "embedding")


def assert_same_reference(a: sd.Reference, b: sd.Reference) -> None:
    assert list(a.genes) == list(b.genes)
    for name in ELEMENTS:
        assert np.abs(np.asarray(getattr(a, name)) - np.asarray(getattr(b, name))).max() <= TOL, name


def build_and_map(ref_cells, query, chunk_size, **kwargs):
    ref = sd.build_reference(ref_cells, "donor", chunk_size=chunk_size, **R_BUILD, **kwargs)
    mapped = sd.map_query(ref, query.copy(), "donor", normalize=False, chunk_size=chunk_size)
    return ref, mapped


@pytest.fixture(scope="module")
def one_chunk(pbmcs, oracle):
    return build_and_map(pbmcs[oracle.ref_cells].copy(), pbmcs[oracle.query_cells].copy(), None)


@pytest.mark.parametrize("chunk_size", [100, 337])
def test_chunk_size_does_not_change_results(pbmcs, oracle, one_chunk, chunk_size):
    ref, mapped = build_and_map(pbmcs[oracle.ref_cells].copy(), pbmcs[oracle.query_cells].copy(), chunk_size)
    assert_same_reference(one_chunk[0], ref)
    for key in ("X_symphony", "X_symphony_pca", "X_symphony_R"):
        assert np.abs(one_chunk[1].obsm[key] - mapped.obsm[key]).max() <= TOL


@pytest.mark.parametrize("kind", ["dense", "h5ad", "zarr"])
def test_input_kinds_give_the_same_reference(pbmcs, oracle, one_chunk, tmp_path, kind):
    cells = pbmcs[oracle.ref_cells].copy()
    if kind == "dense":
        cells.X = cells.X.toarray()
        data = cells
    elif kind == "h5ad":
        cells.write_h5ad(tmp_path / "ref.h5ad")
        data = tmp_path / "ref.h5ad"
    else:
        with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
            cells.write_zarr(tmp_path / "ref.zarr")
        data = str(tmp_path / "ref.zarr")
    ref = sd.build_reference(data, "donor", chunk_size=250, **R_BUILD)
    assert_same_reference(one_chunk[0], ref)


def test_backed_anndata_query(pbmcs, oracle, one_chunk, tmp_path):
    pbmcs[oracle.query_cells].write_h5ad(tmp_path / "query.h5ad")
    backed = ad.read_h5ad(tmp_path / "query.h5ad", backed="r")
    mapped = sd.map_query(one_chunk[0], backed, "donor", normalize=False, chunk_size=100)
    assert np.abs(one_chunk[1].obsm["X_symphony"] - mapped.obsm["X_symphony"]).max() <= TOL
    from_path = sd.map_query(one_chunk[0], tmp_path / "query.h5ad", "donor", normalize=False)
    assert from_path.X is None and from_path.n_obs == 290
    assert np.abs(one_chunk[1].obsm["X_symphony"] - from_path.obsm["X_symphony"]).max() <= TOL


@pytest.mark.cluster
def test_threads_and_process_cluster_agree(pbmcs, oracle, local_cluster):
    """Every pass, Harmony included, on two worker processes (few Harmony iterations: each one is a
    chain of small steps, and their scheduling latency, not their work, sets the time here)."""
    ref_cells, query = pbmcs[oracle.ref_cells].copy(), pbmcs[oracle.query_cells].copy()
    short = dict(max_iter_harmony=2, max_iter_cluster=5)
    threaded = build_and_map(ref_cells, query, 200, **short)
    local_cluster(n_workers=2, processes=True)
    distributed = build_and_map(ref_cells, query, 200, **short)
    assert_same_reference(threaded[0], distributed[0])
    assert np.abs(threaded[1].obsm["X_symphony"] - distributed[1].obsm["X_symphony"]).max() <= TOL


def test_sparse_formats_are_accepted(pbmcs, oracle, one_chunk):
    cells = pbmcs[oracle.ref_cells].copy()
    cells.X = sp.csc_matrix(cells.X)
    ref = sd.build_reference(cells, "donor", **R_BUILD)
    assert_same_reference(one_chunk[0], ref)
