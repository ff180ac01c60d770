"""R Symphony references read from their .rds files map queries as R does."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from _helpers import DATA

import symphony_dask as sd
from symphony_dask._reference import rds
from symphony_dask._reference.rds import _parse

RDS = DATA / "symphony_r_oracle_splitA_umap" / "ref.rds"


@pytest.fixture(scope="module")
def r_ref() -> sd.Reference:
    return sd.read_symphony_rds(RDS)


def test_elements_are_rs(r_ref, oracle):
    vg = oracle.vargenes
    assert list(r_ref.genes) == list(vg["symbol"])
    np.testing.assert_allclose(r_ref.mean, vg["mean"], rtol=1e-12)
    np.testing.assert_allclose(r_ref.loadings, oracle.matrix("loadings_U"), atol=1e-12)
    np.testing.assert_allclose(r_ref.centroids, oracle.matrix("centroids_Ycos"), atol=1e-12)
    np.testing.assert_allclose(r_ref.cluster_sizes, oracle.matrix("cache_Nr").ravel(), rtol=1e-12)
    np.testing.assert_allclose(r_ref.compression, oracle.matrix("cache_C"), atol=1e-12)
    assert list(r_ref.obs.index) == oracle.ref_cells and "cell_type" in r_ref.obs.columns
    ref_umap = pd.read_csv(DATA / "symphony_r_oracle_splitA_umap" / "ref_umap.csv.gz", index_col=0)
    np.testing.assert_allclose(r_ref.umap, ref_umap.loc[oracle.ref_cells].to_numpy(), atol=1e-12)  # CSV: 15 digits


def test_query_maps_as_in_r_and_lands_in_rs_umap(r_ref, pbmcs, oracle, tmp_path):
    query = pbmcs[oracle.query_cells].copy()
    mapped = sd.map_query(r_ref, query, "donor", normalize=False)
    assert np.abs(mapped.obsm["X_symphony"] - oracle.per_cell("query_Zq_corr", oracle.query_cells)).max() < 1e-10
    sd.transfer_labels(r_ref, mapped, "cell_type")
    assert (mapped.obs["cell_type_pred"].astype(str) == mapped.obs["cell_type"].astype(str)).mean() >= 0.9
    # our placement into R's own layout lands near R's umap_transform (median 0.19 on a 22-unit layout)
    r_query = pd.read_csv(DATA / "symphony_r_oracle_splitA_umap" / "query_umap.csv.gz", index_col=0)
    distance = np.linalg.norm(mapped.obsm["X_umap"] - r_query.loc[oracle.query_cells].to_numpy(), axis=1)
    assert np.median(distance) < 0.02 * np.ptp(r_ref.umap, axis=0).max()
    sd.per_cell_mapping_metric(r_ref, mapped)  # the moments of Z_orig came along
    r_ref.save(tmp_path / "from_r.zarr")
    assert sd.load_reference(tmp_path / "from_r.zarr").umap.shape == (910, 2)


def test_what_is_not_a_symphony_reference(tmp_path):
    (tmp_path / "junk.rds").write_bytes(b"not an rds file")
    with pytest.raises(ValueError, match="could not be read as an R object"):
        sd.read_symphony_rds(tmp_path / "junk.rds")
    with pytest.raises(FileNotFoundError, match="no such file"):
        sd.read_symphony_rds(tmp_path / "missing.rds")


@pytest.fixture(scope="module")
def r_elements() -> dict:
    """The elements of the R reference as rdata gives them."""
    return _parse(RDS)


def _transposed(name: str) -> Callable[[dict], dict]:
    """An edit of the elements that transposes element ``name``."""
    return lambda obj: {**obj, name: obj[name].T}


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda obj: {**obj, "vargenes": np.arange(5.0)},
            r"vargenes should be the variable genes, a data frame .*, found a numeric vector of length 5",
        ),
        (
            lambda obj: {**obj, "vargenes": obj["vargenes"].drop(columns="stddev")},
            r"vargenes should be .*, found a data frame of 1,360 rows with columns symbol \(text\), mean \(numeric\)$",
        ),
        (lambda obj: {**obj, "vargenes": obj["vargenes"].assign(mean="x")}, r"vargenes should .* mean \(text\)"),
        (
            _transposed("loadings"),
            r"loadings should be the gene loadings U, a numeric matrix of 1,360 rows x any .* found .* 20 x 1,360",
        ),
        (lambda obj: {**obj, "loadings": obj["loadings"].astype(str)}, r"loadings should .*found a text matrix"),
        (_transposed("centroids"), r"centroids should be the centroids Y_cos, a numeric matrix of 20 rows"),
        (
            lambda obj: {**obj, "cache": obj["cache"][:1]},
            r"cache should be an unnamed list of the compression terms N_r \(100 x 1\) and C \(100 x 20\), "
            r"found an unn",
        ),
        (lambda obj: {**obj, "cache": [obj["cache"][0][:5], obj["cache"][1]]}, r"cache\[\[1\]\] should be N_r"),
        (
            lambda obj: {**obj, "cache": [obj["cache"][0], obj["cache"][1].T]},
            r"cache\[\[2\]\] should be C, the compression terms, a numeric matrix of 100 rows x 20 columns",
        ),
        (_transposed("Z_corr"), r"Z_corr should be the corrected embedding, a numeric matrix of 20 rows"),
        (
            lambda obj: {**obj, "R": obj["R"][:5]},
            r"R should be the soft cluster assignments, a numeric matrix of 100 rows x 910 columns, found .* 5 x 910",
        ),
        (lambda obj: {**obj, "umap": {"embedding": np.zeros((910, 3))}}, r"umap\$embedding should be the UMAP"),
        (lambda obj: {**obj, "meta_data": obj["meta_data"].iloc[:5]}, r"meta_data should be the cells' metadata"),
    ],
    ids=[
        "vargenes vector",
        "vargenes columns",
        "vargenes text",
        "loadings shape",
        "loadings text",
        "centroids shape",
        "cache length",
        "N_r length",
        "C shape",
        "Z_corr shape",
        "R shape",
        "umap shape",
        "meta_data rows",
    ],
)
def test_wrong_r_elements_are_named(r_elements, monkeypatch, edit, message):
    monkeypatch.setattr(rds, "_parse", lambda path: edit(r_elements))
    prefix = "ref.rds is not an R Symphony reference as buildReference saves it: "
    with pytest.raises(ValueError, match=prefix + message):
        sd.read_symphony_rds(RDS)


def test_rds_of_a_plain_vector(monkeypatch):
    import rdata

    monkeypatch.setattr(rdata.conversion, "convert", lambda parsed: np.arange(3.0))
    with pytest.raises(ValueError, match=r"ref.rds holds a numeric vector of length 3, not the named list of an R Sym"):
        sd.read_symphony_rds(RDS)
