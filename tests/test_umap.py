"""The reference UMAP: fitted with R Symphony's settings, saved as arrays, queries placed into it."""

from __future__ import annotations

import pickle

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
from _helpers import build_argv, map_argv

import symphony_dask as sd
from symphony_dask import pl
from symphony_dask._embedding.umap_layout import fit_umap
from symphony_dask._mapping.votes import majority_vote
from symphony_dask.cli import main

matplotlib.use("Agg")
R_UMAP_ACCURACY = 0.917  # 5-NN accuracy of the query in R Symphony's 2-D UMAP (splitA_umap README)


def _knn_accuracy_2d(ref_xy: np.ndarray, ref_labels: pd.Series, query_xy: np.ndarray, truth: pd.Series) -> float:
    labels = pd.Categorical(ref_labels.astype(str))
    d2 = ((query_xy[:, None, :] - ref_xy[None, :, :]) ** 2).sum(axis=2)
    nearest = np.argsort(d2, axis=1, kind="stable")[:, :5]
    winner, _ = majority_vote(labels.codes[nearest], len(labels.categories))
    return float((labels.categories[winner].to_numpy() == truth.astype(str).to_numpy()).mean())


@pytest.fixture(scope="module")
def mapped(built_reference, pbmcs, oracle):
    return sd.map_query(built_reference, pbmcs[oracle.query_cells].copy(), "donor", normalize=False)


def test_query_in_the_2d_umap_is_as_accurate_as_r(built_reference, mapped):
    assert built_reference.umap.shape == (910, 2)
    assert built_reference.params["timings_s"]["umap"] > 0
    accuracy = _knn_accuracy_2d(
        built_reference.umap, built_reference.obs["cell_type"], mapped.obsm["X_umap"], mapped.obs["cell_type"]
    )
    print(f"5-NN accuracy in 2-D UMAP: {accuracy:.3f} (R Symphony: {R_UMAP_ACCURACY})")
    assert accuracy >= R_UMAP_ACCURACY - 0.03  # observed 0.924


def test_saved_and_loaded_reference_places_a_query_identically(built_reference, split, mapped, tmp_path, monkeypatch):
    """The model travels in the store as arrays; loading it unpickles nothing."""
    built_reference.save(tmp_path / "ref.zarr")

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    loaded = sd.load_reference(tmp_path / "ref.zarr")
    monkeypatch.undo()  # (dask's own tokenizing unpickles)
    again = sd.map_query(loaded, split[1].copy(), "donor", normalize=False)
    np.testing.assert_array_equal(loaded.umap, built_reference.umap)
    assert loaded.umap_layout.params == built_reference.umap_layout.params
    assert np.abs(again.obsm["X_umap"] - mapped.obsm["X_umap"]).max() <= 1e-6  # observed: identical


def test_in_memory_chunked_and_sharded_queries_land_on_the_same_coordinates(built_reference, split, mapped, tmp_path):
    """Each cell has its own random stream (seeded by its row in the query): chunks, shards and
    workers do not move it. The corrected embedding differs at round-off (1e-14) between these
    paths; placement computes in float32 as umap-learn does, so such differences could flip a last
    bit and move a cell by about 1e-6 of the layout's span: we allow 1e-4 (observed: identical)."""
    _, query = split
    chunked = sd.map_query(built_reference, query.copy(), "donor", normalize=False, chunk_size=60)
    for i, rows in enumerate(np.array_split(np.arange(query.n_obs), 3)):
        query[rows].write_h5ad(tmp_path / f"shard_{i}.h5ad")
    sharded = sd.map_query(built_reference, str(tmp_path / "shard_*.h5ad"), "donor", normalize=False)
    assert np.abs(chunked.obsm["X_umap"] - mapped.obsm["X_umap"]).max() <= 1e-4
    assert np.abs(sharded.obsm["X_umap"] - mapped.obsm["X_umap"]).max() <= 1e-4


def test_without_umap_nothing_is_placed(split):
    ref_cells, query = split
    ref = sd.build_reference(ref_cells, "donor", normalize=False, n_hvg=500, n_clusters=20, umap=False)
    assert ref.umap is None and "umap" not in ref.params["timings_s"]
    assert "X_umap" not in sd.map_query(ref, query.copy(), "donor", normalize=False).obsm
    minimal = sd.build_reference(ref_cells, "donor", normalize=False, n_hvg=500, n_clusters=20, keep_embedding=False)
    assert minimal.umap is None


@pytest.mark.parametrize("search", ["exact", "hnsw"])
def test_large_references_fit_on_a_subsample_and_place_the_rest(built_reference, search, monkeypatch):
    """Above the fit cap the other reference cells are placed like query cells: they land among the
    fitted cells of their own type, and chunks do not move them (also with an HNSW search, which
    large fitted sets use)."""
    import symphony_dask._embedding.umap_layout as layout

    monkeypatch.setattr(layout, "EXACT_SEARCH_MAX", 5_000 if search == "exact" else 100)
    model = fit_umap(built_reference.embedding, seed=3, max_fit_cells=400, chunk_size=128)
    assert len(model.fitted) == 400 and np.all(np.isfinite(model.coords))
    placed = np.setdiff1d(np.arange(910), model.fitted)
    labels = built_reference.obs["cell_type"].reset_index(drop=True)
    accuracy = _knn_accuracy_2d(model.coords[model.fitted], labels[model.fitted], model.coords[placed], labels[placed])
    assert accuracy >= 0.9
    again = fit_umap(built_reference.embedding, seed=3, max_fit_cells=400, chunk_size=500)
    np.testing.assert_array_equal(again.coords, model.coords)  # seeded, and the chunks do not matter


def test_to_anndata_serves_scanpy_style_tools(built_reference, tmp_path):
    adata = built_reference.to_anndata()
    assert adata.shape == (910, 0) and adata.X is None
    assert set(adata.obsm) == {"X_symphony", "X_umap"} and "cell_type" in adata.obs
    adata.write_h5ad(tmp_path / "cells.h5ad")
    assert ad.read_h5ad(tmp_path / "cells.h5ad").obsm["X_umap"].shape == (910, 2)


def test_plots_draw_what_they_say(built_reference, mapped):
    sd.transfer_labels(built_reference, mapped, "cell_type")
    mapped.obs["mapping_score"] = sd.per_cell_mapping_metric(built_reference, mapped)
    ax = pl.reference(built_reference, color="cell_type")
    assert ax.get_title() == "reference UMAP: cell_type"
    assert {t.get_text() for t in ax.texts} == set(built_reference.obs["cell_type"].astype(str))
    ax = pl.mapping(built_reference, mapped, color="cell_type_pred")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        c for c in mapped.obs["cell_type_pred"].cat.categories if (mapped.obs["cell_type_pred"] == c).any()
    ]
    assert sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets")) >= 290
    ax = pl.confusion(mapped.obs["cell_type"], mapped.obs["cell_type_pred"])
    image = ax.images[0].get_array()
    np.testing.assert_allclose(np.asarray(image).sum(axis=1), 1.0)
    ax = pl.mapping_scores(mapped, groupby="cell_type_pred", threshold=10)
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "mapping_score"
    with pytest.raises(ValueError, match="has no obsm\\['X_umap'\\]"):
        pl.mapping(built_reference, ad.AnnData(obs=mapped.obs.copy()))
    with pytest.raises(ValueError, match="'celltype' is not a column of the reference obs"):
        pl.reference(built_reference, color="celltype")


def test_cli_map_draws_the_mapping(files_with_reference, capsys):
    folder = files_with_reference
    code = main(
        map_argv(
            folder / "ref.zarr",
            folder / "query.h5ad",
            folder / "mapped.h5ad",
            "--no-normalize",
            "--batch-key",
            "donor",
            "--transfer",
            "cell_type",
            "--plot",
            str(folder / "mapping.png"),
            "-q",
        )
    )
    assert code == 0
    assert (folder / "mapping.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ad.read_h5ad(folder / "mapped.h5ad").obsm["X_umap"].shape == (290, 2)
    code = main(
        map_argv(
            folder / "ref.zarr", folder / "query.h5ad", folder / "m2.h5ad", "--plot", str(folder / "mapping.jpg"), "-q"
        )
    )
    assert code == 2 and "ending in .png, .pdf, .svg" in capsys.readouterr().err
    assert not (folder / "m2.h5ad").exists()
    assert (
        main(
            build_argv(
                folder / "query.h5ad", folder / "plain.zarr", "--no-normalize", "--n-hvg", "500", "--no-umap", "-q"
            )
        )
        == 0
    )
    assert sd.load_reference(folder / "plain.zarr").umap is None
    code = main(
        map_argv(
            folder / "plain.zarr",
            folder / "query.h5ad",
            folder / "m3.h5ad",
            "--no-normalize",
            "--plot",
            str(folder / "m3.png"),
            "-q",
        )
    )
    assert code == 2 and "has no UMAP to draw into" in capsys.readouterr().err
    assert not (folder / "m3.h5ad").exists()


@pytest.fixture()
def files_with_reference(built_reference, split, tmp_path):
    built_reference.save(tmp_path / "ref.zarr")
    split[1].write_h5ad(tmp_path / "query.h5ad")
    return tmp_path


@pytest.mark.slow
@pytest.mark.cluster
def test_placement_on_the_workers_of_a_cluster_equals_threads(built_reference, local_cluster):
    """The reference cells beyond the fit cap, and query cells, are placed by tasks on the workers
    of a process cluster exactly as on threads (per-cell random streams, a graph per process)."""
    threads = fit_umap(built_reference.embedding, seed=3, max_fit_cells=400, chunk_size=128)
    cluster, client = local_cluster(n_workers=2, processes=True)
    with cluster, client:
        workers = fit_umap(built_reference.embedding, seed=3, max_fit_cells=400, chunk_size=128)
    np.testing.assert_array_equal(workers.coords, threads.coords)
    assert len(np.setdiff1d(np.arange(910), workers.fitted)) == 510  # placed, not fitted
