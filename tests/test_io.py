"""Reading expression stores: formats, chunking along genes, 64-bit indptr, broken stores."""

from __future__ import annotations

import anndata as ad
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from _helpers import R_BUILD

import symphony_dask as sd
from symphony_dask._io.expression import read_expression

ELEMENTS = ("mean", "std", "loadings", "compression")


def write_zarr(adata: ad.AnnData, path, **kwargs) -> None:
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        adata.write_zarr(path, **kwargs)


@pytest.mark.slow
def test_dense_store_chunked_along_genes(split, built_reference, tmp_path):
    """Chunks of cells read whole rows across the store's gene chunks."""
    ref_cells, _ = split
    ref_cells.X = ref_cells.X.toarray()
    write_zarr(ref_cells, tmp_path / "dense.zarr", chunks=(100, 200))
    assert read_expression(tmp_path / "dense.zarr", chunk_size=300).X.chunks[1] == (1767,)
    ref = sd.build_reference(tmp_path / "dense.zarr", "donor", chunk_size=300, **R_BUILD)
    for name in ELEMENTS:
        assert np.abs(getattr(ref, name) - getattr(built_reference, name)).max() < 1e-10


def test_dask_matrix_chunked_along_genes_is_rechunked(split, built_reference):
    ref_cells, _ = split
    ref_cells.X = da.from_array(ref_cells.X.toarray(), chunks=(300, 500))
    with pytest.warns(UserWarning, match=r"chunked along genes \(4 chunks\); rechunking"):
        ref = sd.build_reference(ref_cells, "donor", **R_BUILD)
    for name in ELEMENTS:
        assert np.abs(getattr(ref, name) - getattr(built_reference, name)).max() < 1e-10


@pytest.mark.slow
def test_64_bit_indptr(split, built_reference, tmp_path):
    ref_cells, _ = split
    x = sp.csr_matrix(ref_cells.X)
    x.indptr = x.indptr.astype(np.int64)
    x.indices = x.indices.astype(np.int64)
    ref_cells.X = x
    write_zarr(ref_cells, tmp_path / "wide.zarr")
    assert zarr.open_group(str(tmp_path / "wide.zarr"))["X/indptr"].dtype == np.int64
    ref = sd.build_reference(tmp_path / "wide.zarr", "donor", chunk_size=256, **R_BUILD)
    for name in ELEMENTS:
        assert np.abs(getattr(ref, name) - getattr(built_reference, name)).max() < 1e-10


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
def test_in_memory_chunks_are_views_and_the_query_is_left_unchanged(split, built_reference, sparse):
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
    chunked = sd.map_query(built_reference, query, "donor", normalize=False, chunk_size=100, copy=True)
    whole = sd.map_query(built_reference, query, "donor", normalize=False, copy=True)
    assert np.abs(chunked.obsm["X_symphony"] - whole.obsm["X_symphony"]).max() <= 1e-10
    after = query.X.toarray() if sparse else query.X
    np.testing.assert_array_equal(after, before.toarray() if sparse else before)


@pytest.mark.slow
def test_backed_views_give_their_cells_and_genes_only(pbmcs, oracle, built_reference, tmp_path):
    """A view of a backed AnnData is read as the view, not the whole file (it used to give all
    1,200 cells, or all genes)."""
    pbmcs.write_h5ad(tmp_path / "all.h5ad")
    backed = ad.read_h5ad(tmp_path / "all.h5ad", backed="r")
    ref_view = backed[backed.obs_names.isin(oracle.ref_cells)]
    expr = read_expression(ref_view, chunk_size=256)
    assert expr.X.shape == (910, 1767) and len(expr.obs) == 910
    np.testing.assert_array_equal(expr.obs.index, ref_view.obs_names)
    order = [pbmcs.obs_names.get_loc(c) for c in oracle.ref_cells]
    expected = sp.csr_matrix(pbmcs.X)[np.sort(order)].toarray()
    np.testing.assert_array_equal(expr.X.compute().toarray(), expected)
    ref = sd.build_reference(ref_view, "donor", **R_BUILD)
    in_order = sd.build_reference(pbmcs[np.sort(order)].copy(), "donor", **R_BUILD)
    for name in ELEMENTS:
        assert np.abs(getattr(ref, name) - getattr(in_order, name)).max() < 1e-10

    query_view = backed[backed.obs.donor == "3pv1"]
    mapped = sd.map_query(built_reference, query_view, "donor", normalize=False)
    direct = sd.map_query(built_reference, pbmcs[pbmcs.obs.donor == "3pv1"].copy(), "donor", normalize=False)
    assert mapped.n_obs == 290
    np.testing.assert_allclose(mapped.obsm["X_symphony"], direct.obsm["X_symphony"], atol=1e-10)

    genes = backed[:, 10:400]
    expr = read_expression(genes)
    assert expr.X.shape == (1200, 390) and list(expr.var.index) == list(pbmcs.var_names[10:400])
    np.testing.assert_array_equal(expr.X[:50].compute().toarray(), sp.csr_matrix(pbmcs.X)[:50, 10:400].toarray())


def test_backed_view_in_another_order_is_refused(pbmcs, tmp_path):
    pbmcs.write_h5ad(tmp_path / "all.h5ad")
    backed = ad.read_h5ad(tmp_path / "all.h5ad", backed="r")
    with pytest.raises(ValueError, match=r"takes its cells in another order than the file .*\.to_memory\(\)"):
        read_expression(backed[[5, 3, 9]])


@pytest.mark.slow
def test_float16_and_coo_chunks(split):
    """float16 values (no scipy sparse type holds them) and a dask array of COO chunks are read as
    float32 and CSR."""
    ref_cells, _ = split
    dense16 = ref_cells.copy()
    dense16.X = ref_cells.X.toarray().astype(np.float16)
    same = ref_cells.copy()
    same.X = dense16.X.astype(np.float32)
    kw = dict(normalize=False, n_hvg=500, n_clusters=20)
    a, b = sd.build_reference(dense16, "donor", **kw), sd.build_reference(same, "donor", **kw)
    np.testing.assert_array_equal(a.loadings, b.loadings)
    coo = ref_cells.copy()
    coo.X = da.from_array(sp.csr_matrix(ref_cells.X), chunks=(300, -1), asarray=False).map_blocks(
        lambda block: block.tocoo(), dtype=ref_cells.X.dtype
    )
    c = sd.build_reference(coo, "donor", chunk_size=300, **kw)
    d = sd.build_reference(ref_cells, "donor", chunk_size=300, **kw)
    np.testing.assert_array_equal(c.loadings, d.loadings)


def test_unsupported_values_and_chunks_are_refused(split):
    ref_cells, _ = split
    words = ref_cells.copy()
    words.X = np.full(ref_cells.shape, "1", dtype=object)
    with pytest.raises(TypeError, match="holds object values; expected numbers"):
        read_expression(words)
    odd = ref_cells.copy()
    odd.X = da.from_array(ref_cells.X.toarray(), chunks=(300, -1)).map_blocks(
        lambda b: {"not": "an array"}, dtype=np.float64, meta=np.empty((0, 0))
    )
    with pytest.raises(TypeError, match=r"a chunk of the expression matrix is a builtins\.dict"):
        sd.build_reference(odd, "donor", normalize=False, n_hvg=500, n_clusters=20)


def test_large_in_memory_data_is_read_in_chunks():
    """Above 10,000 cells an in-memory matrix is split (never one task over the whole matrix, which
    building would densify after scaling); up to 10,000 it stays one chunk."""
    from symphony_dask._io.expression import IN_MEMORY_CHUNK

    x = sp.random(25_000, 40, density=0.1, format="csr", random_state=0)
    big = ad.AnnData(x)
    assert read_expression(big).X.chunks[0] == (10_000, 10_000, 5_000) and IN_MEMORY_CHUNK == 10_000
    assert read_expression(big[:10_000].copy()).X.chunks[0] == (10_000,)
    assert read_expression(big, chunk_size=7_000).X.chunks[0] == (7_000, 7_000, 7_000, 4_000)
