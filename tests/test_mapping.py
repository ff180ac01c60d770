"""Mapping at any size: shards, per-batch mapping, gene keys, annotation transfer, mapping metrics."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _helpers import DATA, from_elements, oracle_reference

import symphony_dask as sd
from symphony_dask._reference.compression import compression_sums

TOL = 1e-10


@pytest.fixture(scope="module")
def r_reference_with_moments(pbmcs, oracle):
    """R's reference elements, with the per-cluster moments of R's pre-Harmony PCs and R's R."""
    z = oracle.per_cell("ref_Z_orig", oracle.ref_cells)
    z_corr = oracle.per_cell("ref_Z_corr", oracle.ref_cells)
    sums = compression_sums(z, z_corr, oracle.per_cell("ref_R", oracle.ref_cells))
    return oracle_reference(oracle, pbmcs, pca_moments=sums.pca_moments)


def test_mapping_metrics_reproduce_r(r_reference_with_moments, pbmcs, oracle):
    query = sd.map_query(r_reference_with_moments, pbmcs[oracle.query_cells].copy(), "donor", normalize=False)
    r_pred = oracle.table("query_predictions", index_col=0).loc[oracle.query_cells]
    per_cell = sd.per_cell_mapping_metric(r_reference_with_moments, query)
    assert np.abs(per_cell.to_numpy() - r_pred["per_cell_mapping_metric"].to_numpy()).max() <= 1e-6
    per_cluster = sd.per_cluster_mapping_metric(r_reference_with_moments, query, "cell_type")
    expected = oracle.table("per_cluster_mapping_metric").set_index("query_cluster")["distance_score"]
    got = per_cluster.set_index("query_cluster")["distance_score"].loc[expected.index]
    assert (got.isna() == expected.isna()).all() and got.isna().sum() == 6  # clusters under 2 x 20 cells
    assert np.abs(got - expected).max() <= 1e-6


@pytest.mark.slow
@pytest.mark.cluster
def test_sharded_query_equals_in_memory(built_reference, pbmcs, oracle, tmp_path, local_cluster):
    query = pbmcs[oracle.query_cells].copy()
    expected = sd.map_query(built_reference, query.copy(), "donor", normalize=False)
    paths = []
    for i, rows in enumerate(np.array_split(np.arange(query.n_obs), 3)):
        paths.append(tmp_path / f"shard_{i}.h5ad")
        query[rows].write_h5ad(paths[-1])
    cluster, client = local_cluster(n_workers=2)
    with cluster, client:
        sharded = sd.map_query(built_reference, str(tmp_path / "shard_*.h5ad"), "donor", normalize=False, chunk_size=50)
    assert list(sharded.obs["symphony_shard"].unique()) == [0, 1, 2]
    for key in ("X_symphony", "X_symphony_pca", "X_symphony_R"):
        assert np.abs(sharded.obsm[key] - expected.obsm[key]).max() <= TOL


def test_per_batch_equals_mapping_each_batch_alone(pbmcs):
    ref = sd.build_reference(pbmcs[pbmcs.obs["donor"] == "3pv2"].copy(), normalize=False, n_hvg=1000, n_clusters=16)
    query = pbmcs[pbmcs.obs["donor"] != "3pv2"].copy()
    together = sd.map_query(ref, query.copy(), "donor", normalize=False)
    alone = sd.map_query(ref, query.copy(), "donor", normalize=False, per_batch=True)
    for donor in ("3pv1", "5p"):
        cells = (query.obs["donor"] == donor).to_numpy()
        single = sd.map_query(ref, query[cells].copy(), "donor", normalize=False)
        assert np.abs(alone.obsm["X_symphony"][cells] - single.obsm["X_symphony"]).max() <= TOL
        assert np.abs(together.obsm["X_symphony"][cells] - single.obsm["X_symphony"]).max() > 1e-6


@pytest.fixture(scope="module")
def hsmm():
    return ad.read_h5ad(DATA / "hsmm" / "hsmm_lognorm_1000.h5ad")


def test_pseudotime_transfer_with_genes_matched_by_symbol(hsmm):
    """Reference indexed by gene symbols, query by Ensembl IDs with symbols in var['gene_short_name']."""
    rng = np.random.default_rng(0)
    in_ref = rng.random(hsmm.n_obs) < 0.6
    reference_cells = hsmm[in_ref].copy()
    reference_cells.var_names = reference_cells.var["gene_short_name"].astype(str)
    ref = sd.build_reference(reference_cells, normalize=False, n_hvg=600, n_pcs=10, n_clusters=8)
    query = hsmm[~in_ref].copy()
    with pytest.raises(
        ValueError,
        match=r"shares no genes with the reference.*name the query var column that "
        r"holds the reference's gene names \(gene_key\)",
    ):
        sd.map_query(ref, query.copy(), normalize=False)
    mapped = sd.map_query(ref, query, normalize=False, gene_key="gene_short_name")
    assert mapped.uns["symphony"]["fraction_genes_found"] == 1.0
    sd.transfer_values(ref, mapped, "Pseudotime", k=5)
    r = np.corrcoef(mapped.obs["Pseudotime_pred"], mapped.obs["Pseudotime"])[0, 1]
    assert r >= 0.9  # observed 0.965


def test_protein_transfer(tmp_path):
    cite = ad.read_h5ad(DATA / "citeseq" / "citeseq_lognorm_3000.h5ad")
    in_ref = np.random.default_rng(1).random(cite.n_obs) < 0.6
    ref = sd.build_reference(cite[in_ref].copy(), normalize=False, n_hvg=1500, n_pcs=20, n_clusters=10)
    ref.save(tmp_path / "ref.zarr")
    ref = sd.load_reference(tmp_path / "ref.zarr")  # obsm['protein'] travels with the reference
    query = sd.map_query(ref, cite[~in_ref].copy(), normalize=False)
    sd.transfer_values(ref, query, "protein", k=10)
    predicted, observed = query.obsm["protein_pred"], query.obsm["protein"]
    assert list(predicted.columns) == list(observed.columns)
    per_protein = [np.corrcoef(predicted[c], observed[c])[0, 1] for c in observed.columns if observed[c].std() > 0.3]
    assert len(per_protein) == 47
    assert np.median(per_protein) >= 0.4  # observed 0.44 (0.43-0.47 over n_hvg 1000-2000, k 10-20)
    assert max(per_protein) >= 0.85  # observed: CD11b 0.87, HLA-DR 0.83, CD11c 0.83


def test_labels_with_hnsw_index_saved_with_the_reference(built_reference, pbmcs, oracle, tmp_path):
    query = sd.map_query(built_reference, pbmcs[oracle.query_cells].copy(), "donor", normalize=False)
    exact = sd.transfer_labels(built_reference, query.copy(), "cell_type").obs["cell_type_pred"]
    ref = from_elements(built_reference)
    index = ref.neighbor_index(method="hnsw", seed=3)
    ref.save(tmp_path / "ref.zarr")
    loaded = sd.load_reference(tmp_path / "ref.zarr")
    assert loaded.neighbors.method == "hnsw"
    emb = query.obsm["X_symphony"]
    np.testing.assert_array_equal(loaded.neighbors.query(emb, 5), index.query(emb, 5))
    approximate = sd.transfer_labels(loaded, query.copy(), "cell_type").obs["cell_type_pred"]
    assert (approximate == exact).mean() >= 0.99


def test_neighbor_index_built_with_the_reference_or_at_first_transfer(pbmcs, oracle, monkeypatch):
    monkeypatch.setattr("symphony_dask._reference.stages.EXACT_MAX_CELLS", 100)  # HNSW for this 910-cell reference
    monkeypatch.setattr("symphony_dask._embedding.neighbors.EXACT_MAX_CELLS", 100)
    data, query = pbmcs[oracle.ref_cells].copy(), pbmcs[oracle.query_cells].copy()
    with_index = sd.build_reference(data, "donor", normalize=False, n_hvg=1000, n_clusters=20)
    without = sd.build_reference(data, "donor", normalize=False, n_hvg=1000, n_clusters=20, neighbor_index=False)
    assert with_index.neighbors.method == "hnsw" and "neighbor_index" in with_index.params["timings_s"]
    assert without.neighbors is None and "neighbor_index" not in without.params["timings_s"]
    query = sd.map_query(without, query, "donor", normalize=False)
    sd.transfer_labels(without, query, "cell_type")
    assert without.neighbors.method == "hnsw"  # built at the first transfer, with the same seed and graph
    np.testing.assert_array_equal(
        without.neighbors.query(query.obsm["X_symphony"], 5), with_index.neighbors.query(query.obsm["X_symphony"], 5)
    )


def test_min_confidence_leaves_cells_unassigned(built_reference, pbmcs, oracle):
    query = sd.map_query(built_reference, pbmcs[oracle.query_cells].copy(), "donor", normalize=False)
    sd.transfer_labels(built_reference, query, "cell_type", min_confidence=0.7)
    low = query.obs["cell_type_conf"] < 0.7
    assert low.any() and (query.obs.loc[low, "cell_type_pred"] == "Unassigned").all()
    assert (query.obs.loc[~low, "cell_type_pred"] != "Unassigned").all()


def test_knn_corr():
    rng = np.random.default_rng(0)
    ref, query = rng.normal(size=(500, 5)), rng.normal(size=(40, 5))
    assert np.allclose(sd.knn_corr(ref, query, ref * 2.0, query * 2.0, k=50), 1.0)
    noisy = sd.knn_corr(ref, query, ref + rng.normal(size=ref.shape), query, k=50)
    assert 0 < noisy.mean() < 0.9
    assert np.allclose(sd.within_query_knn_corr(query, query + 1.0, k=10), 1.0)


def test_transfer_bad_input(built_reference, pbmcs, oracle):
    query = sd.map_query(built_reference, pbmcs[oracle.query_cells].copy(), "donor", normalize=False)
    with pytest.raises(ValueError, match="'cell_type' is not numeric; use transfer_labels"):
        sd.transfer_values(built_reference, query, "cell_type")
    with pytest.raises(ValueError, match="'height' is neither a column of the reference obs nor a reference obsm key"):
        sd.transfer_values(built_reference, query, "height")
    with pytest.raises(FileNotFoundError, match=r"no query shard matches '/nonexistent/shard_\*.h5ad'"):
        sd.map_query(built_reference, "/nonexistent/shard_*.h5ad")


def test_map_query_takes_the_path_of_a_reference_store(split, built_reference, tmp_path):
    """Data arguments take paths everywhere: so does the reference of map_query."""
    _, query = split
    built_reference.save(tmp_path / "ref.zarr")
    from_path = sd.map_query(str(tmp_path / "ref.zarr"), query.copy(), "donor", normalize=False)
    from_object = sd.map_query(built_reference, query.copy(), "donor", normalize=False)
    assert np.abs(from_path.obsm["X_symphony"] - from_object.obsm["X_symphony"]).max() <= 1e-12
    with pytest.raises(TypeError, match="reference must be a Reference or the path of a reference store, got dict"):
        sd.map_query({}, query, "donor", normalize=False)


def test_transfer_values_of_an_unknown_key_lists_obs_columns_and_obsm_keys(split, built_reference):
    _, query = split
    mapped = sd.map_query(built_reference, query.copy(), "donor", normalize=False)
    built_reference.obsm["protein"] = np.zeros((built_reference.n_cells, 3))
    try:
        with pytest.raises(
            ValueError,
            match=r"'proteins' is neither a column of the reference obs nor a reference "
            r"obsm key; the obs columns are: 'donor', .*; the obsm keys: 'protein'",
        ):
            sd.transfer_values(built_reference, mapped, "proteins")
    finally:
        del built_reference.obsm["protein"]


def test_a_cells_label_does_not_depend_on_the_cells_voted_with_it(built_reference, pbmcs, oracle):
    """Ties of the k-NN vote are broken by (seed, cell name, label): transferring to the query's
    halves gives each cell the label it gets in the whole query (with k=4, 2-2 ties are common)."""
    mapped = sd.map_query(built_reference, pbmcs[oracle.query_cells].copy(), "donor", normalize=False)
    whole = sd.transfer_labels(built_reference, mapped.copy(), "cell_type", k=4).obs["cell_type_pred"]
    halves = [
        sd.transfer_labels(built_reference, mapped[rows].copy(), "cell_type", k=4).obs["cell_type_pred"]
        for rows in (slice(0, 150), slice(150, None))
    ]
    votes = sd.transfer_labels(built_reference, mapped.copy(), "cell_type", k=4).obs["cell_type_conf"]
    assert (votes == 0.5).sum() >= 10  # there are ties to break
    assert list(pd.concat(halves).astype(str)) == list(whole.astype(str))
