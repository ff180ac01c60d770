"""Chunked Harmony: agreement with R Harmony, chunk and scheduler independence, memory, bad input."""

from __future__ import annotations

import gc
import logging
import os
import signal

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
from _helpers import NO_SPILL, OnMessage
from distributed import Client

import symphony_dask as sd
from symphony_dask._harmony.chunk import ChunkGroup, CorrectionStep, RunSpec
from symphony_dask._harmony.cluster import groups as harmony_groups
from symphony_dask._harmony.kernels import PenaltyTerms
from symphony_dask._harmony.piece import Piece
from symphony_dask._mapping.metrics import lisi
from symphony_dask._reference.compression import compression_sums

TOL = 1e-10


def test_matches_r_harmony_per_pc(pbmc3500):
    z, meta, r_corrected = pbmc3500
    res = sd.harmonize(z, meta, "donor")
    r = [np.corrcoef(res.Z_corr[:, i], r_corrected[:, i])[0, 1] for i in range(z.shape[1])]
    assert min(r) >= 0.99  # observed 0.9987
    # r is blind to scale and offset: the RMSE per PC, relative to the PC's spread, is not
    rmse = np.sqrt(((res.Z_corr - r_corrected) ** 2).mean(axis=0)) / r_corrected.std(axis=0)
    assert rmse.max() <= 0.075  # observed 0.051 (median 0.029)
    np.testing.assert_allclose(res.R.sum(axis=1), 1.0, rtol=1e-12)
    assert res.centroids.shape == (30, 100)
    assert np.all(np.diff(res.objective) < 0)  # each Harmony iteration lowers the objective


@pytest.mark.parametrize("n_chunks", [3, 7])
def test_chunking_does_not_change_results(pbmc3500, n_chunks):
    z, meta, _ = pbmc3500
    kw = dict(max_iter_harmony=3, max_iter_cluster=8, seed=3)
    one = sd.harmonize(z, meta, "donor", **kw)
    size = -(-len(z) // n_chunks)
    many = sd.harmonize(z, meta, "donor", chunk_size=size, **kw)
    lazy = sd.harmonize(da.from_array(z, chunks=(size, -1)), meta, "donor", **kw)
    assert lazy.Z_corr.chunks[0] == lazy.R.chunks[0] == da.from_array(z, chunks=(size, -1)).chunks[0]
    for res in (many, lazy):
        assert np.abs(np.asarray(res.Z_corr) - one.Z_corr).max() <= TOL
        assert np.abs(np.asarray(res.R) - one.R).max() <= TOL
        assert res.n_iter == one.n_iter


def test_assignment_pieces_are_r(pbmc3500, monkeypatch):
    """``map_assignment_pieces`` (the build's compression sums R one piece at a time) hands each
    kernel call its rows of the aligned arrays and of R."""
    monkeypatch.setattr("symphony_dask._harmony.piece.PIECE_CELLS", 400)
    z, meta, _ = pbmc3500
    lazy = sd.harmonize(da.from_array(z, chunks=(1200, -1)), meta, "donor", max_iter_harmony=2, seed=3)
    rows = da.arange(len(z), chunks=500)
    parts = dask.compute(*lazy.map_assignment_pieces(lambda i, r: (i, r), rows))
    # chunks of 1200, 1200 and 1100 cells, three pieces each
    assert [len(i) for i, _ in parts] == [400] * 6 + [367, 366, 367]
    assert np.array_equal(np.concatenate([i for i, _ in parts]), np.arange(len(z)))
    assert np.array_equal(np.vstack([r for _, r in parts]), lazy.R.compute())
    with pytest.raises(ValueError, match="dask input"):
        sd.harmonize(z, meta, "donor", max_iter_harmony=1, seed=3).map_assignment_pieces(lambda r: r)


@pytest.fixture()
def small_groups(monkeypatch):
    """Let a few thousand cells fill several chunk groups (one per worker)."""
    monkeypatch.setattr(harmony_groups, "MIN_GROUP_CELLS", 1000)


@pytest.fixture(scope="module")
def two_workers(module_local_cluster):
    cluster, _ = module_local_cluster(n_workers=2, processes=True, client=False)
    return cluster


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.parametrize("groups", [1, 2])
def test_threads_and_process_cluster_agree(pbmc3500, two_workers, monkeypatch, groups):
    """One group (the whole iteration on one worker) or two (a leader and a peer): as on threads."""
    if groups == 2:
        monkeypatch.setattr(harmony_groups, "MIN_GROUP_CELLS", 1000)
    z, meta, _ = pbmc3500
    kw = dict(max_iter_harmony=2, max_iter_cluster=6, seed=5)
    lazy = da.from_array(z, chunks=(1000, -1))
    threaded = sd.harmonize(lazy, meta, "donor", **kw)
    expected = (threaded.Z_corr.compute(), threaded.R.compute())
    made = []
    monkeypatch.setattr(harmony_groups, "ClusterGroups", _recording(made))
    with Client(two_workers):
        res = sd.harmonize(lazy, meta, "donor", **kw)
        assert len(made[0]) == groups
        assert np.abs(res.Z_corr.compute() - expected[0]).max() <= TOL
        assert np.abs(res.R.compute() - expected[1]).max() <= TOL
        numpy_in = sd.harmonize(z, meta, "donor", **kw)  # NumPy in, NumPy out
        assert isinstance(numpy_in.Z_corr, np.ndarray)
        assert np.abs(numpy_in.Z_corr - expected[0]).max() <= TOL


def _recording(made: list):
    class Recording(harmony_groups.ClusterGroups):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    return Recording


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.parametrize("victim", ["leader", "peer"])
def test_a_lost_worker_gives_the_identical_result(pbmc3500, small_groups, monkeypatch, caplog, victim, local_cluster):
    """SIGKILL the worker of the leading group or of a peer between Harmony iterations: the group is
    rebuilt on the restarted worker from the PCs and the corrections so far, bit for bit."""
    z, meta, _ = pbmc3500
    lazy = da.from_array(z, chunks=(700, -1))
    kw = dict(max_iter_harmony=4, max_iter_cluster=5, seed=7)
    made = []
    monkeypatch.setattr(harmony_groups, "ClusterGroups", _recording(made))
    cluster, client = local_cluster(n_workers=2, processes=True)
    with cluster, client:
        expected = sd.harmonize(lazy, meta, "donor", **kw)
        expected = (expected.Z_corr.compute(), expected.R.compute())

        def kill() -> None:
            address = made[-1].workers[0 if victim == "leader" else 1]
            pid = client.run(os.getpid, workers=[address])[address]
            os.kill(pid, signal.SIGKILL)

        handler = OnMessage("Harmony iteration 2:", kill)
        logging.getLogger("symphony_dask").addHandler(handler)
        try:
            with caplog.at_level(logging.INFO, logger="symphony_dask"):
                res = sd.harmonize(lazy, meta, "donor", **kw)
                z_corr, r = res.Z_corr.compute(), res.R.compute()
        finally:
            logging.getLogger("symphony_dask").removeHandler(handler)
    assert handler.fired
    assert "lost with its worker; rebuilt" in caplog.text
    np.testing.assert_array_equal(z_corr, expected[0])
    np.testing.assert_array_equal(r, expected[1])


def test_outputs_are_recomputed_from_the_log_when_the_groups_are_gone(pbmc3500, caplog):
    """An output chunk is a function of the chunk's PCs and the correction log: what dask recomputes
    after losing it equals what the group gave."""
    z, meta, _ = pbmc3500
    res = sd.harmonize(da.from_array(z, chunks=(1200, -1)), meta, "donor", max_iter_harmony=3, seed=2)
    r = res.R.compute()
    res._groups = None
    gc.collect()
    with caplog.at_level(logging.INFO, logger="symphony_dask"):
        again = res.R.compute()
    assert "replaying 3 correction(s)" in caplog.text
    np.testing.assert_array_equal(again, r)


@pytest.mark.slow
@pytest.mark.cluster
def test_workers_with_less_memory_than_r_integrate_by_chunks(local_cluster):
    """500,000 cells x k = 200: R alone is 800 MB, each worker may use 600 MiB (spilling off)."""
    n, k = 500_000, 200
    batch = np.random.default_rng(0).integers(0, 4, n)
    meta = pd.DataFrame({"batch": batch.astype(str)})
    with dask.config.set(NO_SPILL):
        cluster, client = local_cluster(n_workers=2, memory_limit="600MiB")
        with cluster, client:
            client.wait_for_workers(2)
            pids = client.run(os.getpid)
            z = da.random.RandomState(0).normal(size=(n, 10), chunks=(50_000, 10))
            z = z + da.from_array(batch[:, None] * 0.5, chunks=(50_000, 1))
            res = sd.harmonize(z, meta, "batch", n_clusters=k, max_iter_harmony=1, max_iter_cluster=3, n_init=1)
            assert n * k * 8 > 600 * 2**20
            assert res.Z_corr.shape == (n, 10)
            means = [float(res.Z_corr[batch == b, 0].mean().compute()) for b in range(4)]
            before = [float(z[batch == b, 0].mean().compute()) for b in range(4)]
            assert np.ptp(means) < 0.5 * np.ptp(before)  # the batch shift is mostly removed
            assert float(res.R[:1000].sum(axis=1).mean().compute()) == pytest.approx(1.0)
            assert client.run(os.getpid) == pids, "a worker was restarted"


def test_splitA_mapping_through_our_harmony(pbmcs, oracle):
    """R's pre-Harmony PCs through our Harmony; R's query mapped onto the result; vs R's Z_corr."""
    z_orig = oracle.per_cell("ref_Z_orig", oracle.ref_cells)
    obs = pbmcs.obs.loc[oracle.ref_cells]
    res = sd.harmonize(z_orig, obs, "donor", n_clusters=100, max_iter_harmony=20, seed=111)
    sums = compression_sums(z_orig, res.Z_corr, res.R)
    vg = oracle.vargenes
    ref = sd.Reference.from_arrays(
        vg["symbol"],
        vg["mean"],
        vg["stddev"],
        oracle.matrix("loadings_U"),
        sums.centroids,
        sums.cluster_sizes,
        sums.compression,
        embedding=res.Z_corr,
        obs=obs,
    )
    query = sd.map_query(ref, pbmcs[oracle.query_cells].copy(), "donor", normalize=False)
    sd.transfer_labels(ref, query, "cell_type")
    accuracy = sd.evaluate(query.obs["cell_type"], query.obs["cell_type_pred"])["accuracy"]
    assert accuracy >= 0.917241379310345 - 0.01
    r_lisi = lisi(oracle.per_cell("ref_Z_corr", oracle.ref_cells), obs["donor"]).mean()
    our_lisi = lisi(res.Z_corr, obs["donor"]).mean()
    assert abs(our_lisi - r_lisi) <= 0.05 * r_lisi


def test_lisi_counts_mixed_categories():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    mixed = lisi(x, rng.integers(0, 2, 400))
    separated = lisi(np.r_[x[:200], x[200:] + 100], np.r_[np.zeros(200), np.ones(200)])
    assert mixed.mean() > 1.8 and separated.max() < 1.0001


def test_a_correction_is_applied_once(pbmc3500):
    """A piece's correction is a pure function; a group applies correction v once, and a repeated
    request (a step redone after another group was lost) returns the same result."""
    z, _, _ = pbmc3500
    spec = RunSpec(
        n_patterns=1, n_blocks=4, key=1, sigma=0.1, terms=PenaltyTerms(np.ones((1, 1)), np.array([]), np.array([]))
    )
    y = np.linalg.qr(np.random.default_rng(0).normal(size=(30, 30)))[0][:, :5]
    step = CorrectionStep(y, np.ones((4, 1, 5)), np.full((1, 5, 30), 0.1), final=True)
    piece = Piece.create(z[:500], np.zeros(500, dtype=int), 0, spec)
    before = piece.z_corr.copy()
    first, again = piece.corrected_state(step, 0.1), piece.corrected_state(step, 0.1)
    np.testing.assert_array_equal(piece.z_corr, before)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    group = ChunkGroup(None, [(0, 0, z[:500], np.zeros(500, dtype=int))], spec, n_threads=2)
    sums = group.correct(1, step)
    np.testing.assert_array_equal(group.correct(1, step), sums)
    np.testing.assert_array_equal(group.output(0, "corrected")[piece.perm], first[0])
    with pytest.raises(RuntimeError, match="correction 3 cannot follow correction 1"):
        group.correct(3, step)


def test_single_level_batch_falls_back_to_soft_kmeans(pbmc3500):
    z, meta, _ = pbmc3500
    meta = meta.assign(one="x")
    with (
        pytest.warns(UserWarning, match="'one' has a single level"),
        pytest.warns(UserWarning, match="soft k-means without correction"),
    ):
        res = sd.harmonize(z[:600], meta.iloc[:600], "one", n_clusters=10)
    np.testing.assert_array_equal(res.Z_corr, z[:600])
    assert res.n_iter == 0 and res.R.shape == (600, 10)


def test_bad_harmony_input(pbmc3500):
    z, meta, _ = pbmc3500
    bad = z.copy()
    bad[[3, 7], 0] = np.nan
    bad[9, 1] = np.inf
    with pytest.raises(ValueError, match=r"Z holds 3 NaN or infinite value\(s\)"):
        sd.harmonize(bad, meta, "donor")
    with pytest.raises(ValueError, match="n_clusters=5000 is impossible with 3500 cells; try n_clusters=100"):
        sd.harmonize(z, meta, "donor", n_clusters=5000)
    with pytest.raises(ValueError, match="meta has 10 rows but Z has 3500 cells"):
        sd.harmonize(z, meta.iloc[:10], "donor")
    tiny = meta.copy()
    tiny.loc[0, "donor"] = "D"
    with pytest.warns(UserWarning, match="batch 'D' of 'donor' has 1 cell"):
        sd.harmonize(z, tiny, "donor", max_iter_harmony=1)


def test_build_without_batch_keys_clusters_without_correcting(split):
    ref_cells, _ = split
    ref = sd.build_reference(ref_cells, normalize=False, n_hvg=1000, hvg_batch_key="donor", n_clusters=30)
    mapped = sd.map_query(ref, ref_cells.copy(), normalize=False)
    assert ref.params["harmony_iterations"] == 0
    np.testing.assert_allclose(ref.cluster_sizes.sum(), 910)
    # without batches the embedding is the PCA projection of the reference cells
    np.testing.assert_allclose(mapped.obsm["X_symphony_pca"], ref.embedding, atol=1e-10)


@pytest.mark.slow
def test_several_batch_variables_with_their_own_theta(pbmc3500):
    z, meta, _ = pbmc3500
    meta = meta.assign(lane=np.where(np.arange(len(meta)) % 3 == 0, "L1", "L2"))
    res = sd.harmonize(z, meta, ["donor", "lane"], theta=[2.0, 1.0], tau=[0.0, 5.0], max_iter_harmony=3)
    assert res.Z_corr.shape == z.shape
    single = sd.harmonize(z, meta, "donor", max_iter_harmony=3)
    assert not np.allclose(res.Z_corr, single.Z_corr)  # the second variable takes part
    with pytest.raises(ValueError, match=r"theta=\[1.0, 2.0, 3.0\]: .* one value or one per batch key \(2\), got 3"):
        sd.harmonize(z, meta, ["donor", "lane"], theta=[1.0, 2.0, 3.0])
