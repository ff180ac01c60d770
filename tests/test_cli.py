"""The symphony-dask command line: build, map and demo."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import symphony_dask as sd
from symphony_dask.cli import main

CLUSTER_CONFIGS = Path(__file__).parents[1] / "cluster_configs"


@pytest.fixture()
def files(split, tmp_path):
    ref_cells, query = split
    ref_cells.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    return tmp_path


def test_build_then_map_with_label_transfer(files, capsys, built_reference):
    args = ["--batch-key", "donor", "--no-normalize", "--n-hvg", "1000", "--hvg-batch-key", "donor", "--n-clusters", "100"]
    assert main(["build", str(files / "ref.h5ad"), "--out", str(files / "ref.zarr"), "-q", *args]) == 0
    assert "Reference(1360 genes, 20 PCs, 100 clusters, 910 cells" in capsys.readouterr().out
    ref = sd.load_reference(files / "ref.zarr")
    np.testing.assert_allclose(ref.loadings, built_reference.loadings, atol=1e-10)

    out = files / "mapped.h5ad"
    code = main(["map", "--reference", str(files / "ref.zarr"), "--query", str(files / "query.h5ad"),
                 "--batch-key", "donor", "--no-normalize", "--transfer", "cell_type", "--out", str(out), "-q"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mapped 290 cells from 1 file(s) (100.0% of reference genes found)" in printed
    mapped = ad.read_h5ad(out)
    assert mapped.obsm["X_symphony"].shape == (290, 20)
    assert (mapped.obs["cell_type_pred"] == mapped.obs["cell_type"]).mean() >= 0.9


def test_existing_output_is_an_error_not_overwritten(files, capsys):
    (files / "ref.zarr").mkdir()
    code = main(["build", str(files / "ref.h5ad"), "--out", str(files / "ref.zarr"), "-q", "--batch-key", "donor"])
    assert code == 2
    assert "already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert list((files / "ref.zarr").iterdir()) == []


def test_bad_batch_key_is_reported_without_traceback(files, capsys):
    code = main(["build", str(files / "ref.h5ad"), "--out", str(files / "r.zarr"), "-q", "--batch-key", "tech"])
    assert code == 2
    assert "batch key 'tech' is not a column of obs" in capsys.readouterr().err


def test_demo_reports_accuracy_and_stage_times(capsys):
    assert main(["demo", "-q"]) == 0
    out = capsys.readouterr().out
    assert "5-NN accuracy: 0.9" in out
    for stage in ("build reference", "variable_genes", "harmony", "map query", "transfer labels"):
        assert stage in out


def test_build_on_local_cluster_config(files, capsys):
    code = main(["build", str(files / "ref.h5ad"), "--out", str(files / "ref.zarr"), "-q", "--batch-key", "donor",
                 "--no-normalize", "--n-hvg", "500", "--max-iter-harmony", "1", "--chunk-size", "300",
                 "--cluster", str(CLUSTER_CONFIGS / "local.yaml")])
    assert code == 0
    out = capsys.readouterr().out
    assert "Dask dashboard:" in out and "910 cells" in out
    assert sd.load_reference(files / "ref.zarr").params["harmony_iterations"] == 1


def test_map_shards_into_one_output_each(files, capsys, built_reference, split):
    _, query = split
    built_reference.save(files / "ref.zarr")
    for i, rows in enumerate(np.array_split(np.arange(query.n_obs), 3)):
        query[rows].write_h5ad(files / f"shard_{i}.h5ad")
    code = main(["map", "--reference", str(files / "ref.zarr"), "--query", str(files / "shard_*.h5ad"),
                 "--batch-key", "donor", "--no-normalize", "--transfer", "cell_type", "--out", str(files / "mapped"),
                 "--chunk-size", "60", "-q"])
    assert code == 0
    assert "mapped 290 cells from 3 file(s)" in capsys.readouterr().out
    expected = sd.map_query(built_reference, query.copy(), "donor", normalize=False).obsm["X_symphony"]
    parts = [ad.read_h5ad(files / "mapped" / f"shard_{i}.symphony.h5ad") for i in range(3)]
    assert [p.n_obs for p in parts] == [97, 97, 96]
    assert np.abs(np.vstack([p.obsm["X_symphony"] for p in parts]) - expected).max() < 1e-10
    assert all("cell_type_pred" in p.obs for p in parts)
