"""The neighbor index: HNSW (faiss) against exact search, seeded graphs, and stores from older versions."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import from_elements
from scipy.spatial import cKDTree

import symphony_dask as sd
from symphony_dask._embedding.neighbors import NeighborIndex, hnsw_graph, hnsw_search


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Cells of 25 types with unequal spreads, as a corrected embedding looks."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 25, n)
    centers = np.random.default_rng(99).normal(size=(25, d)) * 2.0
    return centers[types] + rng.normal(size=(n, d)) * rng.uniform(0.2, 0.6, 25)[types, None]


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, b)) / exact.shape[1] for a, b in zip(found, exact, strict=True)]))


def test_hnsw_finds_the_exact_neighbors_of_nearly_every_cell():
    reference, queries = _clustered(20_000, 20, seed=0), _clustered(2_000, 20, seed=1)
    exact = cKDTree(reference).query(queries, k=5)[1]
    index = NeighborIndex.build(reference, method="hnsw", seed=0)
    assert _recall(index.query(queries, 5), exact) >= 0.99  # observed 0.998
    auto = NeighborIndex.build(reference, method="auto")
    assert auto.method == "exact"  # 20,000 cells: still searched exactly
    np.testing.assert_array_equal(auto.query(queries, 5), exact)


def test_hnsw_graph_is_seeded():
    points, queries = _clustered(5_000, 30, seed=2), np.random.default_rng(3).normal(size=(500, 30)) * 3
    first, again, other = (hnsw_graph(points, seed=s) for s in (4, 4, 5))
    found = hnsw_search(first, queries, 10, ef=10)[0]
    np.testing.assert_array_equal(hnsw_search(again, queries, 10, ef=10)[0], found)
    assert not np.array_equal(hnsw_search(other, queries, 10, ef=10)[0], found)  # another graph


def test_inner_product_graph_gives_cosine_neighbors():
    """UMAP placement searches unit vectors by inner product (k = 30, breadth 100)."""
    from symphony_dask._embedding.umap_layout import HNSW_EF, _unit_rows

    fitted, cells = _unit_rows(_clustered(20_000, 20, seed=4)), _unit_rows(_clustered(1_000, 20, seed=5))
    exact = cKDTree(fitted).query(cells, k=30)[1]
    found, products = hnsw_search(hnsw_graph(fitted, inner_product=True), cells, 30, HNSW_EF)
    assert _recall(found, exact) >= 0.99
    np.testing.assert_allclose(products, np.einsum("nd,nkd->nk", cells, fitted[found]), atol=1e-5)


@pytest.mark.slow
def test_index_from_an_older_version_is_rebuilt_not_trusted(built_reference, tmp_path, monkeypatch):
    ref = from_elements(built_reference)
    ref.neighbor_index(method="hnsw")
    with monkeypatch.context() as patch:
        patch.setattr("symphony_dask._reference.store.INDEX_FORMAT", "hnswlib")  # as an older version saved it
        ref.save(tmp_path / "ref.zarr")
    with pytest.warns(UserWarning, match="older version"):
        loaded = sd.load_reference(tmp_path / "ref.zarr")
    assert loaded.neighbors is None
