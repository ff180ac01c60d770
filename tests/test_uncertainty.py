"""Annotations that say when they do not know (issue #27): label probabilities, novelty and Unknown,
votes per query cluster, label levels, on the command line too; and the evaluation on real data with
one cell type left out of the reference.

The evaluation (``test_a_cell_type_left_out_of_the_reference_is_called_unknown``) prints one row per
case; run ``pytest tests/test_uncertainty.py -n 0 -s -k left_out`` to see the table.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.stats
from _helpers import DATA, R_BUILD
from scipy.cluster.hierarchy import fcluster, linkage

import symphony_dask as sd
from symphony_dask._embedding.neighbors import NeighborIndex
from symphony_dask._mapping.annotate import UNKNOWN
from symphony_dask._mapping.votes import cell_keys, majority_vote
from symphony_dask.cli.main import main

#: The goals of issue #27 for every held-out cell type.
GOAL_AUROC = 0.97
GOAL_HELD_OUT_UNKNOWN = 0.80
GOAL_OTHERS_UNKNOWN = 0.05
GOAL_ACCURACY_DROP = 0.01


def citeseq_cell_types(cite: ad.AnnData) -> pd.Categorical:
    """Cell types of the CITE-seq PBMCs gated on their surface proteins (log1p ADT counts), not on RNA.

    Monocytes: CD11b >= 4.5 and CD11c >= 3.5 (32 cells); B cells: CD19 >= 3.5 and HLA-DR >= 3.5 (17);
    the other cells, T and NK cells, split by CD4 against CD8 (151 T_CD4, 300 T_CD8_NK).
    """
    p = cite.obsm["protein"]
    types = np.where(p["CD4"] > p["CD8"], "T_CD4", "T_CD8_NK").astype(object)
    mono = ((p["CD11b"] >= 4.5) & (p["CD11c"] >= 3.5)).to_numpy()
    b = ((p["CD19"] >= 3.5) & (p["MHCII (HLA-DR)"] >= 3.5)).to_numpy() & ~mono
    types[mono], types[b] = "Mono", "B"
    return pd.Categorical(types)


@dataclass
class HeldOut:
    """A reference built without one cell type, and a query mapped onto it that holds that type."""

    reference: sd.Reference
    query: ad.AnnData
    key: str
    held_out: str

    @property
    def is_held_out(self) -> np.ndarray:
        return (self.query.obs[self.key] == self.held_out).to_numpy()


def _pbmc_without(pbmcs, oracle, cell_type: str) -> HeldOut:
    """The oracle's split (reference 3'v2 + 5', query 3'v1) with R's parameters, ``cell_type`` left out."""
    cells = pbmcs[oracle.ref_cells]
    kept = cells[(cells.obs["cell_type"] != cell_type).to_numpy()].copy()
    reference = sd.build_reference(kept, "donor", **R_BUILD)
    query = sd.map_query(reference, pbmcs[oracle.query_cells].copy(), "donor", normalize=False)
    return HeldOut(reference, query, "cell_type", cell_type)


@pytest.fixture(scope="module")
def pbmc_without_b(pbmcs, oracle) -> HeldOut:
    return _pbmc_without(pbmcs, oracle, "B")


@pytest.fixture(scope="module")
def pbmc_without_nk(pbmcs, oracle) -> HeldOut:
    return _pbmc_without(pbmcs, oracle, "NK")


@pytest.fixture(scope="module")
def citeseq_without_mono() -> HeldOut:
    """CITE-seq PBMCs: reference = a seeded 60 % of the cells without the monocytes; query = the rest."""
    cite = ad.read_h5ad(DATA / "citeseq" / "citeseq_lognorm_3000.h5ad")
    cite.obs["cell_type"] = citeseq_cell_types(cite)
    in_reference = (np.random.default_rng(1).random(cite.n_obs) < 0.6) & (cite.obs["cell_type"] != "Mono").to_numpy()
    reference = sd.build_reference(cite[in_reference].copy(), normalize=False, n_hvg=1500, n_pcs=20, n_clusters=10)
    query = sd.map_query(reference, cite[~in_reference].copy(), normalize=False)
    return HeldOut(reference, query, "cell_type", "Mono")


def auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the ``positive`` cells (Mann-Whitney; ties count half)."""
    ranks = scipy.stats.rankdata(scores)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate_held_out(case: HeldOut) -> dict:
    """AUROC of the novelty for the held-out cells; shares called Unknown; accuracy on the other cells."""
    key, held = case.key, case.is_held_out
    truth = case.query.obs[key].astype(str).to_numpy()
    plain = sd.transfer_labels(case.reference, case.query.copy(), key).obs[f"{key}_pred"].astype(str).to_numpy()
    query = sd.transfer_labels(case.reference, case.query.copy(), key, unknown="auto")
    predicted = query.obs[f"{key}_pred"].astype(str).to_numpy()
    unknown = predicted == UNKNOWN
    others = ~held
    clusters = fcluster(linkage(query.obsm["X_symphony"], "ward"), 12, "maxclust").astype(str)
    query.obs["ward12"] = pd.Categorical(clusters)
    voted = sd.transfer_labels(case.reference, query.copy(), key, unknown="auto", majority_vote="ward12")
    voted_unknown = (voted.obs[f"{key}_pred"] == UNKNOWN).to_numpy()
    return {
        "auroc": auroc(held, query.obs[f"{key}_novelty"].to_numpy()),
        "held_out_unknown": float(unknown[held].mean()),
        "others_unknown": float(unknown[others].mean()),
        "accuracy_plain": float((plain[others] == truth[others]).mean()),
        "accuracy_assigned": float((predicted[others & ~unknown] == truth[others & ~unknown]).mean()),
        "accuracy_unknown_wrong": float((predicted[others] == truth[others]).mean()),
        "threshold": query.uns["symphony"][f"{key}_unknown"]["threshold"],
        "n_held_out": int(held.sum()),
        "n_others": int(others.sum()),
        "cluster_vote_held_out_unknown": float(voted_unknown[held].mean()),
        "cluster_vote_others_unknown": float(voted_unknown[others].mean()),
    }


_NK_SHORT = (
    "goal not met: 13 of the 17 held-out NK cells (0.76 < 0.80) are called Unknown with unknown='auto' (3.3 % of "
    "the others): NK cells lie next to CD8 T cells in the corrected embedding (AUROC 0.972), and even a "
    "threshold set on the query itself calls only 0.88 of them Unknown at 5 % of the others"
)
_B_OTHERS = (
    "goal not met by one cell: 13 of the 251 other cells (5.2 % > 5 %) are called Unknown with unknown='auto' "
    "(7 of the 17 NK cells, sparse in the reference, and the rare MK, HSC and DC cells); every B cell is called "
    "Unknown and the AUROC is 0.996"
)


#: Not strict: both cases miss a goal by one cell, which a platform's last bits could move (XPASS then).
@pytest.mark.parametrize(
    "case",
    [
        pytest.param("pbmc_without_b", marks=pytest.mark.xfail(reason=_B_OTHERS)),
        pytest.param("pbmc_without_nk", marks=pytest.mark.xfail(reason=_NK_SHORT)),
        "citeseq_without_mono",
    ],
)
def test_a_cell_type_left_out_of_the_reference_is_called_unknown(case, request):
    """Issue #27's evaluation: for each held-out type, AUROC >= 0.97; with ``unknown='auto'`` >= 80 % of
    the held-out cells Unknown and <= 5 % of the others; accuracy on the others that keep a label within
    0.01 of the plain vote's on all others (the accuracy counting Unknown as wrong is printed beside it)."""
    held_out = request.getfixturevalue(case)
    result = evaluate_held_out(held_out)
    print(
        f"\n{case}: {result['n_held_out']} held-out {held_out.held_out} cells, {result['n_others']} others; "
        f"AUROC {result['auroc']:.3f}; Unknown: held-out {result['held_out_unknown']:.2f}, others "
        f"{result['others_unknown']:.3f} (threshold {result['threshold']:.3g}); accuracy on the others: plain "
        f"{result['accuracy_plain']:.3f}, labeled ones {result['accuracy_assigned']:.3f}, Unknown as wrong "
        f"{result['accuracy_unknown_wrong']:.3f}; with a vote per Ward cluster (12): held-out Unknown "
        f"{result['cluster_vote_held_out_unknown']:.2f}, others {result['cluster_vote_others_unknown']:.3f}"
    )
    assert result["auroc"] >= GOAL_AUROC
    assert result["held_out_unknown"] >= GOAL_HELD_OUT_UNKNOWN
    assert result["others_unknown"] <= GOAL_OTHERS_UNKNOWN
    assert result["accuracy_assigned"] >= result["accuracy_plain"] - GOAL_ACCURACY_DROP


def test_auroc_goal_is_met_for_every_held_out_type(pbmc_without_b, pbmc_without_nk, citeseq_without_mono):
    """The novelty ranks the held-out cells above the others in every case (AUROC >= 0.97), where the
    vote's confidence does not."""
    for case in (pbmc_without_b, pbmc_without_nk, citeseq_without_mono):
        query = sd.transfer_labels(case.reference, case.query.copy(), case.key, novelty=True)
        novelty = query.obs[f"{case.key}_novelty"].to_numpy()
        assert auroc(case.is_held_out, novelty) >= GOAL_AUROC
        assert auroc(case.is_held_out, 1 - query.obs[f"{case.key}_conf"].to_numpy()) < 0.97


def test_probabilities_sum_to_one_and_the_winner_is_the_most_probable(pbmc_without_b):
    reference, mapped = pbmc_without_b.reference, pbmc_without_b.query
    for weights in ("uniform", "distance"):
        query = sd.transfer_labels(reference, mapped.copy(), "cell_type", weights=weights)
        proba = query.obsm["cell_type_proba"]
        assert list(proba.columns) == list(pd.Categorical(reference.obs["cell_type"]).categories)
        assert list(proba.index) == list(query.obs_names)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(query.obs["cell_type_conf"], proba.max(axis=1))
        winners = proba.to_numpy() == proba.max(axis=1).to_numpy()[:, None]
        column = proba.columns.get_indexer(query.obs["cell_type_pred"].astype(str))
        assert winners[np.arange(len(column)), column].all()
    query = sd.transfer_labels(reference, mapped.copy(), "cell_type", unknown="auto", weights="distance")
    proba = query.obsm["cell_type_proba"]
    assert proba.columns[-1] == UNKNOWN
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    unknown = (query.obs["cell_type_pred"] == UNKNOWN).to_numpy()
    assert unknown.sum() >= 39
    np.testing.assert_array_equal(proba[UNKNOWN].to_numpy(), unknown.astype(float))


def test_defaults_keep_the_plain_vote(pbmc_without_b):
    """Uniform weights are R Symphony's vote: the same labels and confidences, ties broken as before; the
    labels of the cells not called Unknown do not change with ``unknown``."""
    reference, mapped = pbmc_without_b.reference, pbmc_without_b.query
    labels = pd.Categorical(reference.obs["cell_type"])
    for k in (4, 5):
        neighbors = reference.neighbor_index().query(mapped.obsm["X_symphony"], k)
        winner, votes = majority_vote(
            labels.codes[neighbors], len(labels.categories), cell_keys=cell_keys(mapped.obs_names)
        )
        query = sd.transfer_labels(reference, mapped.copy(), "cell_type", k=k)
        np.testing.assert_array_equal(query.obs["cell_type_pred"].cat.codes, winner)
        np.testing.assert_array_equal(query.obs["cell_type_conf"], votes / k)
        assert "cell_type_novelty" not in query.obs and "cell_type_unknown" not in query.uns["symphony"]
    called = sd.transfer_labels(reference, mapped.copy(), "cell_type", unknown="auto").obs["cell_type_pred"]
    kept = (called != UNKNOWN).to_numpy()
    plain = sd.transfer_labels(reference, mapped.copy(), "cell_type").obs["cell_type_pred"]
    assert list(called[kept].astype(str)) == list(plain[kept].astype(str))


def test_auto_threshold_is_recorded_and_a_number_is_the_threshold(pbmc_without_b):
    reference, mapped = pbmc_without_b.reference, pbmc_without_b.query
    query = sd.transfer_labels(reference, mapped.copy(), "cell_type", unknown="auto")
    record = query.uns["symphony"]["cell_type_unknown"]
    assert record["method"] == "auto" and record["quantile"] == 0.95 and record["novelty_k"] == 20
    assert record["n_calibration_cells"] == reference.n_cells
    novelty = query.obs["cell_type_novelty"].to_numpy()
    assert record["n_unknown"] == int((novelty > record["threshold"]).sum())
    given = sd.transfer_labels(reference, mapped.copy(), "cell_type", unknown=record["threshold"])
    assert given.uns["symphony"]["cell_type_unknown"]["method"] == "given"
    pd.testing.assert_series_equal(given.obs["cell_type_pred"], query.obs["cell_type_pred"])
    stricter = sd.transfer_labels(reference, mapped.copy(), "cell_type", unknown="auto", unknown_quantile=0.99)
    assert stricter.uns["symphony"]["cell_type_unknown"]["threshold"] > record["threshold"]
    assert (stricter.obs["cell_type_pred"] == UNKNOWN).sum() < record["n_unknown"]


def test_results_do_not_depend_on_the_cells_transferred_together(pbmc_without_b, pbmcs, oracle):
    """Probabilities, novelty and labels of a cell are functions of the cell alone: the query's halves
    get what the whole query gets, bit for bit; a query mapped in chunks gets the same labels."""
    reference, mapped = pbmc_without_b.reference, pbmc_without_b.query
    options = dict(k=4, weights="distance", unknown="auto")
    whole = sd.transfer_labels(reference, mapped.copy(), "cell_type", **options)
    halves = [
        sd.transfer_labels(reference, mapped[rows].copy(), "cell_type", **options)
        for rows in (slice(0, 150), slice(150, None))
    ]
    for name in ("cell_type_pred", "cell_type_conf", "cell_type_novelty"):
        np.testing.assert_array_equal(
            np.concatenate([h.obs[name].astype(str if name.endswith("pred") else float) for h in halves]),
            whole.obs[name].astype(str if name.endswith("pred") else float).to_numpy(),
        )
    np.testing.assert_array_equal(np.vstack([h.obsm["cell_type_proba"] for h in halves]), whole.obsm["cell_type_proba"])
    chunked = sd.map_query(reference, pbmcs[oracle.query_cells].copy(), "donor", normalize=False, chunk_size=50)
    chunked = sd.transfer_labels(reference, chunked, "cell_type", **options)
    assert list(chunked.obs["cell_type_pred"].astype(str)) == list(whole.obs["cell_type_pred"].astype(str))
    np.testing.assert_allclose(chunked.obs["cell_type_novelty"], whole.obs["cell_type_novelty"], rtol=1e-9)


def test_concurrent_transfers_with_auto_threshold_agree(split):
    """Threads transferring with ``unknown='auto'`` onto a fresh reference get what one thread gets."""
    reference = sd.build_reference(split[0], "donor", **R_BUILD)
    mapped = sd.map_query(reference, split[1], "donor", normalize=False)
    expected = sd.transfer_labels(reference, mapped.copy(), "cell_type", unknown="auto")
    fresh = sd.Reference.from_arrays(
        reference.genes,
        reference.mean,
        reference.std,
        reference.loadings,
        reference.centroids,
        reference.cluster_sizes,
        reference.compression,
        embedding=reference.embedding,
        obs=reference.obs,
        params=reference.params,
    )
    start = threading.Barrier(4)

    def transfer(_) -> ad.AnnData:
        start.wait()
        return sd.transfer_labels(fresh, mapped.copy(), "cell_type", unknown="auto")

    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(transfer, range(4)))
    for run in runs:
        pd.testing.assert_series_equal(run.obs["cell_type_pred"], expected.obs["cell_type_pred"])
        assert run.uns["symphony"]["cell_type_unknown"] == expected.uns["symphony"]["cell_type_unknown"]


@pytest.mark.slow
@pytest.mark.cluster
def test_query_mapped_on_workers_gets_the_same_annotations(pbmc_without_b, pbmcs, oracle, tmp_path, local_cluster):
    reference = pbmc_without_b.reference
    options = dict(weights="distance", unknown="auto")
    expected = sd.transfer_labels(reference, pbmc_without_b.query.copy(), "cell_type", **options)
    query = pbmcs[oracle.query_cells].copy()
    for i, rows in enumerate(np.array_split(np.arange(query.n_obs), 3)):
        query[rows].write_h5ad(tmp_path / f"shard_{i}.h5ad")
    cluster, client = local_cluster(n_workers=2)
    with cluster, client:
        sharded = sd.map_query(reference, str(tmp_path / "shard_*.h5ad"), "donor", normalize=False, chunk_size=40)
    sharded = sd.transfer_labels(reference, sharded, "cell_type", **options)
    assert list(sharded.obs["cell_type_pred"].astype(str)) == list(expected.obs["cell_type_pred"].astype(str))
    np.testing.assert_allclose(sharded.obs["cell_type_novelty"], expected.obs["cell_type_novelty"], rtol=1e-9)
    np.testing.assert_allclose(sharded.obsm["cell_type_proba"], expected.obsm["cell_type_proba"], atol=1e-12)


def test_majority_vote_per_query_cluster(pbmc_without_b, caplog):
    reference, mapped = pbmc_without_b.reference, pbmc_without_b.query.copy()
    clusters = mapped.obs["cell_type"].astype(str).to_numpy().copy()
    for label, n in (("T_CD4", 20), ("Mono_CD14", 15), ("T_CD8", 10)):
        clusters[np.flatnonzero(clusters == label)[:n]] = "mixed"  # no label with half of the cells: split
    mapped.obs["clusters"] = pd.Categorical(clusters)
    with caplog.at_level(logging.WARNING, logger="symphony_dask"):
        query = sd.transfer_labels(reference, mapped, "cell_type", unknown="auto", majority_vote="clusters")
    per_cell = query.obs["cell_type_pred_cell"]
    voted = query.obs["cell_type_pred"]
    record = query.uns["symphony"]["cell_type_majority_vote"]
    assert record["column"] == "clusters" and record["min_share"] == 0.5
    table = pd.DataFrame({k: record[k] for k in ("clusters", "labels", "shares", "n_cells")}).set_index("clusters")
    for cluster, row in table.iterrows():
        cells = (mapped.obs["clusters"] == cluster).to_numpy()
        assert (voted[cells] == row["labels"]).all() and row["n_cells"] == cells.sum()
        assert row["shares"] == pytest.approx((per_cell[cells] == row["labels"]).mean())
        assert (per_cell[cells] == row["labels"]).sum() == per_cell[cells].value_counts().max()  # ties: seeded
    assert table.loc["B", "labels"] == UNKNOWN  # the held-out type: a cluster of Unknown cells
    assert "mixed" in record["split"] and table.loc["mixed", "shares"] < 0.5
    assert set(record["split"]) == set(table.index[table["shares"] < 0.5])
    assert "split" in caplog.text and "mixed (" in caplog.text


def test_label_levels_share_one_search_and_stay_consistent(pbmcs, oracle, built_reference, monkeypatch):
    """``cell_type_broad`` (7 labels) above ``cell_type`` (9): one neighbor search for both; with
    ``hierarchy=True`` every predicted pair is one the reference holds."""
    mapped = sd.map_query(built_reference, pbmcs[oracle.query_cells].copy(), "donor", normalize=False)
    searches = []
    original = NeighborIndex.query
    monkeypatch.setattr(NeighborIndex, "query", lambda self, x, k: searches.append(k) or original(self, x, k))
    levels = ["cell_type_broad", "cell_type"]
    query = sd.transfer_labels(built_reference, mapped.copy(), levels, hierarchy=True, weights="distance")
    assert searches == [5]
    pairs = set(zip(built_reference.obs["cell_type_broad"], built_reference.obs["cell_type"], strict=True))
    predicted = set(zip(query.obs["cell_type_broad_pred"], query.obs["cell_type_pred"], strict=True))
    assert predicted <= pairs
    np.testing.assert_allclose(query.obsm["cell_type_proba"].sum(axis=1), 1.0, atol=1e-12)
    alone = sd.transfer_labels(built_reference, mapped.copy(), "cell_type", weights="distance").obs["cell_type_pred"]
    accuracy = (query.obs["cell_type_pred"] == query.obs["cell_type"]).mean()
    assert accuracy >= (alone == query.obs["cell_type"]).mean() - 0.01


def test_unknown_is_drawn_gray(pbmc_without_b):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from symphony_dask import pl

    query = sd.transfer_labels(pbmc_without_b.reference, pbmc_without_b.query.copy(), "cell_type", unknown="auto")
    ax = pl.mapping(pbmc_without_b.reference, query, color="cell_type_pred")
    try:
        legend = ax.get_legend()
        handles = dict(zip([t.get_text() for t in legend.get_texts()], legend.legend_handles, strict=True))
        assert matplotlib.colors.to_rgba(handles[UNKNOWN].get_color()) == pl.UNKNOWN_COLOR
        faces = [tuple(c.get_facecolor()[0]) for c in ax.collections if len(c.get_facecolor()) == 1]
        assert pl.UNKNOWN_COLOR in faces
    finally:
        plt.close(ax.figure)


def test_map_command_with_unknown_cluster_votes_and_distance_weights(pbmc_without_b, split, tmp_path, capsys):
    reference = pbmc_without_b.reference
    slashed = reference.obs["cell_type"].astype(str).str.replace("_", "/")  # Mono/CD14: no name in a store
    dataclasses.replace(reference, obs=reference.obs.assign(slashed=slashed)).save(tmp_path / "ref.zarr")
    query = split[1]
    query.obs["clusters"] = query.obs["cell_type"].astype(str)
    query.write_h5ad(tmp_path / "query.h5ad")
    common = ["map", "--reference", str(tmp_path / "ref.zarr"), "--query", str(tmp_path / "query.h5ad")]
    code = main(
        [
            *common,
            "--batch-key",
            "donor",
            "--no-normalize",
            "--transfer",
            "cell_type",
            "--transfer",
            "slashed",
            "--unknown",
            "auto",
            "--label-weights",
            "distance",
            "--majority-vote",
            "clusters",
            "--out",
            str(tmp_path / "mapped.zarr"),
            "-q",
        ]
    )
    assert code == 0
    out, err = capsys.readouterr()
    written = ad.read_zarr(tmp_path / "mapped.zarr")
    n_unknown = int((written.obs["cell_type_pred"] == UNKNOWN).sum())
    assert n_unknown >= 39  # the B cells' cluster, and those of the rare MK and HSC cells
    summary = next(line for line in out.splitlines() if line.startswith("cell_type_pred:"))
    assert f"Unknown {n_unknown}" in summary and f"(Unknown: {n_unknown} of 290 cells, novelty above" in summary
    proba = written.obsm["cell_type_proba"]
    assert proba.columns[-1] == UNKNOWN and np.allclose(proba.sum(axis=1), 1.0)
    assert {"cell_type_novelty", "cell_type_pred_cell", "cell_type_conf"} <= set(written.obs.columns)
    assert written.uns["symphony"]["cell_type_unknown"]["method"] == "auto"
    assert "B" in list(written.uns["symphony"]["cell_type_majority_vote"]["clusters"])
    assert "labels of slashed hold '/'" in err  # written as an array, the labels beside it
    assert isinstance(written.obsm["slashed_proba"], np.ndarray)
    assert list(written.uns["symphony"]["slashed_proba_labels"]) == [c.replace("_", "/") for c in proba.columns]
    np.testing.assert_array_equal(written.obsm["slashed_proba"], proba.to_numpy())

    out = ["--out", str(tmp_path / "other.h5ad"), "-q"]
    for extra, message in [
        (["--unknown", "auto"], "--unknown applies to --transfer"),
        (["--majority-vote", "clusters"], "--majority-vote applies to --transfer"),
        (["--transfer", "cell_type", "--majority-vote", "leiden"], "--majority-vote leiden is not a column"),
    ]:
        assert main([*common, *extra, *out]) == 2
        assert message in capsys.readouterr().err
    for extra, message in [
        (["--transfer", "cell_type", "--unknown", "often"], "'auto' or a number"),
        (["--transfer", "cell_type", "--label-weights", "cosine"], "invalid choice: 'cosine'"),
    ]:
        with pytest.raises(SystemExit):
            main([*common, *extra, *out])
        assert message in capsys.readouterr().err


def test_bad_options(pbmc_without_b):
    reference, mapped = pbmc_without_b.reference, pbmc_without_b.query
    cases = [
        (dict(unknown="sometimes"), "unknown='sometimes': 'auto', a novelty threshold"),
        (dict(weights="cosine"), "weights='cosine': 'uniform' or 'distance'"),
        (dict(majority_vote="leiden"), "majority_vote='leiden' is not a column of the query obs"),
        (dict(hierarchy=True), "hierarchy=True needs two or more keys"),
        (dict(unknown="auto", unknown_quantile=1.5), "unknown_quantile=1.5: between 0 and 1"),
        (dict(novelty=True, novelty_k=5000), "novelty_k=5000: between 1 and the reference's"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            sd.transfer_labels(reference, mapped.copy(), "cell_type", **options)
    renamed = pbmc_without_b.reference.obs["cell_type"].astype(str).replace("NK", UNKNOWN)
    reference.obs["renamed"] = renamed
    try:
        with pytest.raises(ValueError, match="has a label 'Unknown'"):
            sd.transfer_labels(reference, mapped.copy(), "renamed", unknown="auto")
    finally:
        del reference.obs["renamed"]
