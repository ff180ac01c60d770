"""normalize='tfidf' for (binarized) peak x cell matrices: Signac's RunTFIDF (method 1), the IDF kept
in the reference and applied to queries."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import symphony_dask as sd
from symphony_dask._preprocessing.normalize import column_sums, inverse_document_frequency, log_normalize
from symphony_dask._preprocessing.pca import project


def by_formula(x: np.ndarray) -> np.ndarray:
    """``log(1 + TF x IDF x 1e4)``: TF = x / cell total, IDF = n_cells / peak total (Signac's method 1)."""
    with np.errstate(divide="ignore", invalid="ignore"):  # peaks never open: NaN, never used
        tf = x / x.sum(axis=1, keepdims=True)
        idf = x.shape[0] / x.sum(axis=0)
        return np.log1p(tf * idf[None, :] * 1e4)


@pytest.fixture(scope="module")
def peaks(pbmcs):
    """The bundled PBMCs' counts binarized, as an accessibility matrix is."""
    x = (sp.csr_matrix(pbmcs.layers["counts"]) > 0).astype(np.float64)
    return ad.AnnData(X=x, obs=pbmcs.obs.copy(), var=pbmcs.var.copy())


def test_tfidf_kernel_equals_the_formula():
    x = (np.random.default_rng(0).random((30, 12)) < 0.4).astype(np.float64)
    x[:, 0] = 1.0  # every cell open at peak 0, so every cell has a total
    idf = inverse_document_frequency(column_sums(x))
    np.testing.assert_allclose(idf, 30 / x.sum(axis=0), rtol=1e-15)
    expected = by_formula(x)
    np.testing.assert_allclose(log_normalize(x, idf=idf), expected, rtol=1e-14)
    sparse = log_normalize(sp.csr_matrix(x), idf=idf)
    np.testing.assert_allclose(sparse.toarray(), expected, rtol=1e-14)
    # chunked: the IDF merges over chunks of cells
    halves = column_sums(x[:13]).merge(column_sums(x[13:]))
    np.testing.assert_array_equal(inverse_document_frequency(halves), idf)


def test_tfidf_reference_maps_a_query_with_its_own_idf(peaks, tmp_path):
    ref_cells, query = peaks[peaks.obs.donor != "3pv1"].copy(), peaks[peaks.obs.donor == "3pv1"].copy()
    ref = sd.build_reference(ref_cells, "donor", normalize="tfidf", n_hvg=1000, umap=False)
    x = ref_cells.X.toarray()
    idf_all = inverse_document_frequency(column_sums(x))
    np.testing.assert_allclose(ref.idf, idf_all[ref_cells.var_names.get_indexer(ref.genes)], rtol=1e-14)
    values = by_formula(x)[:, ref_cells.var_names.get_indexer(ref.genes)]
    np.testing.assert_allclose(ref.mean, values.mean(axis=0), atol=1e-12)

    ref.save(tmp_path / "ref.zarr")
    loaded = sd.load_reference(tmp_path / "ref.zarr")
    np.testing.assert_array_equal(loaded.idf, ref.idf)
    mapped = sd.map_query(loaded, query.copy(), "donor")
    # the query's TF is its own, its IDF the reference's (not the query's own peak frequencies)
    q = query.X.toarray()[:, query.var_names.get_indexer(ref.genes)]
    tf = q / query.X.toarray().sum(axis=1, keepdims=True)
    scaled = np.clip((np.log1p(tf * ref.idf * 1e4) - ref.mean) / ref.std, -10, 10)
    np.testing.assert_allclose(mapped.obsm["X_symphony_pca"], scaled @ ref.loadings, atol=1e-10)
    own_idf = project(
        query.X,
        query.var_names.get_indexer(ref.genes),
        ref.mean,
        ref.std,
        ref.loadings,
        normalize=True,
        idf=inverse_document_frequency(column_sums(query.X)),
    )
    assert np.abs(own_idf - mapped.obsm["X_symphony_pca"]).max() > 0.1
    sd.transfer_labels(loaded, mapped, "cell_type")
    accuracy = (mapped.obs["cell_type_pred"].astype(str) == query.obs["cell_type"].astype(str)).mean()
    assert accuracy >= 0.75  # observed 0.817 from binarized RNA (log-normalized counts: 0.914)


def test_tfidf_does_not_depend_on_chunks(peaks):
    cells = peaks[peaks.obs.donor != "3pv1"].copy()
    kw = dict(normalize="tfidf", n_hvg=500, umap=False, max_iter_harmony=2)
    one = sd.build_reference(cells, "donor", **kw)
    many = sd.build_reference(cells, "donor", chunk_size=200, **kw)
    np.testing.assert_allclose(many.idf, one.idf, rtol=1e-14)
    np.testing.assert_allclose(many.mean, one.mean, atol=1e-12)


def test_bad_normalize_is_named(peaks):
    with pytest.raises(ValueError, match="must be True, False or 'tfidf'"):
        sd.build_reference(peaks, "donor", normalize="log")


def test_command_line_tfidf_build_and_map(peaks, tmp_path, capsys):
    from symphony_dask.cli import main

    ref_cells, query = peaks[peaks.obs.donor != "3pv1"].copy(), peaks[peaks.obs.donor == "3pv1"].copy()
    ref_cells.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    marker = str(ref_cells.var_names[0])
    build = [
        "build",
        str(tmp_path / "ref.h5ad"),
        "--out",
        str(tmp_path / "ref.zarr"),
        "--batch-key",
        "donor",
        "--tfidf",
        "--variable-genes",
        "mvp",
        "--additional-genes",
        marker,
        "--n-hvg",
        "500",
        "--no-umap",
        "-q",
    ]
    assert main(build) == 0
    ref = sd.load_reference(tmp_path / "ref.zarr")
    assert ref.params["normalize"] == "tfidf" and ref.params["variable_genes"] == "mvp" and ref.idf is not None
    assert marker in set(ref.genes)
    code = main(
        [
            "map",
            "--reference",
            str(tmp_path / "ref.zarr"),
            "--query",
            str(tmp_path / "query.h5ad"),
            "--batch-key",
            "donor",
            "--transfer",
            "cell_type",
            "--out",
            str(tmp_path / "mapped.h5ad"),
            "-q",
        ]
    )
    assert code == 0
    mapped = ad.read_h5ad(tmp_path / "mapped.h5ad")
    expected = sd.map_query(ref, query.copy(), "donor").obsm["X_symphony"]
    np.testing.assert_allclose(mapped.obsm["X_symphony"], expected, atol=1e-12)
    assert main([*build[:-1], "--no-normalize", "--overwrite", "-q"]) == 2
    assert "--tfidf and --no-normalize contradict each other" in capsys.readouterr().err
