"""Reading expression stores: formats, chunking along genes, 64-bit indptr, broken stores."""

from __future__ import annotations

import anndata as ad
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from conftest import R_BUILD

import symphony_dask as sd
from symphony_dask.io import read_expression

ELEMENTS = ("mean", "std", "loadings", "compression")


def write_zarr(adata: ad.AnnData, path, **kwargs) -> None:
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        adata.write_zarr(path, **kwargs)


@pytest.fixture(scope="module")
def in_memory_reference(pbmcs, oracle):
    return sd.build_reference(pbmcs[oracle.ref_cells].copy(), "donor", **R_BUILD)


def test_dense_store_chunked_along_genes(split, in_memory_reference, tmp_path):
    """Chunks of cells read whole rows across the store's gene chunks."""
    ref_cells, _ = split
    ref_cells.X = ref_cells.X.toarray()
    write_zarr(ref_cells, tmp_path / "dense.zarr", chunks=(100, 200))
    assert read_expression(tmp_path / "dense.zarr", chunk_size=300).X.chunks[1] == (1767,)
    ref = sd.build_reference(tmp_path / "dense.zarr", "donor", chunk_size=300, **R_BUILD)
    for name in ELEMENTS:
        assert np.abs(getattr(ref, name) - getattr(in_memory_reference, name)).max() < 1e-10


def test_dask_matrix_chunked_along_genes_is_rechunked(split, in_memory_reference):
    ref_cells, _ = split
    ref_cells.X = da.from_array(ref_cells.X.toarray(), chunks=(300, 500))
    with pytest.warns(UserWarning, match=r"chunked along genes \(4 chunks\); rechunking"):
        ref = sd.build_reference(ref_cells, "donor", **R_BUILD)
    for name in ELEMENTS:
        assert np.abs(getattr(ref, name) - getattr(in_memory_reference, name)).max() < 1e-10


def test_64_bit_indptr(split, in_memory_reference, tmp_path):
    ref_cells, _ = split
    x = sp.csr_matrix(ref_cells.X)
    x.indptr = x.indptr.astype(np.int64)
    x.indices = x.indices.astype(np.int64)
    ref_cells.X = x
    write_zarr(ref_cells, tmp_path / "wide.zarr")
    assert zarr.open_group(str(tmp_path / "wide.zarr"))["X/indptr"].dtype == np.int64
    ref = sd.build_reference(tmp_path / "wide.zarr", "donor", chunk_size=256, **R_BUILD)
    for name in ELEMENTS:
        assert np.abs(getattr(ref, name) - getattr(in_memory_reference, name)).max() < 1e-10


def test_store_by_gene_is_refused(split, tmp_path):
    ref_cells, _ = split
    ref_cells.X = sp.csc_matrix(ref_cells.X)
    ref_cells.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(ValueError, match=r"stored by gene \(CSC\).*tocsr"):
        sd.build_reference(tmp_path / "csc.h5ad", "donor", **R_BUILD)


def test_store_without_x_or_with_mismatched_obs(split, tmp_path):
    ref_cells, _ = split
    write_zarr(ad.AnnData(obs=ref_cells.obs, var=ref_cells.var), tmp_path / "nox.zarr")
    with pytest.raises(ValueError, match="has no 'X': it is not an AnnData with an expression matrix"):
        sd.build_reference(tmp_path / "nox.zarr", "donor")
    group = zarr.open_group(str(tmp_path / "bad.zarr"), mode="w", zarr_format=3)
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        ad.io.write_elem(group, "X", ref_cells.X)
        ad.io.write_elem(group, "obs", ref_cells.obs.iloc[:100])
        ad.io.write_elem(group, "var", ref_cells.var)
    with pytest.raises(ValueError, match=r"X has shape \(910, 1767\) but obs has 100 rows"):
        sd.build_reference(tmp_path / "bad.zarr", "donor")


@pytest.mark.parametrize("sparse", [True, False])
def test_in_memory_chunks_are_views_and_the_query_is_left_unchanged(split, in_memory_reference, sparse):
    _, query = split
    query.X = sp.csr_matrix(query.X) if sparse else query.X.toarray()
    before = query.X.copy()
    x = read_expression(query, chunk_size=100).X
    blocks = [x.blocks[i].compute() for i in range(x.numblocks[0])]
    stacked = sp.vstack(blocks).toarray() if sparse else np.vstack(blocks)
    np.testing.assert_array_equal(stacked, before.toarray() if sparse else before)
    def shares(block):  # inside a task: the chunk is a view of the query's matrix
        values = (block.data, query.X.data) if sparse else (block, query.X)
        return np.array([[np.shares_memory(*values)]])

    assert x.map_blocks(shares, chunks=(1, 1), dtype=bool, meta=np.array([[True]])).compute().all()
    chunked = sd.map_query(in_memory_reference, query, "donor", normalize=False, chunk_size=100, copy=True)
    whole = sd.map_query(in_memory_reference, query, "donor", normalize=False, copy=True)
    assert np.abs(chunked.obsm["X_symphony"] - whole.obsm["X_symphony"]).max() <= 1e-10
    after = query.X.toarray() if sparse else query.X
    np.testing.assert_array_equal(after, before.toarray() if sparse else before)
