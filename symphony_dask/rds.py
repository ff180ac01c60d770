"""R Symphony references (``saveRDS(buildReference(...))``) read in pure Python, with the ``rdata`` package.

The R object is a list: ``vargenes`` (symbol, mean, stddev), ``loadings`` (genes x d), ``centroids``
(Y_cos, d x k), ``cache`` (N_r as k x 1, C as k x d), ``Z_corr`` and ``Z_orig`` (d x cells), ``R``
(k x cells), ``meta_data`` (one row per cell) and, with ``do_umap=TRUE``, ``umap$embedding``
(cells x 2). The reference keeps R's numbers as they are; the R-weighted moments of ``Z_orig`` for
the mapping metrics are summed here from ``Z_orig`` and ``R``. R's UMAP coordinates become the
reference UMAP (every cell fitted), into which queries are then placed by our placement (the uwot
model file itself is not read: nothing from R is executed or unpickled).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .compression import compression_sums
from .reference import Reference
from .umap_layout import UmapModel, UmapParams

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
        raise ValueError(f"{path} is not an R Symphony reference: it has no {', '.join(missing)} "
                         f"(its elements: {', '.join(map(str, obj))})")
    vargenes = obj["vargenes"]
    n_r, c = (np.asarray(part, dtype=np.float64) for part in obj["cache"][:2])
    embedding = obs = moments = layout = None
    if "Z_corr" in obj:
        z_corr = np.asarray(obj["Z_corr"], dtype=np.float64).T
        embedding = z_corr
        obs = _cells(obj, z_corr.shape[0])
        if "Z_orig" in obj and "R" in obj:
            sums = compression_sums(np.asarray(obj["Z_orig"], dtype=np.float64).T, z_corr,
                                    np.asarray(obj["R"], dtype=np.float64).T)
            moments = sums.pca_moments
        umap = obj.get("umap")
        if isinstance(umap, dict) and "embedding" in umap:
            layout = _layout(np.asarray(umap["embedding"], dtype=np.float64), umap_min_dist, seed)
    reference = Reference.from_arrays(
        np.asarray(vargenes["symbol"], dtype=str), np.asarray(vargenes["mean"], dtype=np.float64),
        np.asarray(vargenes["stddev"], dtype=np.float64), np.asarray(obj["loadings"], dtype=np.float64),
        np.asarray(obj["centroids"], dtype=np.float64), n_r.ravel(), c, embedding=embedding, obs=obs,
        pca_moments=moments,
        params={"source": f"R Symphony reference {Path(path).name}", "n_pcs": int(c.shape[1]),
                "n_clusters": int(c.shape[0]), "n_cells": None if embedding is None else int(len(embedding))},
    )
    reference.umap_layout = layout
    return reference


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
        raise ValueError(f"{path} holds an R {type(obj).__name__}, not the list of an R Symphony reference")
    return {str(k): v for k, v in obj.items()}


def _cells(obj: dict, n: int) -> pd.DataFrame:
    """The cells' metadata, indexed by cell id (R's rownames, else Z_corr's column names)."""
    meta = obj.get("meta_data")
    names = None
    z = obj["Z_corr"]
    if hasattr(z, "coords") and len(z.dims) == 2 and z.dims[1] in z.coords:
        names = pd.Index(np.asarray(z.coords[z.dims[1]].values, dtype=str))
    if not isinstance(meta, pd.DataFrame) or len(meta) != n:
        return pd.DataFrame(index=names if names is not None else pd.RangeIndex(n).astype(str))
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
    from .umap_layout import _umap

    a, b = _umap().umap_.find_ab_params(1.0, min_dist)
    params = UmapParams(n_neighbors=30, min_dist=min_dist, a=float(a), b=float(b), seed=seed)
    return UmapModel(coords, np.arange(len(coords)), params)
