"""Saving and loading references: round trip, atomic writes, refusing to overwrite, bad stores."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import zarr
from _helpers import from_elements

import symphony_dask as sd
from symphony_dask._reference import store as reference_module


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
    minimal = from_elements(built_reference, cells=False)
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


def test_killed_save_leaves_the_old_store_and_the_next_save_cleans_up(built_reference, r_reference, tmp_path):
    """A save killed mid-write (os._exit in a child process) leaves the old store readable and a
    temporary folder beside it, which the next save of the same target removes."""
    path = tmp_path / "ref.zarr"
    built_reference.save(path)
    script = (
        "import os, sys, zarr\n"
        "from pathlib import Path\n"
        "from symphony_dask._reference.store import is_reference_store\n"
        "from symphony_dask._io.atomic import write_atomically\n"
        "def write(tmp):\n"
        "    zarr.open_group(str(tmp), mode='w', zarr_format=3).attrs['partial'] = True\n"
        "    os._exit(9)\n"
        "write_atomically(Path(sys.argv[1]), write, overwrite=True, ours=is_reference_store)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)])
    assert done.returncode == 9
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ref.zarr"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ref.zarr.tmp-")
    np.testing.assert_array_equal(sd.load_reference(path).loadings, built_reference.loadings)
    live = tmp_path / f".ref.zarr.tmp-{socket.gethostname().replace('-', '_')}-{os.getpid()}-0000abcd"
    live.mkdir()  # a save in progress in a live process: left alone
    r_reference.save(path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "ref.zarr"])
    assert sd.load_reference(path).params == {}


def test_overwrite_exchanges_the_stores_in_one_rename(tmp_path):
    """On Linux the old and new store swap places in one renameat2(RENAME_EXCHANGE)."""
    from symphony_dask._io.atomic import _exchange

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("old")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("new")
    if not _exchange(tmp_path / "b", tmp_path / "a"):
        pytest.skip("this system cannot exchange two paths in one rename")
    assert (tmp_path / "a" / "x").read_text() == "new" and (tmp_path / "b" / "x").read_text() == "old"


def test_path_that_is_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no reference store"):
        sd.load_reference(tmp_path / "missing.zarr")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a symphony_dask reference store"):
        sd.load_reference(tmp_path / "notes.txt")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3).attrs["x"] = 1
    with pytest.raises(ValueError, match="not a symphony_dask reference"):
        sd.load_reference(tmp_path / "other.zarr")


def _chunk_files(path, element):
    return sorted(f for f in (path / element).rglob("*") if f.is_file() and f.name != "zarr.json")


def _delete_chunk(path):
    _chunk_files(path, "embedding")[0].unlink()


def _truncate_chunk(path):
    f = _chunk_files(path, "loadings")[0]
    f.write_bytes(f.read_bytes()[:-7])


def _flip_byte(path):
    f = _chunk_files(path, "genes")[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def _delete_element(path):
    import shutil

    shutil.rmtree(path / "compression")


def _rewrite_element(path):
    import shutil

    shutil.rmtree(path / "std")
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        ad.io.write_elem(zarr.open_group(str(path), mode="a"), "std", np.ones(5))


@pytest.mark.parametrize(
    ("damage", "element"),
    [
        (_delete_chunk, "embedding"),
        (_truncate_chunk, "loadings"),
        (_flip_byte, "genes"),
        (_delete_element, "compression"),
        (_rewrite_element, "std"),
    ],
)
def test_damaged_store_is_refused_naming_the_element(built_reference, tmp_path, damage, element):
    """Any missing, truncated or altered file is refused before anything is read (zarr would read a
    missing chunk as zeros: 14-92% of labels then changed silently)."""
    path = built_reference.save(tmp_path / "ref.zarr")
    damage(path)
    with pytest.raises(ValueError, match=rf"reference store .*ref.zarr is damaged: {element} \("):
        sd.load_reference(path)


def test_unreadable_marker_names_the_store(built_reference, tmp_path):
    path = built_reference.save(tmp_path / "ref.zarr")
    meta = path / "zarr.json"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])
    with pytest.raises(
        ValueError, match=r"ref.zarr is a damaged store: its root metadata .*zarr.json is not valid JSON"
    ):
        sd.load_reference(path)
    marker = json.loads(text)
    marker["attributes"]["symphony_dask"]["version"] = "1"
    meta.write_text(json.dumps(marker))
    with pytest.raises(ValueError, match="version attribute is '1', not a version number"):
        sd.load_reference(path)


@pytest.mark.parametrize("version", [1, 2])
def test_store_without_checksums_is_refused(built_reference, tmp_path, version):
    """A store whose damage cannot be detected is not read (it was read with a warning before)."""
    path = built_reference.save(tmp_path / "ref.zarr")
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["symphony_dask"] = {"format": "symphony_dask.reference", "version": version}
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"carries no checksums \(store version {version}\).*build the reference"):
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
        from_elements(r_reference, cells=False, compression=r_reference.compression[:, :5])
    with pytest.raises(ValueError, match="obs has 3 rows but the embedding has 910 cells"):
        from_elements(r_reference, obs=r_reference.obs.iloc[:3])


def test_to_xarray_labels_every_element(built_reference):
    ds = built_reference.to_xarray()
    assert dict(ds.sizes) == {"gene": 1360, "pc": 20, "cluster": 100, "cell": 910, "umap_axis": 2}
    gene = str(built_reference.genes[7])
    np.testing.assert_array_equal(ds.loadings.sel(gene=gene).values, built_reference.loadings[7])
    np.testing.assert_array_equal(ds.compression.values, built_reference.compression)
    np.testing.assert_array_equal(ds.centroids.sel(cluster=3).values, built_reference.centroids[:, 3])
    assert ds.embedding.sel(cell=built_reference.obs.index[5]).shape == (20,)
    assert json.loads(ds.attrs["params"])["n_clusters"] == 100


def test_store_marker_keeps_its_format_name(built_reference, tmp_path):
    """Stores saved by earlier versions are recognized by this exact marker; it must never change."""
    path = built_reference.save(tmp_path / "ref.zarr")
    marker = json.loads((path / "zarr.json").read_text())["attributes"]["symphony_dask"]
    assert marker["format"] == "symphony_dask.reference" and marker["version"] == 3
