"""Bad input gets a clear error (or warning) that says what is wrong and how to fix it."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from _helpers import R_BUILD, from_elements

import symphony_dask as sd
from symphony_dask.cli.spelling import command_line_spelling


def test_batch_key_not_in_obs_names_it_and_lists_columns(split):
    ref_cells, _ = split
    with pytest.raises(ValueError, match=r"batch key 'tech' is not a column of obs; the columns are: 'donor', 'nUMI'"):
        sd.build_reference(ref_cells, "tech", **R_BUILD)
    with pytest.raises(ValueError, match=r"hvg_batch_key 'sample' is not a column of obs"):
        sd.build_reference(ref_cells, "donor", **{**R_BUILD, "hvg_batch_key": "sample"})


def test_query_batch_key_missing_or_with_missing_values(built_reference, split):
    _, query = split
    with pytest.raises(ValueError, match=r"batch key 'sample' is not a column of the query's obs"):
        sd.map_query(built_reference, query, "sample", normalize=False)
    query.obs["donor"] = query.obs["donor"].astype(object)
    query.obs.iloc[:3, query.obs.columns.get_loc("donor")] = None
    with pytest.raises(ValueError, match=r"'donor' has 3 missing value\(s\)"):
        sd.map_query(built_reference, query, "donor", normalize=False)


def test_query_sharing_no_genes(built_reference, split):
    _, query = split
    query.var_names = [f"ENSG{i:011d}" for i in range(query.n_vars)]
    with pytest.raises(ValueError, match=r"shares no genes with the reference.*same gene identifiers"):
        sd.map_query(built_reference, query, "donor", normalize=False)


def test_query_with_few_reference_genes_warns_with_fraction(built_reference, split):
    _, query = split
    keep = query.var_names.isin(built_reference.genes[:400]) | ~query.var_names.isin(built_reference.genes)
    with pytest.warns(UserWarning, match=r"only 400 of 1360 reference genes \(29.4%\) are in the query"):
        out = sd.map_query(built_reference, query[:, keep].copy(), "donor", normalize=False)
    assert out.uns["symphony"]["fraction_genes_found"] == pytest.approx(400 / 1360)


@pytest.mark.parametrize(
    "value, message",
    [(np.nan, r"3 NaN value\(s\)"), (np.inf, r"3 infinite value\(s\)"), (-1.0, r"3 negative value\(s\)")],
)
def test_nan_inf_negative_values_are_counted(split, built_reference, value, message):
    ref_cells, query = split
    for adata in (ref_cells, query):
        adata.X = adata.X.tocsr(copy=True)
        adata.X.data[[0, 10, 20]] = value
    with pytest.raises(ValueError, match=message):
        sd.build_reference(ref_cells, "donor", **R_BUILD)
    with pytest.raises(ValueError, match=message):
        sd.map_query(built_reference, query, "donor", normalize=False)
    with pytest.raises(ValueError, match=message):
        sd.map_query(built_reference, query, "donor", normalize=False, chunk_size=100)


def test_integer_counts_with_normalize_false_warn(raw_pbmcs):
    with pytest.warns(UserWarning, match="only integer values, which look like raw counts, but normalize=False"):
        sd.build_reference(raw_pbmcs, "batch", normalize=False, n_hvg=300, n_pcs=5, n_clusters=5)


def test_duplicated_gene_names(split, built_reference):
    ref_cells, query = split
    names = list(ref_cells.var_names)
    names[1] = names[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's own warning about non-unique names
        ref_cells.var_names = names
        query.var_names = names
    with pytest.raises(ValueError, match=r"the reference has 1 duplicated gene name\(s\): LYZ.*var_names_make_unique"):
        sd.build_reference(ref_cells, "donor", **R_BUILD)
    with pytest.raises(ValueError, match=r"the query has 1 duplicated gene name\(s\): LYZ"):
        sd.map_query(built_reference, query, "donor", normalize=False)


def test_zero_count_cells_are_left_out_with_a_warning(raw_pbmcs):
    data = raw_pbmcs.copy()
    keep = np.ones(data.n_obs)
    keep[[0, 5, 130]] = 0
    data.X = sp.csr_matrix(sp.diags(keep) @ data.X)
    data.X.eliminate_zeros()
    kw = dict(n_hvg=300, n_pcs=5, n_clusters=5, chunk_size=100)
    with pytest.warns(UserWarning, match="3 of 240 reference cells have zero total counts and are left out"):
        ref = sd.build_reference(data, "batch", **kw)
    assert ref.n_cells == 237 and list(ref.obs.index) == list(data.obs.index[keep > 0])
    expected = sd.build_reference(data[keep > 0].copy(), "batch", **kw)
    assert np.abs(ref.embedding - expected.embedding).max() < 1e-10
    with pytest.warns(UserWarning, match=r"3 cell\(s\) of the query expression have zero total counts"):
        mapped = sd.map_query(ref, data, "batch")
    assert mapped.n_obs == 240


def test_impossible_sizes(split):
    ref_cells, _ = split
    with pytest.raises(ValueError, match="n_pcs=2000 must be smaller than the number of cells"):
        sd.build_reference(ref_cells, "donor", **{**R_BUILD, "n_pcs": 2000})
    with pytest.raises(ValueError, match="n_clusters=5000 is impossible with 910 cells; try n_clusters=30"):
        sd.build_reference(ref_cells, "donor", **{**R_BUILD, "n_clusters": 5000})
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        sd.build_reference(ref_cells, "donor", chunk_size=0, **R_BUILD)


def test_label_transfer_needs_embedding_and_key(built_reference, r_reference, split, tmp_path):
    _, query = split
    mapped = sd.map_query(built_reference, query, "donor", normalize=False)
    with pytest.raises(ValueError, match=r"'celltype' is not a column of the reference obs; the columns are: 'donor'"):
        sd.transfer_labels(built_reference, mapped, "celltype")
    with pytest.raises(ValueError, match=r"k=5000 must be between 1 and the number of reference cells \(910\)"):
        sd.transfer_labels(built_reference, mapped, "cell_type", k=5000)
    minimal = from_elements(r_reference, cells=False)
    with pytest.raises(ValueError, match="saved without its per-cell embedding"):
        sd.transfer_labels(minimal, mapped, "cell_type")
    del mapped.obsm["X_symphony"]
    with pytest.raises(ValueError, match="map it first with map_query"):
        sd.transfer_labels(built_reference, mapped, "cell_type")


def test_input_that_is_not_anndata(tmp_path):
    with pytest.raises(TypeError, match="expected an AnnData or a path"):
        sd.build_reference(np.zeros((5, 5)))
    with pytest.raises(FileNotFoundError, match="no such file"):
        sd.build_reference(tmp_path / "missing.h5ad")
    (tmp_path / "bad.h5ad").write_text("not hdf5")
    with pytest.raises(ValueError, match=r"is not an \.h5ad"):
        sd.build_reference(tmp_path / "bad.h5ad")


def _tiny(values: np.ndarray) -> ad.AnnData:
    n_cells, n_genes = values.shape
    return ad.AnnData(
        sp.csr_matrix(values),
        obs=pd.DataFrame({"donor": ["a", "b"] * (n_cells // 2)}, index=[f"c{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )


@pytest.mark.parametrize("normalize", [True, False])
def test_all_zero_matrix_is_named(normalize):
    data = _tiny(np.zeros((60, 30)))
    with pytest.raises(
        ValueError, match=r"expression matrix \(60 cells x 30 genes, read from X\) has no nonzero value"
    ):
        sd.build_reference(data, "donor", normalize=normalize, n_hvg=10, n_pcs=3, n_clusters=2)


def test_constant_matrix_is_named():
    data = _tiny(np.ones((60, 30)))
    with pytest.raises(ValueError, match="genes with a nonzero variance in a group of cells all have the same mean"):
        sd.build_reference(data, "donor", n_hvg=10, n_pcs=3, n_clusters=2)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"sigma": 0}, r"sigma=0: the soft k-means entropy regularization must be a finite number greater than 0"),
        ({"theta": -1.0}, r"theta=-1.0: the diversity penalty must be a finite number at least 0"),
        ({"tau": -0.5}, r"tau=-0.5: the small-batch discount of the penalty must be a finite number at least 0"),
        ({"lamb": [1.0, -1.0]}, r"lamb=\[1.0, -1.0\]: the ridge penalty must be a finite number at least 0"),
        ({"theta": [1.0, 2.0, 3.0]}, r"the diversity penalty takes one value or one per batch key \(2\), got 3"),
        ({"block_size": 0}, r"block_size=0: the fraction of cells updated together must be a finite number greater"),
        ({"max_iter_harmony": 0}, r"max_iter_harmony=0: the most Harmony iterations must be a finite whole number"),
        ({"n_init": 2.5}, r"n_init=2.5: the number of k-means starts must be a finite whole number at least 1"),
        ({"epsilon_harmony": np.nan}, r"epsilon_harmony=nan: the relative tolerance of Harmony's objective must be"),
        ({"sigma": "small"}, r"sigma='small': the soft k-means entropy regularization must be a number"),
    ],
)
def test_harmony_settings_out_of_range(split, setting, message):
    error = TypeError if isinstance(next(iter(setting.values())), str) else ValueError
    z = np.random.default_rng(0).normal(size=(60, 3))
    meta = pd.DataFrame({"donor": ["a", "b", "c"] * 20, "chemistry": ["x", "y"] * 30})
    with pytest.raises(error, match=message):
        sd.harmonize(z, meta, ["donor", "chemistry"], n_clusters=3, **setting)
    ref_cells, _ = split
    ref_cells.obs["chemistry"] = ref_cells.obs["donor"]
    with pytest.raises(error, match=message):  # before any pass over the data
        sd.build_reference(ref_cells, ["donor", "chemistry"], **{**R_BUILD, **setting})


def test_harmony_settings_are_spelled_as_flags_on_the_command_line(split):
    ref_cells, _ = split
    with command_line_spelling(), pytest.raises(ValueError, match=r"^--theta -1.0: the diversity penalty must be"):
        sd.build_reference(ref_cells, "donor", **{**R_BUILD, "theta": -1.0})


def test_per_cell_batch_key_is_refused(split, built_reference):
    ref_cells, query = split
    message = r"batch key 'nUMI' has {:,} distinct values over {:,} cells in {} \(int64 values.*must name groups"
    with pytest.raises(ValueError, match=message.format(ref_cells.obs["nUMI"].nunique(), 910, "obs")):
        sd.build_reference(ref_cells, ["donor", "nUMI"], **R_BUILD)
    with pytest.raises(ValueError, match=r"hvg_batch_key 'nUMI' has .* distinct values"):
        sd.build_reference(ref_cells, "donor", **{**R_BUILD, "hvg_batch_key": "nUMI"})
    with pytest.raises(ValueError, match=message.format(query.obs["nUMI"].nunique(), 290, "the query's obs")):
        sd.map_query(built_reference, query, "nUMI", normalize=False)
    z = np.random.default_rng(0).normal(size=(300, 3))
    with pytest.raises(ValueError, match=r"batch key 'score' has 300 distinct values over 300 cells in meta \(float64"):
        sd.harmonize(z, pd.DataFrame({"score": np.linspace(0, 1, 300)}), "score")
    pairs = pd.DataFrame({"score": np.repeat(np.linspace(0, 1, 150), 2)})  # 150 values of two cells each: groups
    sd.harmonize(z, pairs, "score", n_clusters=3, max_iter_harmony=1)


def test_batch_values_that_read_the_same_are_refused(split, built_reference):
    ref_cells, query = split
    query.obs["donor"] = pd.Series([1, "1"] * (query.n_obs // 2), index=query.obs_names, dtype=object)
    message = (
        r"batch key 'donor' in {} holds values of different types that read the same as text, 1 \(number\) "
        r"and '1' \(text\), which would be merged"
    )
    with pytest.raises(ValueError, match=message.format("the query's obs")):
        sd.map_query(built_reference, query, "donor", normalize=False)
    ref_cells.obs["donor"] = pd.Categorical(ref_cells.obs["donor"].map({"3pv2": 1, "5p": "1"}).to_numpy())
    with pytest.raises(ValueError, match=message.format("obs")):
        sd.build_reference(ref_cells, "donor", **R_BUILD)
