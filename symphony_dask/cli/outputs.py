"""What the command line writes: mapped AnnData files and pictures, and how it knows them again.

``--overwrite`` replaces only outputs that these functions recognise as written by symphony_dask.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import anndata as ad

#: Output suffixes of a mapped query (one query file).
MAPPED_SUFFIXES = (".h5ad", ".zarr")
#: Picture formats of --plot.
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


#: Written into the metadata of every picture of --plot, so that --overwrite knows it replaces one of ours.
PICTURE_MARK = "symphony_dask map --plot"


def is_our_picture(path: Path) -> bool:
    """Whether ``path`` is a picture that ``map --plot`` drew (a file carrying :data:`PICTURE_MARK`)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file() or path.suffix.lower() not in PLOT_SUFFIXES:
        return False
    if path.stat().st_size > 64 * 2**20:
        return False
    return PICTURE_MARK.encode() in path.read_bytes()


def is_mapped_anndata(path: Path) -> bool:
    """Whether ``path`` is an AnnData (``.h5ad`` or zarr) with ``uns['symphony']``: a mapped query.

    Such a file is what ``--overwrite`` may replace.
    """
    path = Path(path)
    if path.is_symlink():
        return False
    if path.is_dir():
        node = path / "uns" / "symphony"
        return node.is_dir() and ((node / "zarr.json").is_file() or (node / ".zgroup").is_file())
    if not path.is_file():
        return False
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return isinstance(handle.get("uns/symphony"), h5py.Group)
    except OSError:
        return False


def write_anndata(adata: ad.AnnData, path: Path, suffix: str) -> None:
    """Write ``adata`` as ``.h5ad`` or as a zarr v3 store (one chunk file per array, no sharding).

    An ``.h5ad`` is assembled in memory and written to ``path`` in one plain write: HDF5 writing
    straight to a disk that fills up crashes the process (h5py 3, segmentation fault), where a plain
    write fails with an error that names the full disk.
    """
    import anndata as ad
    import h5py

    if suffix != ".zarr":
        adata.strings_to_categoricals()  # as write_h5ad does
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as handle:
            ad.io.write_elem(handle, "/", adata)
        with open(path, "wb") as out:
            out.write(buffer.getbuffer())
            out.flush()
            os.fsync(out.fileno())
        return
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False), warnings.catch_warnings():
        # anndata consolidates the metadata, as every AnnData zarr store has (read_zarr expects it)
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        adata.write_zarr(path)


def stem(path: str) -> str:
    """A query file's name without its AnnData suffix (the stem of its mapped output's name)."""
    name = Path(path).name
    for suffix in MAPPED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
