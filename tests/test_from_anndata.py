"""References from integrations users already have (scanpy's layout, a Harmony result)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import symphony_dask as sd
from symphony_dask._preprocessing.pca import project


@pytest.fixture(scope="module")
def scanpy_like(built_reference, pbmcs, oracle):
    """The PBMC reference cells as scanpy leaves them after scale, pca (on the variable genes) and
    Harmony: var mean/std, varm['PCs'] with zero rows for the other genes, obsm X_pca / X_pca_harmony."""
    cells = pbmcs[oracle.ref_cells].copy()
    genes = cells.var_names.get_indexer(built_reference.genes)
    scaling = dict(genes=genes, mean=built_reference.mean, std=built_reference.std, normalize=False)
    z = project(cells.X, loadings=built_reference.loadings, **scaling)
    harmony = sd.harmonize(z, cells.obs, "donor", n_clusters=100, seed=111)
    cells.var["mean"], cells.var["std"] = 0.0, 1.0
    cells.var.iloc[genes, cells.var.columns.get_loc("mean")] = built_reference.mean
    cells.var.iloc[genes, cells.var.columns.get_loc("std")] = built_reference.std
    pcs = np.zeros((cells.n_vars, 20))
    pcs[genes] = built_reference.loadings
    cells.varm["PCs"] = pcs
    cells.obsm["X_pca"], cells.obsm["X_pca_harmony"] = z, np.asarray(harmony.Z_corr)
    return cells, np.asarray(harmony.R)


def test_with_harmony_r_it_is_build_reference_from_harmony_obj(scanpy_like, built_reference, pbmcs, oracle):
    cells, r = scanpy_like
    ref = sd.reference_from_anndata(cells, R=r)
    assert list(ref.genes) == sorted(built_reference.genes, key=list(cells.var_names).index)
    order = ref.genes.get_indexer(built_reference.genes)
    np.testing.assert_allclose(ref.loadings[order], built_reference.loadings, atol=1e-12)
    z_corr = cells.obsm["X_pca_harmony"]
    np.testing.assert_allclose(ref.compression, r.T @ z_corr, atol=1e-10)  # C = R^T Z_corr
    np.testing.assert_allclose(ref.cluster_sizes, r.sum(axis=0), atol=1e-10)  # N_r
    # the same Harmony as the build: the same compressed reference, and the query maps the same
    np.testing.assert_allclose(ref.compression, built_reference.compression, atol=1e-8)
    query = pbmcs[oracle.query_cells].copy()
    ours = sd.map_query(ref, query.copy(), "donor", normalize=False).obsm["X_symphony"]
    built = sd.map_query(built_reference, query.copy(), "donor", normalize=False).obsm["X_symphony"]
    assert np.abs(ours - built).max() < 1e-8


def test_without_r_soft_clusters_are_fitted(scanpy_like, pbmcs, oracle):
    cells, _ = scanpy_like
    ref = sd.reference_from_anndata(cells, n_clusters=30)
    assert ref.n_clusters == 30 and ref.params["clusters"] == "soft k-means, 30 clusters, seed 111"
    mapped = sd.map_query(ref, pbmcs[oracle.query_cells].copy(), "donor", normalize=False)
    sd.transfer_labels(ref, mapped, "cell_type")
    assert (mapped.obs["cell_type_pred"] == mapped.obs["cell_type"]).mean() >= 0.9
    sd.per_cell_mapping_metric(ref, mapped)  # the moments of X_pca came along


def test_any_loadings_make_a_reference_cca_style(built_reference, pbmcs, oracle):
    """Reference.from_arrays takes loadings from any linear method (the paper's CCA example): here a
    random orthonormal basis of the scaled genes; mapping projects with it and corrects as usual."""
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(built_reference.n_genes, 20)))
    cells = pbmcs[oracle.ref_cells].copy()
    genes = cells.var_names.get_indexer(built_reference.genes)
    z = project(
        cells.X, genes=genes, mean=built_reference.mean, std=built_reference.std, normalize=False, loadings=basis
    )
    res = sd.harmonize(z, cells.obs, "donor", n_clusters=50, seed=1)
    r, z_corr = np.asarray(res.R), np.asarray(res.Z_corr)
    ref = sd.Reference.from_arrays(
        built_reference.genes,
        built_reference.mean,
        built_reference.std,
        basis,
        (z_corr.T @ r) / np.linalg.norm(z_corr.T @ r, axis=0),
        r.sum(axis=0),
        r.T @ z_corr,
        embedding=z_corr,
        obs=cells.obs,
    )
    mapped = sd.map_query(ref, pbmcs[oracle.query_cells].copy(), "donor", normalize=False)
    assert mapped.obsm["X_symphony"].shape == (290, 20) and np.isfinite(mapped.obsm["X_symphony"]).all()


def test_missing_pieces_are_named(scanpy_like):
    cells, r = scanpy_like
    with pytest.raises(
        ValueError, match="'X_harmony' is not in the AnnData's obsm; its keys are: 'X_pca', 'X_pca_harmony'"
    ):
        sd.reference_from_anndata(cells, corrected_key="X_harmony")
    with pytest.raises(ValueError, match="harmonypy's R is clusters x cells: pass its transpose"):
        sd.reference_from_anndata(cells, R=r.T)
    bare = ad.AnnData(obs=cells.obs, var=cells.var.drop(columns=["std"]), obsm=dict(cells.obsm), varm=dict(cells.varm))
    with pytest.raises(ValueError, match="'std' is not a column of the AnnData's var"):
        sd.reference_from_anndata(bare)
