"""Our UMAP kernels: umap-learn's smoothing and curve, a deterministic layout that keeps the neighbors."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

from symphony_dask._embedding.umap_kernels import component_places, find_ab_params, fit_layout, smooth_knn_dist
from symphony_dask._embedding.umap_layout import _cosine_neighbors, _unit_rows, fit_umap


@pytest.fixture(scope="module")
def umap_learn():
    """umap-learn's ``umap_`` module, the oracle (a test dependency only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("umap.umap_")


@pytest.fixture(scope="module")
def embedding(oracle) -> np.ndarray:
    """R Symphony's corrected embedding of the 910 reference cells."""
    return oracle.per_cell("ref_Z_corr", oracle.ref_cells)


@pytest.fixture(scope="module")
def model(embedding):
    return fit_umap(embedding, seed=111)


@pytest.mark.slow
@pytest.mark.parametrize("local_connectivity", [1.0, 0.0, 1.5])
def test_smooth_knn_dist_is_umap_learns(embedding, umap_learn, local_connectivity):
    """Fitting (each cell its own first neighbor, local connectivity 1) and placement (0)."""
    _, distances = _cosine_neighbors(embedding, embedding, 30)
    for d in (distances, distances[:, 1:]):
        d = d.astype(np.float32)
        sigmas, rhos = smooth_knn_dist(d, 30.0, local_connectivity=local_connectivity)
        theirs = umap_learn.smooth_knn_dist(d, 30.0, local_connectivity=local_connectivity)
        np.testing.assert_allclose(sigmas, theirs[0], rtol=1e-6)  # observed: identical
        np.testing.assert_allclose(rhos, theirs[1], rtol=1e-6)


@pytest.mark.parametrize("min_dist", [0.1, 0.3])
def test_curve_is_umap_learns(umap_learn, min_dist):
    np.testing.assert_allclose(find_ab_params(1.0, min_dist), umap_learn.find_ab_params(1.0, min_dist), rtol=1e-6)


@pytest.mark.slow
def test_layout_is_the_same_in_every_fit_and_process(embedding, model, tmp_path):
    np.testing.assert_array_equal(fit_umap(embedding, seed=111).coords, model.coords)
    np.save(tmp_path / "embedding.npy", embedding)
    script = (
        "import sys, numpy as np; from symphony_dask._embedding.umap_layout import fit_umap; "
        "np.save(sys.argv[1], fit_umap(np.load(sys.argv[2]), seed=111).coords)"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "coords.npy"), str(tmp_path / "embedding.npy")], check=True
    )
    np.testing.assert_array_equal(np.load(tmp_path / "coords.npy"), model.coords)
    few = embedding[:200]
    assert not np.array_equal(fit_umap(few, seed=112).coords, fit_umap(few, seed=111).coords)


def test_layout_keeps_the_neighbors(embedding, model):
    trustworthiness = pytest.importorskip("sklearn.manifold").trustworthiness  # with umap-learn
    score = trustworthiness(_unit_rows(embedding), model.coords, n_neighbors=15)
    print(f"trustworthiness (15 neighbors): {score:.3f}")  # observed 0.963 (umap-learn: 0.964)
    assert score >= 0.9


def test_components_are_laid_out_apart():
    """Eight far-apart groups whose neighborhoods do not meet (eight components of the graph): each
    group is laid out around its own place, away from the others."""
    rng = np.random.default_rng(0)
    centers = _unit_rows(rng.normal(size=(8, 10)))
    groups = np.repeat(np.arange(8), 40)
    data = _unit_rows(centers[groups] + rng.normal(scale=0.02, size=(320, 10)))
    neighbors, distances = _cosine_neighbors(data, data, 15)
    assert np.all(groups[neighbors] == groups[:, None])
    a, b = find_ab_params(1.0, 0.1)
    coords = fit_layout(neighbors, distances, data, a=a, b=b, seed=1)
    assert np.all(np.isfinite(coords))
    centroids = np.array([coords[groups == g].mean(axis=0) for g in range(8)])
    nearest = np.argmin(((coords[:, None, :] - centroids[None]) ** 2).sum(axis=2), axis=1)
    np.testing.assert_array_equal(nearest, groups)
    places = component_places(data, groups, 8)
    assert places.shape == (8, 2) and np.abs(places).max() == 1.0
