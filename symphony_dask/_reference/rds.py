"""R Symphony references (``saveRDS(buildReference(...))``) read in pure Python, with the ``rdata`` package.

The R object is a list: ``vargenes`` (symbol, mean, stddev), ``loadings`` (genes x d), ``centroids``
(Y_cos, d x k), ``cache`` (N_r as k x 1, C as k x d), ``Z_corr`` and ``Z_orig`` (d x cells), ``R``
(k x cells), ``meta_data`` (one row per cell) and, with ``do_umap=TRUE``, ``umap$embedding``
(cells x 2). The reference keeps R's numbers as they are; the R-weighted moments of ``Z_orig`` for
the mapping metrics are summed here from ``Z_orig`` and ``R``. R's UMAP coordinates become the
reference UMAP (every cell fitted), into which queries are then placed by our placement (the uwot
model file itself is not read: nothing from R is executed or unpickled). Each element is checked
for its R type and shape first: a file that is not such a list gets a ValueError naming the
element, what it should be and what it is.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd

from symphony_dask._embedding.umap_kernels import find_ab_params
from symphony_dask._embedding.umap_layout import UmapModel, UmapParams
from symphony_dask._reference.compression import compression_sums
from symphony_dask._reference.model import Reference

#: Elements every R Symphony reference has.
_REQUIRED = ("vargenes", "loadings", "centroids", "cache")


def read_symphony_rds(path: str | os.PathLike, *, umap_min_dist: float = 0.1, seed: int = 111) -> Reference:
    """Read an R Symphony reference saved with ``saveRDS``.

    Parameters
    ----------
    path
        The ``.rds`` file of ``buildReference`` (or ``buildReferenceFromHarmonyObj``).
    umap_min_dist
        The ``umap_min_dist`` the R reference was built with (R Symphony's default, 0.1): it sets the
        curve of the layout into which queries are placed.
    seed
        Seeds the placement of queries into R's UMAP.

    Returns
    -------
    Reference
        With R's loadings, scaling, centroids and compression terms; its cells' corrected
        embedding, ``obs`` (``meta_data``) and UMAP when the object holds them.
    """
    obj = _parse(Path(path))
    missing = [name for name in _REQUIRED if name not in obj]
    if missing:
        raise ValueError(
            f"{path} is not an R Symphony reference: it has no {', '.join(missing)} "
            f"(its elements: {', '.join(map(str, obj))})"
        )
    element = _Elements(Path(path), obj)
    vargenes = element.vargenes()
    g = len(vargenes)
    loadings = element.matrix("loadings", "the gene loadings U", (g, None))
    d = loadings.shape[1]
    centroids = element.matrix("centroids", "the centroids Y_cos", (d, None))
    k = centroids.shape[1]
    n_r, c = element.cache(k, d)
    embedding = obs = moments = layout = None
    if "Z_corr" in obj:
        embedding = element.matrix("Z_corr", "the corrected embedding", (d, None)).T
        n = embedding.shape[0]
        obs = _cells(obj, n, element)
        if "Z_orig" in obj and "R" in obj:
            z_orig = element.matrix("Z_orig", "the uncorrected embedding", (d, n))
            sums = compression_sums(z_orig.T, embedding, element.matrix("R", "the soft cluster assignments", (k, n)).T)
            moments = sums.pca_moments
        umap = obj.get("umap")
        if isinstance(umap, dict) and "embedding" in umap:
            coords = element.matrix("umap$embedding", "the UMAP coordinates", (n, 2), umap["embedding"])
            layout = _layout(coords, umap_min_dist, seed)
    reference = Reference.from_arrays(
        np.asarray(vargenes["symbol"], dtype=str),
        vargenes["mean"].to_numpy(dtype=np.float64),
        vargenes["stddev"].to_numpy(dtype=np.float64),
        loadings,
        centroids,
        n_r,
        c,
        embedding=embedding,
        obs=obs,
        pca_moments=moments,
        params={
            "source": f"R Symphony reference {Path(path).name}",
            "n_pcs": int(c.shape[1]),
            "n_clusters": int(c.shape[0]),
            "n_cells": None if embedding is None else len(embedding),
        },
    )
    reference.umap_layout = layout
    return reference


class _Elements:
    """The elements of a parsed R Symphony reference, each checked for its R type and shape.

    A mismatch raises a ValueError naming the file, the element, what it should be and what it is.
    """

    def __init__(self, path: Path, obj: dict) -> None:
        self.path, self.obj = path, obj

    def fail(self, name: str, expected: str, value: object) -> NoReturn:
        raise ValueError(
            f"{self.path} is not an R Symphony reference as buildReference saves it: {name} should be "
            f"{expected}, found {_describe(value)}"
        )

    def matrix(self, name: str, what: str, shape: tuple[int | None, int | None], value: object = None) -> np.ndarray:
        """Element ``name`` (or ``value``) as a float64 matrix of ``shape`` (``None``: any length)."""
        value = self.obj[name] if value is None else value
        array = np.asarray(value)
        if (
            array.ndim != 2
            or array.dtype.kind not in "biuf"
            or any(want is not None and got != want for got, want in zip(array.shape, shape, strict=True))
        ):
            rows, cols = ("any number of" if n is None else f"{n:,}" for n in shape)
            self.fail(name, f"{what}, a numeric matrix of {rows} rows x {cols} columns", value)
        return array.astype(np.float64)

    def vargenes(self) -> pd.DataFrame:
        """The variable genes: a data frame with a text ``symbol`` and numeric ``mean`` and ``stddev``."""
        table = self.obj["vargenes"]
        expected = "the variable genes, a data frame with columns symbol, mean and stddev (numeric)"
        if (
            not isinstance(table, pd.DataFrame)
            or not {"symbol", "mean", "stddev"} <= set(map(str, table.columns))
            or not all(pd.api.types.is_numeric_dtype(table[column]) for column in ("mean", "stddev"))
        ):
            self.fail("vargenes", expected, table)
        return table

    def cache(self, k: int, d: int) -> tuple[np.ndarray, np.ndarray]:
        """The compression terms: ``cache[[1]]`` (N_r, k values) and ``cache[[2]]`` (C, k x d)."""
        cache = self.obj["cache"]
        if not isinstance(cache, list) or len(cache) < 2:
            self.fail("cache", f"an unnamed list of the compression terms N_r ({k} x 1) and C ({k} x {d})", cache)
        n_r = np.asarray(cache[0])
        if n_r.dtype.kind not in "biuf" or n_r.size != k or n_r.ndim > 2 or (n_r.ndim == 2 and 1 not in n_r.shape):
            self.fail("cache[[1]]", f"N_r, the cells per cluster: {k} numbers (a {k} x 1 matrix)", cache[0])
        return n_r.astype(np.float64).ravel(), self.matrix("cache[[2]]", "C, the compression terms", (k, d), cache[1])


def _describe(value: object) -> str:
    """An R element in words: its type, and its shape or elements."""
    if isinstance(value, pd.DataFrame):
        columns = ", ".join(f"{name} ({_kind(value[name].dtype)})" for name in value.columns[:10])
        more = f" and {len(value.columns) - 10} more" if len(value.columns) > 10 else ""
        return f"a data frame of {len(value):,} rows with columns {columns}{more}"
    if isinstance(value, dict):
        return f"a named list with elements {', '.join(map(str, value))}"
    if isinstance(value, list):
        return f"an unnamed list of {len(value)} element(s)"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        array = np.asarray(value)
        if array.ndim == 2:
            form = f"matrix of {array.shape[0]:,} x {array.shape[1]:,}"
        else:
            form = {0: "value", 1: f"vector of length {array.size:,}"}.get(array.ndim, f"array of shape {array.shape}")
        return f"a {_kind(array.dtype)} {form}"
    return f"a {type(value).__name__}"


def _kind(dtype: np.dtype) -> str:
    """R's name for the type of values of ``dtype``."""
    if pd.api.types.is_bool_dtype(dtype):
        return "logical"
    if pd.api.types.is_integer_dtype(dtype):
        return "integer"
    return "numeric" if pd.api.types.is_numeric_dtype(dtype) else "text"


def _parse(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    import rdata

    try:
        with warnings.catch_warnings():  # tibbles are read as data frames, which they are
            warnings.filterwarnings("ignore", message="Missing constructor for R class")
            obj = rdata.conversion.convert(rdata.parser.parse_file(path))
    except Exception as err:  # rdata raises several types for what is not an RDS file
        raise ValueError(f"{path} could not be read as an R object (.rds written by saveRDS): {err}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds {_describe(obj)}, not the named list of an R Symphony reference")
    return {str(k): v for k, v in obj.items()}


def _cells(obj: dict, n: int, element: _Elements) -> pd.DataFrame:
    """The cells' metadata, indexed by cell id (R's rownames, else Z_corr's column names)."""
    meta = obj.get("meta_data")
    names = None
    z = obj["Z_corr"]
    if hasattr(z, "coords") and len(z.dims) == 2 and z.dims[1] in z.coords:
        names = pd.Index(np.asarray(z.coords[z.dims[1]].values, dtype=str))
    if meta is None:
        return pd.DataFrame(index=names if names is not None else pd.RangeIndex(n).astype(str))
    if not isinstance(meta, pd.DataFrame) or len(meta) != n:
        element.fail("meta_data", f"the cells' metadata, a data frame of one row per cell of Z_corr ({n:,})", meta)
    meta = meta.copy()
    meta.columns = [str(c) for c in meta.columns]
    if names is not None:
        meta.index = names
    meta.index = meta.index.astype(str)
    for column in meta.columns:  # R character vectors: plain strings, as anndata writes them by default
        if isinstance(meta[column].dtype, pd.StringDtype) or meta[column].dtype == object:
            meta[column] = meta[column].astype(object)
    return meta


def _layout(coords: np.ndarray, min_dist: float, seed: int) -> UmapModel:
    a, b = find_ab_params(1.0, min_dist)
    params = UmapParams(n_neighbors=30, min_dist=min_dist, a=a, b=b, seed=seed)
    return UmapModel(coords, np.arange(len(coords)), params)
