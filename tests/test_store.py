"""Saving and loading references: round trip, atomic writes, refusing to overwrite, bad stores."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import zarr

import symphony_dask as sd
from symphony_dask import reference as reference_module


def test_round_trip_gives_identical_mapping(built_reference, split, tmp_path):
    _, query = split
    path = built_reference.save(tmp_path / "ref.zarr")
    loaded = sd.load_reference(path)
    for name in ("genes", "mean", "std", "loadings", "centroids", "cluster_sizes", "compression", "embedding"):
        np.testing.assert_array_equal(np.asarray(getattr(loaded, name)), np.asarray(getattr(built_reference, name)))
    for name in ("weight_sq", "first", "second"):
        np.testing.assert_array_equal(getattr(loaded.pca_moments, name), getattr(built_reference.pca_moments, name))
    assert loaded.obs.equals(built_reference.obs)
    assert loaded.params["n_clusters"] == 100
    before = sd.map_query(built_reference, query.copy(), "donor", normalize=False)
    after = sd.map_query(loaded, query.copy(), "donor", normalize=False)
    np.testing.assert_array_equal(before.obsm["X_symphony"], after.obsm["X_symphony"])
    sd.transfer_labels(loaded, after, "cell_type")
    sd.transfer_labels(built_reference, before, "cell_type")
    assert (before.obs["cell_type_pred"] == after.obs["cell_type_pred"]).all()


def test_store_is_zarr_v3_and_small_without_cells(built_reference, tmp_path):
    minimal = sd.Reference.from_arrays(
        built_reference.genes, built_reference.mean, built_reference.std, built_reference.loadings,
        built_reference.centroids, built_reference.cluster_sizes, built_reference.compression,
    )
    path = minimal.save(tmp_path / "minimal.zarr")
    group = zarr.open_group(str(path), mode="r")
    assert group.metadata.zarr_format == 3
    assert "embedding" not in group and "obs" not in group
    loaded = sd.load_reference(path)
    assert loaded.embedding is None and loaded.n_cells is None


def test_lazy_embedding_reads_as_dask(built_reference, tmp_path):
    path = built_reference.save(tmp_path / "ref.zarr")
    loaded = sd.load_reference(path, lazy_embedding=True)
    assert hasattr(loaded.embedding, "dask")
    np.testing.assert_array_equal(loaded.embedding.compute(), built_reference.embedding)


def test_saving_over_existing_store_needs_overwrite(built_reference, r_reference, tmp_path):
    path = tmp_path / "ref.zarr"
    built_reference.save(path)
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        r_reference.save(path)
    assert sd.load_reference(path).params["n_clusters"] == 100  # untouched
    r_reference.save(path, overwrite=True)
    assert sd.load_reference(path).params == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.zarr"]  # no leftovers


def test_failed_write_leaves_old_store_and_no_partial_output(built_reference, tmp_path, monkeypatch):
    path = tmp_path / "ref.zarr"
    built_reference.save(path)

    def broken(ref, target):
        zarr.open_group(str(target), mode="w-", zarr_format=3).attrs["partial"] = True
        raise OSError("disk full")

    monkeypatch.setattr(reference_module, "_write_store", broken)
    with pytest.raises(OSError, match="disk full"):
        built_reference.save(path, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.zarr"]
    np.testing.assert_array_equal(sd.load_reference(path).loadings, built_reference.loadings)


def test_path_that_is_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no reference store"):
        sd.load_reference(tmp_path / "missing.zarr")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a symphony_dask reference store"):
        sd.load_reference(tmp_path / "notes.txt")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3).attrs["x"] = 1
    with pytest.raises(ValueError, match="not a symphony_dask reference"):
        sd.load_reference(tmp_path / "other.zarr")


def test_incomplete_or_inconsistent_store(built_reference, tmp_path):
    import shutil

    path = built_reference.save(tmp_path / "ref.zarr")
    shutil.rmtree(path / "compression")
    with pytest.raises(ValueError, match="incomplete reference store: missing compression"):
        sd.load_reference(path)

    path = built_reference.save(tmp_path / "ref2.zarr")
    shutil.rmtree(path / "std")
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        ad.io.write_elem(zarr.open_group(str(path), mode="a"), "std", np.ones(5))
    with pytest.raises(ValueError, match=r"std must have shape \(1360,\)"):
        sd.load_reference(path)


def test_newer_store_version_is_refused(built_reference, tmp_path):
    path = built_reference.save(tmp_path / "ref.zarr")
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["symphony_dask"]["version"] = 99
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="newer symphony_dask"):
        sd.load_reference(path)


def test_from_arrays_checks_shapes(r_reference):
    with pytest.raises(ValueError, match=r"compression must have shape \(100, 20\)"):
        sd.Reference.from_arrays(
            r_reference.genes, r_reference.mean, r_reference.std, r_reference.loadings,
            r_reference.centroids, r_reference.cluster_sizes, r_reference.compression[:, :5],
        )
    with pytest.raises(ValueError, match="obs has 3 rows but the embedding has 910 cells"):
        sd.Reference.from_arrays(
            r_reference.genes, r_reference.mean, r_reference.std, r_reference.loadings,
            r_reference.centroids, r_reference.cluster_sizes, r_reference.compression,
            embedding=r_reference.embedding, obs=r_reference.obs.iloc[:3],
        )
