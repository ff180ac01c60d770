"""Nothing a user owns is lost, and no store is read mixed or edited silently (issue #22).

Outputs that are or overlap an input are refused; ``overwrite`` replaces only what symphony_dask
wrote; "does not exist" holds at the moment of the final move (two real processes race for one
path); a load while another process saves over the store returns one store; the checksums cover
the parameters and every element, and their names cannot leave the store; an obs filter runs no
code; a full or read-only file system gives one clear line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import zarr
from _helpers import R_BUILD, ROOT, build_argv, map_argv

import symphony_dask as sd
from symphony_dask._io.obs_filter import cells_where
from symphony_dask.cli import main


def _digest_tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) with its contents, to show it was not touched."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture()
def files(split, built_reference, tmp_path):
    ref_cells, query = split
    ref_cells.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    built_reference.save(tmp_path / "ref.zarr")
    return tmp_path


def _map(files: Path, out, *extra: str, query=None) -> int:
    return main(_map_argv(files, out, *extra, query=query))


def _map_argv(files: Path, out, *extra: str, query=None) -> list[str]:
    """Map the query (or ``query``) onto the reference in ``files``, as the PBMCs want it."""
    return map_argv(
        files / "ref.zarr", query or files / "query.h5ad", out, "--batch-key", "donor", "--no-normalize", "-q", *extra
    )


# -- 1. an output that is, holds or lies inside an input -------------------------------------------------


def test_map_out_naming_the_query_is_refused_before_any_work(files, capsys):
    before = _digest_tree(files / "query.h5ad")
    assert _map(files, files / "query.h5ad", "--overwrite") == 2
    assert "--out" in (err := capsys.readouterr().err) and "is the input" in err and "query.h5ad" in err
    assert _digest_tree(files / "query.h5ad") == before
    os.symlink(files / "query.h5ad", files / "alias.h5ad")  # the same file under another name
    assert _map(files, files / "alias.h5ad", "--overwrite") == 2
    os.link(files / "query.h5ad", files / "hard.h5ad")
    assert _map(files, files / "hard.h5ad", "--overwrite") == 2
    assert _map(files, files / "ref.zarr" / "mapped.h5ad") == 2  # inside the reference store
    assert "lies inside the input" in capsys.readouterr().err
    assert _digest_tree(files / "query.h5ad") == before


def test_map_of_shards_refuses_an_output_that_is_a_shard(files, capsys):
    """A glob's shards are inputs too: a rerun whose glob also takes the outputs is refused."""
    query = ad.read_h5ad(files / "query.h5ad")
    (files / "shards").mkdir()
    query[:150].write_h5ad(files / "shards" / "a.h5ad")
    query[150:].write_h5ad(files / "shards" / "a.symphony.h5ad")  # what a mapped shard a would be called
    before = _digest_tree(files / "shards")
    assert _map(files, files / "shards", "--overwrite", query=files / "shards" / "*.h5ad") == 2
    assert "is the input" in capsys.readouterr().err
    assert _digest_tree(files / "shards") == before
    assert _map(files, files, "--overwrite", query=files / "shards" / "*.h5ad") == 2  # a folder holding them
    assert "is a folder holding the input" in capsys.readouterr().err


def test_build_out_naming_its_input_is_refused(files, capsys):
    store = files / "atlas.zarr"
    ad.read_h5ad(files / "ref.h5ad").write_zarr(store)
    before = _digest_tree(store)
    for out in (store, store / "ref.zarr"):
        assert main(["build", str(store), "--out", str(out), "--overwrite", "--batch-key", "donor", "-q"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert _digest_tree(store) == before


def test_save_into_the_build_input_or_a_lazily_read_store_is_refused(files, built_reference, tmp_path):
    ref = sd.build_reference(files / "ref.h5ad", "donor", **{**R_BUILD, "umap": False, "neighbor_index": False})
    with pytest.raises(ValueError, match=r"is the input .*ref\.h5ad"):
        ref.save(files / "ref.h5ad", overwrite=True)
    lazy = sd.load_reference(files / "ref.zarr", lazy_embedding=True)
    with pytest.raises(ValueError, match=r"the save target .* is the input"):
        lazy.save(files / "ref.zarr", overwrite=True)
    eager = sd.load_reference(files / "ref.zarr")  # nothing is read later: saving it again is fine
    eager.save(files / "ref.zarr", overwrite=True)
    np.testing.assert_array_equal(sd.load_reference(files / "ref.zarr").embedding, built_reference.embedding)


# -- 2. overwrite replaces only symphony_dask's own outputs --------------------------------------------


def test_overwrite_never_deletes_a_folder_or_file_it_did_not_write(built_reference, tmp_path):
    project = tmp_path / "my_project"
    project.mkdir()
    (project / "thesis.tex").write_text("\\chapter{Four years}")
    with pytest.raises(
        FileExistsError,
        match=r"my_project is not a reference store written by symphony_dask "
        r"\(it is a folder holding 1 entry: thesis.tex\)",
    ):
        built_reference.save(project, overwrite=True)
    assert (project / "thesis.tex").read_text() == "\\chapter{Four years}"
    notes = tmp_path / "notes.zarr"
    notes.write_text("not a store")
    with pytest.raises(FileExistsError, match="it is a file of 11 bytes"):
        built_reference.save(notes, overwrite=True)
    assert notes.read_text() == "not a store"
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w", zarr_format=3).attrs["mine"] = True  # a zarr store, not a reference
    with pytest.raises(FileExistsError, match="not a reference store written by symphony_dask"):
        built_reference.save(other, overwrite=True)
    assert dict(zarr.open_group(str(other), mode="r").attrs) == {"mine": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_project", "notes.zarr", "other.zarr"]


def test_map_overwrite_replaces_mapped_outputs_only(files, capsys):
    precious = files / "precious.h5ad"
    ad.read_h5ad(files / "ref.h5ad").write_h5ad(precious)  # an AnnData, but not a mapped query
    before = _digest_tree(precious)
    assert _map(files, precious, "--overwrite") == 2
    assert "is not a mapped AnnData written by symphony_dask" in capsys.readouterr().err
    assert _digest_tree(precious) == before
    out = files / "mapped.h5ad"
    assert _map(files, out) == 0
    assert _map(files, out, "--overwrite", "--transfer", "cell_type") == 0  # ours: replaced
    assert "cell_type_pred" in ad.read_h5ad(out).obs


def test_plot_overwrite_replaces_only_our_picture(files, capsys):
    picture = files / "figure.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n a picture of someone else's")
    assert _map(files, files / "m.h5ad", "--plot", str(picture), "--overwrite") == 2
    assert "is not a picture written by symphony_dask" in capsys.readouterr().err
    picture.unlink()
    assert _map(files, files / "m.h5ad", "--plot", str(picture)) == 0
    assert _map(files, files / "m.h5ad", "--plot", str(picture), "--overwrite") == 0
    assert sorted(p.name for p in files.iterdir() if p.name.startswith(".")) == []


# -- 3. "does not exist" holds at the moment of the move ---------------------------------------------------

_RACE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    import symphony_dask as sd
    from symphony_dask._reference import store as reference

    target, barrier, me, other = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    write = reference._write_store

    def write_then_wait(ref, tmp):  # both writers are past every early check before either moves
        write(ref, tmp)
        (barrier / me).touch()
        while not (barrier / other).exists():
            time.sleep(0.01)

    reference._write_store = write_then_wait
    rng = np.random.default_rng(int(me))
    genes = [f"g{i}" for i in range(30)]
    ref = sd.Reference.from_arrays(genes, rng.random(30), 1 + rng.random(30), rng.random((30, 4)),
                                   rng.random((4, 6)), 1 + rng.random(6), rng.random((6, 4)), params={"writer": me})
    try:
        ref.save(target)
    except FileExistsError as err:
        print("LOST", err)
        sys.exit(3)
    print("WON")
""")


def test_two_processes_saving_to_one_path_one_wins_the_other_gets_file_exists(tmp_path):
    target, barrier = tmp_path / "ref.zarr", tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE, str(target), str(barrier), me, other],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for me, other in (("1", "2"), ("2", "1"))
    ]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 3], results
    winner = "1" if results[0][0] == 0 else "2"
    loser = next(out for code, out, _ in results if code == 3)
    assert "appeared while this reference store was written" in loser
    assert sd.load_reference(target).params == {"writer": winner}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["barrier", "ref.zarr"]  # no temporary left


_MAP_RACE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from symphony_dask import cli
    from symphony_dask.cli import commands

    barrier, me, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    write = commands.write_anndata

    def write_then_wait(adata, path, suffix):
        write(adata, path, suffix)
        (barrier / me).touch()
        while not (barrier / other).exists():
            time.sleep(0.01)

    commands.write_anndata = write_then_wait
    sys.exit(cli.main(sys.argv[4:]))
""")


@pytest.mark.slow
def test_two_map_commands_writing_one_out_one_wins(files):
    barrier = files / "barrier"
    barrier.mkdir()
    out = files / "mapped.h5ad"
    argv = _map_argv(files, out)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MAP_RACE, str(barrier), me, other, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for me, other in (("1", "2"), ("2", "1"))
    ]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    assert "appeared while this mapped AnnData was written" in next(err for code, err in results if code == 2)
    assert ad.read_h5ad(out).n_obs == 290
    assert not [p for p in files.iterdir() if p.name.startswith(".mapped")]


# -- 4. a load while another process saves over the store ---------------------------------------------------

_OVERWRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    import symphony_dask as sd

    target, stop = Path(sys.argv[1]), Path(sys.argv[2])
    genes = [f"g{i}" for i in range(200)]

    def reference(seed):
        rng = np.random.default_rng(seed)
        return sd.Reference.from_arrays(genes, rng.random(200), 1 + rng.random(200), rng.random((200, 10)),
                                        rng.random((10, 20)), 1 + rng.random(20), rng.random((20, 10)),
                                        params={"seed": seed})

    refs = [reference(1), reference(2)]
    refs[0].save(target)
    print("READY", flush=True)
    saves = 0
    while not stop.exists():
        refs[saves % 2].save(target, overwrite=True)
        saves += 1
        print(saves, flush=True)
""")


@pytest.mark.slow
def test_load_while_another_process_overwrites_returns_one_store(tmp_path):
    """Loads during repeated saves of two same-shaped references each return one of them whole
    (before, 15 of 985 loads returned old loadings with new centroids). Runs for at least 10 s and
    until 50 saves have happened (at most 60 s)."""
    target, stop = tmp_path / "ref.zarr", tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", _OVERWRITER, str(target), str(stop)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert writer.stdout.readline().strip() == "READY"
    saves = [0]
    counter = threading.Thread(target=lambda: [saves.__setitem__(0, int(line)) for line in writer.stdout], daemon=True)
    counter.start()
    expected = {}
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        expected[seed] = [rng.random(200), 1 + rng.random(200), rng.random((200, 10))]
    loads, mixed, failed = 0, [], 0
    start = time.monotonic()
    while time.monotonic() - start < 10 or (saves[0] < 50 and time.monotonic() - start < 60):
        try:
            ref = sd.load_reference(target)
        except ValueError as err:  # a clean failure is allowed (replaced 5 times during one read)
            assert "was replaced by other saves" in str(err)
            failed += 1
            continue
        loads += 1
        mean, std, loadings = expected[ref.params["seed"]]
        if not (
            np.array_equal(ref.mean, mean) and np.array_equal(ref.std, std) and np.array_equal(ref.loadings, loadings)
        ):
            mixed.append(ref.params["seed"])
    stop.touch()
    assert writer.wait(timeout=60) == 0
    counter.join(timeout=10)
    print(f"{loads} loads ({failed} failed cleanly) during {saves[0]} saves")
    assert loads >= 50 and saves[0] >= 50
    assert mixed == []


# -- 5-7. checksums cover the parameters and every element; names stay inside the store -------------------


def _edit_root(path: Path, edit) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    edit(meta["attributes"])
    (path / "zarr.json").write_text(json.dumps(meta))


def test_edited_parameters_are_refused(built_reference, tmp_path):
    path = built_reference.save(tmp_path / "ref.zarr")
    _edit_root(path, lambda attrs: attrs["params"].update(harmony_flavor="harmony2", alpha=0.9))
    with pytest.raises(ValueError, match=r"ref.zarr is damaged: zarr.json \(the root metadata: parameters"):
        sd.load_reference(path)


def test_an_element_the_checksums_do_not_list_is_refused(built_reference, tmp_path):
    path = built_reference.save(tmp_path / "ref.zarr")
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        ad.io.write_elem(zarr.open_group(str(path), mode="a"), "idf", np.full(built_reference.n_genes, 7.0))
    with pytest.raises(ValueError, match="holds idf, which its checksums do not list"):
        sd.load_reference(path)


@pytest.mark.parametrize("name", ["../x", "/usr", "..", "genes/../../x", "a\\b", ""])
def test_checksum_names_that_leave_the_store_are_refused_at_once(built_reference, tmp_path, name):
    path = built_reference.save(tmp_path / "ref.zarr")
    _edit_root(path, lambda attrs: attrs["symphony_dask"]["checksums"].update({name: {"files": 1, "bytes": 1}}))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"its checksums name .*, which is not an element inside the store") as info:
        sd.load_reference(path)
    assert time.perf_counter() - start < 1.0
    assert "files" not in str(info.value) and "bytes" not in str(info.value)


def test_a_symbolic_link_in_a_store_is_refused(built_reference, tmp_path):
    path = built_reference.save(tmp_path / "ref.zarr")
    chunk = next(p for p in (path / "loadings").rglob("*") if p.is_file() and p.name != "zarr.json")
    target = tmp_path / "elsewhere"
    target.write_bytes(chunk.read_bytes())
    chunk.unlink()
    chunk.symlink_to(target)
    with pytest.raises(ValueError, match=r"damaged: loadings \(holds a symbolic link"):
        sd.load_reference(path)


def test_version_2_store_loads_with_a_warning_that_params_are_not_covered(built_reference, tmp_path):
    path = built_reference.save(tmp_path / "ref.zarr")

    def as_version_2(attrs):
        marker = attrs["symphony_dask"]
        attrs["symphony_dask"] = {"format": marker["format"], "version": 2, "checksums": marker["checksums"]}

    _edit_root(path, as_version_2)
    with pytest.warns(UserWarning, match="checksums do not cover the build parameters"):
        loaded = sd.load_reference(path)
    np.testing.assert_array_equal(loaded.loadings, built_reference.loadings)


# -- 8. an obs filter runs no code ------------------------------------------------------------------------


@pytest.fixture()
def obs() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "donor": pd.Categorical(["a", "b", "d7", "a", "c"]),
            "nUMI": [10, 600, 700, 800, 900],
            "n genes": [1, 2, 3, 4, 5],
            "doublet": [True, False, True, False, False],
        }
    )


@pytest.mark.parametrize(
    "expression, pandas_query",
    [
        ("donor != 'd7' and nUMI > 500", None),
        ("donor != 'd7' & nUMI > 500", None),
        ("donor in ['a', 'b'] | nUMI >= 900", None),
        ("donor not in ('a', 'b')", None),
        ("~doublet & nUMI < 850", None),
        ("not (doublet or donor == 'c')", None),
        ("500 < nUMI <= 800", None),
        ("`n genes` >= 3", None),
        ("nUMI > -1 and donor == ['a', 'c']", "nUMI > -1 and donor in ['a', 'c']"),
    ],
)
def test_obs_filter_grammar_gives_pandas_results(obs, expression, pandas_query):
    expected = obs.eval(pandas_query or expression).to_numpy()
    np.testing.assert_array_equal(cells_where(obs, expression), expected)


@pytest.mark.parametrize(
    "expression, part, why",
    [
        ("@os.system('id > {f}') == 1 & nUMI < 0", "@os.system", "'@' refers to Python variables"),
        ("donor.to_csv('{f}')", "donor.to_csv('{f}')", "calls are not part of a filter"),
        ("donor.lower() == 'a'", "donor.lower()", "calls are not part of a filter"),
        ("donor.str == 'a'", "donor.str", "attributes and methods"),
        ("__import__('os').system('id > {f}')", "__import__('os').system('id > {f}')", "calls"),
        ("nUMI * 2 > 10", "nUMI * 2", "arithmetic"),
        ("nUMI", "nUMI", "not True/False"),
        ("donor[0] == 'a'", "donor[0]", "indexing"),
        ("(nUMI > 1", "(nUMI > 1", "not a valid filter"),
        ("lambda: 1", "lambda: 1", "Lambda is not part of a filter"),
    ],
)
def test_obs_filter_refuses_code_naming_the_part(obs, tmp_path, expression, part, why):
    witness = tmp_path / "ran"
    expression, part = expression.format(f=witness), part.format(f=witness)
    with pytest.raises(ValueError, match="obs_filter") as info:
        cells_where(obs, expression)
    assert repr(part) in str(info.value) and why in str(info.value)
    assert "the columns are" not in str(info.value) and not witness.exists()


def test_obs_filter_on_the_command_line_runs_nothing(files, capsys):
    witness = files / "ran"
    for expression in (f"@os.system('touch {witness}') == 1 & nUMI < 0", f"donor.to_csv('{witness}')"):
        code = main(
            build_argv(files / "ref.h5ad", files / "r.zarr", "--obs-filter", expression, "--batch-key", "donor", "-q")
        )
        assert code == 2
        assert "--obs-filter" in capsys.readouterr().err
    assert not witness.exists() and not (files / "r.zarr").exists()


# -- a full or read-only file system ----------------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root can mount one: CI runs as root); skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_gives_one_line_and_leaves_nothing(files, small_disk, capsys):
    assert _map(files, small_disk / "mapped.h5ad") == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "No space left on device" in err and "free some space" in err
    assert list(small_disk.iterdir()) == []
    with pytest.raises(OSError, match=r"cannot write .*ref\.zarr: No space left on device"):
        sd.load_reference(files / "ref.zarr").save(small_disk / "ref.zarr")
    assert list(small_disk.iterdir()) == []


def test_read_only_output_folder_gives_one_line(files, small_disk, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert _map(files, small_disk / "mapped.h5ad") == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Read-only file system" in err and "write elsewhere" in err
