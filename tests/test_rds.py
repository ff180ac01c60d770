"""R Symphony references read from their .rds files map queries as R does."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import DATA

import symphony_dask as sd

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
