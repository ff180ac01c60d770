"""The symphony-dask command line: build, map and demo."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from _helpers import CLI_BUILD, CLUSTER_CONFIGS, build_argv, from_elements, map_argv

import symphony_dask as sd
from symphony_dask.cli import main


@pytest.fixture()
def files(split, tmp_path):
    ref_cells, query = split
    ref_cells.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    return tmp_path


def test_build_then_map_with_label_transfer(files, capsys, built_reference):
    args = ["--no-normalize", *CLI_BUILD]
    assert main(["build", str(files / "ref.h5ad"), "--out", str(files / "ref.zarr"), "-q", *args]) == 0
    assert "Reference(1360 genes, 20 PCs, 100 clusters, 910 cells" in capsys.readouterr().out
    ref = sd.load_reference(files / "ref.zarr")
    np.testing.assert_allclose(ref.loadings, built_reference.loadings, atol=1e-10)

    out = files / "mapped.h5ad"
    code = main(
        map_argv(
            files / "ref.zarr",
            files / "query.h5ad",
            out,
            "--batch-key",
            "donor",
            "--no-normalize",
            "--transfer",
            "cell_type",
            "-q",
        )
    )
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


@pytest.mark.slow
@pytest.mark.cluster
def test_build_on_local_cluster_config(files, capsys):
    code = main(
        build_argv(
            files / "ref.h5ad",
            files / "ref.zarr",
            "-q",
            "--batch-key",
            "donor",
            "--no-normalize",
            "--n-hvg",
            "500",
            "--max-iter-harmony",
            "1",
            "--chunk-size",
            "300",
            "--cluster",
            str(CLUSTER_CONFIGS / "local.yaml"),
        )
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "Dask dashboard:" in out and "910 cells" in out
    assert sd.load_reference(files / "ref.zarr").params["harmony_iterations"] == 1


def test_map_shards_into_one_output_each(files, capsys, built_reference, split):
    _, query = split
    built_reference.save(files / "ref.zarr")
    for i, rows in enumerate(np.array_split(np.arange(query.n_obs), 3)):
        query[rows].write_h5ad(files / f"shard_{i}.h5ad")
    code = main(
        map_argv(
            files / "ref.zarr",
            files / "shard_*.h5ad",
            files / "mapped",
            "--batch-key",
            "donor",
            "--no-normalize",
            "--transfer",
            "cell_type",
            "--chunk-size",
            "60",
            "-q",
        )
    )
    assert code == 0
    assert "mapped 290 cells from 3 file(s)" in capsys.readouterr().out
    expected = sd.map_query(built_reference, query.copy(), "donor", normalize=False).obsm["X_symphony"]
    parts = [ad.read_h5ad(files / "mapped" / f"shard_{i}.symphony.h5ad") for i in range(3)]
    assert [p.n_obs for p in parts] == [97, 97, 96]
    assert np.abs(np.vstack([p.obsm["X_symphony"] for p in parts]) - expected).max() < 1e-10
    assert all("cell_type_pred" in p.obs for p in parts)


# -- issue: the command line a cluster user expects -------------------------------------------------


@pytest.mark.slow
def test_layer_counts_from_the_command_line_equals_the_python_api(files, capsys):
    """scanpy's layout (log values in X, counts in layers['counts']) built and mapped from the counts:
    the same numbers as the Python API with layer='counts'."""
    ref_out, mapped_out = files / "ref.zarr", files / "mapped.h5ad"
    assert main(["build", str(files / "ref.h5ad"), "--out", str(ref_out), "--layer", "counts", "-q", *CLI_BUILD]) == 0
    assert (
        main(
            map_argv(
                ref_out,
                files / "query.h5ad",
                mapped_out,
                "--layer",
                "counts",
                "--batch-key",
                "donor",
                "--transfer",
                "cell_type",
                "-q",
            )
        )
        == 0
    )
    assert "warning" not in capsys.readouterr().err

    ref = sd.build_reference(
        files / "ref.h5ad", "donor", layer="counts", n_hvg=1000, hvg_batch_key="donor", n_clusters=100
    )
    mapped = sd.map_query(ref, files / "query.h5ad", "donor", layer="counts")
    saved, written = sd.load_reference(ref_out), ad.read_h5ad(mapped_out)
    for name in ("mean", "std", "loadings", "centroids", "compression"):
        assert np.abs(getattr(saved, name) - getattr(ref, name)).max() <= 1e-10, name
    assert np.abs(written.obsm["X_symphony"] - mapped.obsm["X_symphony"]).max() <= 1e-10
    assert (written.obs["cell_type_pred"] == written.obs["cell_type"]).mean() >= 0.85


def test_log_values_read_as_counts_warn_naming_the_layer_and_the_flag(files, capsys, built_reference):
    built_reference.save(files / "ref.zarr")
    code = main(map_argv(files / "ref.zarr", files / "query.h5ad", files / "mapped.h5ad", "-q"))
    assert code == 0
    err = capsys.readouterr().err
    assert err.startswith("symphony-dask: warning: the query expression holds")
    assert "pass --layer counts; if they are log(CP10K+1) values, pass --no-normalize" in err
    assert "normalize=" not in err and "Warning" not in err
    # in Python the same advice names the keyword arguments
    with pytest.warns(
        UserWarning, match=r"pass layer='counts'; if they are log\(CP10K\+1\) values, pass normalize=False"
    ):
        sd.map_query(built_reference, files / "query.h5ad")


def test_unknown_layer_names_the_layers(files, capsys):
    code = main(["build", str(files / "ref.h5ad"), "--out", str(files / "ref.zarr"), "--layer", "raw", "-q"])
    assert code == 2
    assert "has no layer 'raw'; its layers are: 'counts'" in capsys.readouterr().err
    assert not (files / "ref.zarr").exists()


def test_obs_filter_builds_from_the_selected_cells(split, tmp_path, capsys, built_reference, pbmcs):
    """--obs-filter on the whole data set gives the reference of the selected cells alone."""
    pbmcs.write_h5ad(tmp_path / "all.h5ad")
    code = main(
        build_argv(
            tmp_path / "all.h5ad",
            tmp_path / "ref.zarr",
            "--no-normalize",
            "--obs-filter",
            "donor != '3pv1'",
            "-q",
            *CLI_BUILD,
        )
    )
    assert code == 0
    ref = sd.load_reference(tmp_path / "ref.zarr")
    assert ref.n_cells == 910 and ref.params["obs_filter"] == "donor != '3pv1'"
    for name in ("loadings", "centroids", "compression"):
        assert np.abs(getattr(ref, name) - getattr(built_reference, name)).max() <= 1e-10, name
    code = main(
        ["build", str(tmp_path / "all.h5ad"), "--out", str(tmp_path / "r2.zarr"), "--obs-filter", "tech == '5p'", "-q"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert """--obs-filter "tech == '5p'" names 'tech', which is not an obs column""" in err
    assert "'donor', 'nUMI'" in err and not (tmp_path / "r2.zarr").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["build", "{ref}", "--out", "{tmp}/ref.h5ad"], "a reference is a zarr store; name it with .zarr"),
        (
            ["map", "--reference", "{tmp}/ref.zarr", "--query", "{query}", "--out", "{tmp}/mapped.csv"],
            "end the name with .h5ad or .zarr",
        ),
        (
            ["map", "--reference", "{tmp}/ref.zarr", "--query", "{tmp}/shard_*.h5ad", "--out", "{tmp}/mapped.h5ad"],
            "2 query files are mapped, each to its own file in the folder --out names",
        ),
    ],
)
def test_output_suffixes_are_checked_before_any_work(files, capsys, argv, message, built_reference, split):
    built_reference.save(files / "ref.zarr")
    for i in range(2):
        split[1][i * 10 : (i + 1) * 10].write_h5ad(files / f"shard_{i}.h5ad")
    before = set(files.iterdir())
    argv = [a.format(ref=files / "ref.h5ad", query=files / "query.h5ad", tmp=files) for a in argv]
    assert main([*argv, "-q"]) == 2
    assert message in capsys.readouterr().err
    assert set(files.iterdir()) == before


def test_transfer_checks_come_before_the_mapping(files, capsys, built_reference, monkeypatch):
    """A --minimal reference cannot transfer labels, k cannot exceed the reference's cells, the label
    column must exist: each is refused before map_query runs, and nothing is written."""
    import symphony_dask._mapping.query

    def not_called(*args, **kwargs):
        raise AssertionError("map_query ran before the checks")

    monkeypatch.setattr(symphony_dask._mapping.query, "map_query", not_called)
    minimal = from_elements(built_reference, cells=False)
    minimal.save(files / "minimal.zarr")
    built_reference.save(files / "ref.zarr")
    cases = [
        (
            "minimal.zarr",
            ["--transfer", "cell_type"],
            "saved without its per-cell embedding and obs, which label "
            "transfer needs; rebuild it (leave out --minimal)",
        ),
        ("ref.zarr", ["--transfer", "cell_type", "--k", "5000"], "--k 5000: between 1 and the reference's 910 cells"),
        ("ref.zarr", ["--transfer", "celltype"], "'celltype' is not a column of the reference obs"),
        ("ref.zarr", ["--transfer-values", "protein"], "the obsm keys: (none)"),
        ("ref.zarr", ["--transfer", "cell_type", "--min-confidence", "60"], "between 0 and 1"),
    ]
    for reference, extra, message in cases:
        code = main(
            map_argv(files / reference, files / "query.h5ad", files / "mapped.h5ad", "--no-normalize", "-q", *extra)
        )
        assert code == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not (files / "mapped.h5ad").exists()


def test_messages_name_the_command_line_flags(files, capsys):
    code = main(
        build_argv(
            files / "ref.h5ad", files / "r.zarr", "--no-normalize", "--batch-key", "donor", "--n-clusters", "5000", "-q"
        )
    )
    assert code == 2
    assert "--n-clusters 5000 is impossible with 910 cells; try --n-clusters 30" in capsys.readouterr().err
    code = main(["build", str(files / "ref.h5ad"), "--out", str(files / "r.zarr"), "--hvg-batch-key", "tech", "-q"])
    assert code == 2
    assert "--hvg-batch-key 'tech' is not a column of obs" in capsys.readouterr().err
    # the Python API keeps its own spelling
    with pytest.raises(ValueError, match="n_clusters=5000 is impossible with 910 cells; try n_clusters=30"):
        sd.build_reference(files / "ref.h5ad", "donor", normalize=False, n_clusters=5000)


def test_mapped_zarr_output_is_zarr_v3_without_warnings(files, capsys, built_reference, recwarn):
    import zarr

    built_reference.save(files / "ref.zarr")
    out = files / "mapped.zarr"
    assert (
        main(map_argv(files / "ref.zarr", files / "query.h5ad", out, "--no-normalize", "--batch-key", "donor", "-q"))
        == 0
    )
    assert capsys.readouterr().err == "" and not [str(w.message) for w in recwarn]
    assert zarr.open_group(str(out), mode="r").metadata.zarr_format == 3
    assert ad.read_zarr(out).obsm["X_symphony"].shape == (290, 20)


def test_help_shows_every_default_and_answers_without_heavy_imports():
    import argparse
    import subprocess
    import sys

    from symphony_dask.cli.parser import build_parser as _parser

    parser = _parser()
    assert "``" not in parser.format_help()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, (name, action.dest)
            if action.default not in (None, False, []):
                assert f"default: {action.default}" in " ".join(text.split()), (name, action.dest)
            if action.default is None and not action.required and action.dest not in ("scheduler", "obs_filter"):
                assert "default:" in (action.help or ""), (name, action.dest)  # says what happens without it
    assert "repeat for several" in commands["map"].format_help()
    probe = (
        "import sys, symphony_dask.cli.parser as c; c.build_parser().format_help(); "
        "print(sorted(m for m in ('dask', 'anndata', 'numpy', 'distributed') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_stage_times_are_printed_once_as_per_stage_seconds(files, capsys, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="symphony_dask"):
        assert (
            main(["build", str(files / "ref.h5ad"), "--out", str(files / "ref.zarr"), "--no-normalize", *CLI_BUILD])
            == 0
        )
    out = capsys.readouterr().out
    assert out.count("stage times (s):") == 1
    assert all("timings" not in r.getMessage() and "{" not in r.getMessage() for r in caplog.records)
    iterations = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Harmony iteration")]
    assert iterations and all("clustering" in m and "rounds" in m for m in iterations)
    params = sd.load_reference(files / "ref.zarr").params["timings_s"]
    per_iteration = [float(m.split("clustering ")[1].split(" s")[0]) for m in iterations]
    assert abs(sum(per_iteration) - params["harmony clustering"]) < 0.01 * len(per_iteration) + 0.01


def test_public_names_resolve_on_first_use():
    assert sorted(sd.__all__) == sorted(sd._PUBLIC)
    for name in sd.__all__:
        assert getattr(sd, name).__name__ in (name, f"symphony_dask.{name}")  # functions, classes, modules
    with pytest.raises(AttributeError, match="has no attribute 'build_refrence'"):
        sd.build_refrence  # noqa: B018
