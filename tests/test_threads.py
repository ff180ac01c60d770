"""One Reference used from several threads at once: the same answers as one at a time, and the
process's BLAS thread limit exactly as it was afterwards."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from _helpers import from_elements
from threadpoolctl import threadpool_info

import symphony_dask as sd
from symphony_dask._dask.chunked import one_blas_thread_per_task


def _blas_threads() -> list[int]:
    return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]


@pytest.fixture(scope="module")
def hnsw_reference(built_reference):
    ref = from_elements(built_reference)
    ref.neighbor_index(method="hnsw", seed=3)
    return ref


def test_concurrent_label_transfer_with_different_k(hnsw_reference, pbmcs, oracle):
    """HNSW's query breadth depends on k and is a setting of the index: concurrent calls with
    different k must not use each other's."""
    query = sd.map_query(hnsw_reference, pbmcs[oracle.query_cells].copy(), "donor", normalize=False)
    ks = [1, 3, 5, 15, 30, 50]
    expected = {
        k: sd.transfer_labels(hnsw_reference, query.copy(), "cell_type", k=k).obs["cell_type_pred"].to_numpy()
        for k in ks
    }
    start = threading.Barrier(len(ks) * 4)

    def transfer(k: int) -> np.ndarray:
        start.wait()
        return sd.transfer_labels(hnsw_reference, query.copy(), "cell_type", k=k).obs["cell_type_pred"].to_numpy()

    for _ in range(3):
        with ThreadPoolExecutor(len(ks) * 4) as pool:
            runs = list(pool.map(transfer, ks * 4))
        for k, labels in zip(ks * 4, runs, strict=True):
            np.testing.assert_array_equal(labels, expected[k])


@pytest.mark.slow
def test_concurrent_hnsw_queries_use_their_own_breadth():
    """Queries with small k (breadth 64) beside queries with large k (breadth 4 k): each gives what
    it gives alone. Random 30-d points make HNSW approximate, so the breadth changes answers."""
    from symphony_dask._embedding.neighbors import NeighborIndex

    rng = np.random.default_rng(0)
    index = NeighborIndex.build(rng.normal(size=(8_000, 30)), method="hnsw", seed=1)
    x = rng.normal(size=(1_000, 30))
    alone = {k: index.query(x, k)[:, 0] for k in (1, 100)}
    assert (alone[1] != alone[100]).sum() > 0  # the breadth matters here
    start = threading.Barrier(8)

    def run(k: int) -> np.ndarray:
        start.wait()
        return index.query(x, k)[:, 0]

    for _ in range(5):
        with ThreadPoolExecutor(8) as pool:
            for k, nearest in zip([1, 100] * 4, pool.map(run, [1, 100] * 4), strict=True):
                np.testing.assert_array_equal(nearest, alone[k])


def test_blas_limit_is_restored_after_overlapping_uses():
    before = _blas_threads()
    entered, leave_first = threading.Event(), threading.Event()

    def first() -> None:
        with one_blas_thread_per_task():
            entered.set()
            leave_first.wait()

    thread = threading.Thread(target=first)
    thread.start()
    entered.wait()
    with one_blas_thread_per_task():  # enters while `first` holds the limit, leaves after it
        leave_first.set()
        thread.join()
    assert _blas_threads() == before


def test_concurrent_mapping_and_harmony_restore_blas(built_reference, pbmcs, oracle):
    before = _blas_threads()
    query = pbmcs[oracle.query_cells]
    single = sd.map_query(built_reference, query.copy(), "donor", normalize=False, chunk_size=50)
    z = np.asarray(built_reference.embedding)

    def work(i: int):
        if i % 2:
            return sd.harmonize(z, built_reference.obs, "donor", n_clusters=20, max_iter_harmony=2, seed=i).Z_corr
        return sd.map_query(built_reference, query.copy(), "donor", normalize=False, chunk_size=50).obsm["X_symphony"]

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(work, range(12)))
    for i in range(0, 12, 2):
        np.testing.assert_array_equal(results[i], single.obsm["X_symphony"])
    assert all(results[i].shape == z.shape for i in range(1, 12, 2))
    assert _blas_threads() == before
