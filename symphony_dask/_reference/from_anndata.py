"""A Symphony reference from an integration the user already has: scanpy's layout, or a harmonypy result.

scanpy leaves what Symphony's compression needs in the AnnData: ``sc.pp.scale`` the genes' means
and standard deviations (``var['mean']``, ``var['std']``), ``sc.pp.pca`` the loadings
(``varm['PCs']``, zero rows for genes left out of the PCA) and the PCs (``obsm['X_pca']``), and
Harmony the corrected PCs (``obsm['X_pca_harmony']``). With Harmony's soft assignments ``R`` this
is R Symphony's ``buildReferenceFromHarmonyObj``; without them, soft clusters are fitted on the
corrected embedding by Symphony's soft k-means (the no-batch path of ``buildReference``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from symphony_dask._reference.compression import compression_sums
from symphony_dask._reference.model import Reference


def reference_from_anndata(
    adata,
    *,
    corrected_key: str = "X_pca_harmony",
    pca_key: str | None = "X_pca",
    loadings_key: str = "PCs",
    mean_key: str = "mean",
    std_key: str = "std",
    R: np.ndarray | None = None,
    n_clusters: int | None = None,
    sigma: float = 0.1,
    seed: int = 111,
) -> Reference:
    """Build a Symphony reference from an integrated AnnData (scanpy's layout).

    Parameters
    ----------
    adata
        Reference cells with ``obsm[corrected_key]`` (cells x d), ``varm[loadings_key]`` (genes x d)
        and ``var[mean_key]``, ``var[std_key]``: the scaling the PCA was computed on. Queries are
        scaled with these (and clipped to +-10, as Symphony does) before projection.
    corrected_key
        ``obsm`` key of the integrated (Harmony-corrected) PCs.
    pca_key
        ``obsm`` key of the PCs before correction, for the mapping metrics' moments; ``None`` to skip.
    loadings_key
        ``varm`` key of the PCA loadings; genes whose loadings are all zero (left out of the PCA) are
        not reference genes.
    mean_key, std_key
        ``var`` columns of the scaling.
    R
        Soft cluster assignments (cells x k, rows summing to 1), e.g. harmonypy's ``R`` transposed;
        ``None``: soft k-means with ``n_clusters`` clusters on the corrected embedding.
    n_clusters
        Clusters of that soft k-means; default ``min(100, round(cells / 30))``.
    sigma
        Soft k-means entropy regularization (also what mapping uses).
    seed
        Seeds the soft k-means start.
    """
    from symphony_dask._harmony.harmonize import default_n_clusters, soft_kmeans

    z_corr = _obsm(adata, corrected_key)
    loadings_all = np.asarray(_element(adata.varm, loadings_key, "varm"), dtype=np.float64)
    d = loadings_all.shape[1]
    if z_corr.shape[1] != d:
        raise ValueError(
            f"obsm[{corrected_key!r}] has {z_corr.shape[1]} dimensions but varm[{loadings_key!r}] "
            f"has {d} PCs; they must come from the same PCA"
        )
    genes = np.flatnonzero(np.any(loadings_all != 0, axis=1))
    if len(genes) == 0:
        raise ValueError(f"varm[{loadings_key!r}] is all zero")
    mean = _var(adata, mean_key)[genes]
    std = _var(adata, std_key)[genes]
    if np.any(~np.isfinite(std)) or np.any(std <= 0):
        raise ValueError(f"var[{std_key!r}] has zero, negative or missing values for genes in the PCA")
    z_orig = None if pca_key is None else _obsm(adata, pca_key)
    if z_orig is not None and z_orig.shape != z_corr.shape:
        raise ValueError(f"obsm[{pca_key!r}] has shape {z_orig.shape} but obsm[{corrected_key!r}] {z_corr.shape}")
    n = z_corr.shape[0]
    if R is None:
        k = default_n_clusters(n) if n_clusters is None else int(n_clusters)
        R = np.asarray(soft_kmeans(z_corr, k, sigma=sigma, seed=seed).R)
        how = f"soft k-means, {k} clusters, seed {seed}"
    else:
        R = np.asarray(R, dtype=np.float64)
        if R.ndim != 2 or R.shape[0] != n:
            raise ValueError(
                f"R must be cells x clusters with {n} cells, got shape {R.shape} "
                "(harmonypy's R is clusters x cells: pass its transpose)"
            )
        if np.any(R < 0) or np.abs(R.sum(axis=1) - 1).max() > 1e-6:
            raise ValueError("R must hold soft assignments: non-negative rows that sum to 1")
        how = "given R"
    sums = compression_sums(z_corr if z_orig is None else z_orig, z_corr, R)
    return Reference.from_arrays(
        adata.var_names[genes],
        mean,
        std,
        loadings_all[genes],
        sums.centroids,
        sums.cluster_sizes,
        sums.compression,
        embedding=z_corr,
        obs=adata.obs.copy(),
        pca_moments=None if z_orig is None else sums.pca_moments,
        params={
            "source": "reference_from_anndata",
            "corrected_key": corrected_key,
            "pca_key": pca_key,
            "clusters": how,
            "sigma": sigma,
            "n_clusters": int(R.shape[1]),
            "n_pcs": d,
            "n_cells": n,
        },
    )


def _element(mapping, key: str, where: str):
    if key not in mapping:
        keys = ", ".join(map(repr, mapping.keys())) or "(none)"
        raise ValueError(f"{key!r} is not in the AnnData's {where}; its keys are: {keys}")
    return mapping[key]


def _obsm(adata, key: str) -> np.ndarray:
    value = _element(adata.obsm, key, "obsm")
    value = value.to_numpy() if isinstance(value, pd.DataFrame) else np.asarray(value)
    return np.asarray(value, dtype=np.float64)


def _var(adata, key: str) -> np.ndarray:
    if key not in adata.var.columns:
        cols = ", ".join(map(repr, adata.var.columns)) or "(none)"
        raise ValueError(
            f"{key!r} is not a column of the AnnData's var (sc.pp.scale writes 'mean' and 'std'); "
            f"its columns are: {cols}"
        )
    return adata.var[key].to_numpy(dtype=np.float64)
