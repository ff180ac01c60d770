"""One-block kernels against the formulas they implement, written out directly."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from symphony_dask._dask.chunked import map_reduce, map_rows, tree_reduce
from symphony_dask._harmony.harmonize import harmonize
from symphony_dask._harmony.kernels import cosine_normalize, soft_assign
from symphony_dask._harmony.kmeans import kmeans
from symphony_dask._harmony.mixture import (
    apply_batch_terms,
    make_design,
    ridge_statistics,
    ridge_system,
    solve_batch_terms,
)
from symphony_dask._io.validation import count_bad_values
from symphony_dask._mapping.query import query_design
from symphony_dask._mapping.votes import majority_vote
from symphony_dask._preprocessing.normalize import (
    Moments,
    cell_totals,
    group_moments,
    log_normalize,
    rows_by_group,
    scale,
)
from symphony_dask._preprocessing.pca import orient, project, svd_from_gram
from symphony_dask._preprocessing.variable_genes import clip_reached, clipped_squares, expected_variance, vst_table


@pytest.fixture()
def rng():
    return np.random.default_rng(7)


def sparse_counts(rng, n=60, g=15):
    x = rng.poisson(0.7, size=(n, g)).astype(np.float64)
    x[:, 3] = 0.0  # an all-zero gene
    return sp.csr_matrix(x)


def test_moments_merge_equals_numpy_for_any_split(rng):
    x = sparse_counts(rng)
    dense = x.toarray()
    for cuts in ([30], [1, 2, 59], [10, 20, 45]):
        parts = np.split(np.arange(60), cuts)
        m = Moments.of(x[parts[0]])
        for p in parts[1:]:
            m = m.merge(Moments.of(x[p]))
        assert m.n == 60
        np.testing.assert_allclose(m.mean, dense.mean(0), rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(m.variance, dense.var(0, ddof=1), rtol=1e-13, atol=1e-15)
    assert Moments.of(x).variance[3] == 0.0


def test_constant_gene_has_exactly_zero_variance():
    x = np.full((7, 2), 0.3)
    x[:, 1] = np.arange(7)
    m = Moments.of(x[:3]).merge(Moments.of(x[3:]))
    assert m.variance[0] == 0.0


def test_group_moments_split_cells_by_code(rng):
    x = sparse_counts(rng)
    codes = rng.integers(0, 3, 60)
    gm = group_moments(x, codes)
    for c, rows in rows_by_group(codes).items():
        np.testing.assert_allclose(gm.groups[c].mean, x.toarray()[rows].mean(0), rtol=1e-14)
        assert np.array_equal(rows, np.flatnonzero(codes == c))


def test_clipped_squares_equal_dense_formula(rng):
    x = sparse_counts(rng)
    codes = np.zeros(60, dtype=int)
    mean = x.toarray().mean(0)
    sd = np.where(mean > 0, 0.5 + mean, 0.0)
    clip = 1.5
    out = clipped_squares(x, codes, mean={0: mean}, sd={0: sd}, clip=clip, normalize=False)
    s, nnz = out.groups[0]
    total = s + (60 - nnz) * np.divide(mean, sd, out=np.zeros_like(sd), where=sd > 0) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.minimum((x.toarray() - mean) / sd, clip)
    expected = np.where(sd > 0, (z**2).sum(0), 0.0)
    np.testing.assert_allclose(total, expected, rtol=1e-13)
    dense = clipped_squares(x.toarray(), codes, mean={0: mean}, sd={0: sd}, clip=clip, normalize=False)
    np.testing.assert_allclose(dense.groups[0][0], expected, rtol=1e-13)


def test_scale_clips_at_ten():
    x = sp.csr_matrix(np.array([[0.0, 50.0], [1.0, 0.0]]))
    out = scale(x, np.array([0, 1]), np.array([0.5, 1.0]), np.array([0.5, 2.0]), normalize=False)
    np.testing.assert_array_equal(out, [[-1.0, 10.0], [1.0, -0.5]])


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_sparse_projection_equals_dense_scaled_product(rng, normalize, dtype):
    x = rng.poisson(1.5, size=(80, 40)) * (rng.random((80, 40)) < 0.3)
    x[5] = 0  # a cell without counts
    x[7, 2] = 400  # a value scaled beyond the clip
    block = sp.csr_matrix(x.astype(dtype))
    genes = rng.choice(40, size=25, replace=False)
    mean = rng.random(25) + 0.2
    std = rng.random(25) * 0.5 + 0.1
    mean[:2], std[:2] = 3.0, 0.2  # genes whose zeros are clipped (mean / std > 10)
    loadings = rng.standard_normal((25, 6))
    dense = scale(x.astype(np.float64), genes, mean, std, normalize=normalize) @ loadings
    out = project(block, genes, mean, std, loadings, normalize=normalize)
    np.testing.assert_allclose(out, dense, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(project(block[:40], genes, mean, std, loadings, normalize=normalize), out[:40])


@pytest.mark.parametrize("normalize", [False, True, "tfidf"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_csr_kernels_equal_the_dense_formulas(rng, normalize, dtype):
    """The CSR walks (moments, clipped squares, scaled chunk) normalize each stored value on the
    fly; they equal the dense kernels, which normalize the whole chunk first, to round-off."""
    x = rng.poisson(1.5, size=(80, 40)) * (rng.random((80, 40)) < 0.3)
    x[5] = 0  # a cell without counts
    x[:, 9] = 0  # a gene without counts
    x[7, 2] = 400  # a value scaled beyond the clip
    block, dense = sp.csr_matrix(x.astype(dtype)), x.astype(np.float64)
    codes = rng.integers(0, 3, 80) * 2  # group codes 0, 2, 4: not the positions 0..2
    idf = rng.random(40) + 0.5 if normalize == "tfidf" else None
    settings = dict(normalize=bool(normalize), idf=idf)
    sparse_m, dense_m = group_moments(block, codes, **settings), group_moments(dense, codes, **settings)
    assert sorted(sparse_m.groups) == [0, 2, 4]
    for c, m in dense_m.groups.items():
        assert sparse_m.groups[c].n == m.n == (codes == c).sum()
        # a mean of n <= 80 values summed in another order: relative error below 80 * 2**-53 ~ 1e-14
        np.testing.assert_allclose(sparse_m.groups[c].mean, m.mean, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(sparse_m.groups[c].m2, m.m2, rtol=1e-12, atol=1e-13)
        assert sparse_m.groups[c].m2[9] == 0.0
        np.testing.assert_allclose(sparse_m.groups[c].maximum, m.maximum, rtol=1e-14)
    sd = {c: np.sqrt(m.variance) * 0.7 for c, m in dense_m.groups.items()}
    mean = {c: m.mean for c, m in dense_m.groups.items()}
    sparse_s = clipped_squares(block, codes, mean=mean, sd=sd, clip=4.0, **settings)
    dense_s = clipped_squares(dense, codes, mean=mean, sd=sd, clip=4.0, **settings)
    for c in (0, 2, 4):
        total = (
            sparse_s.groups[c][0]
            + (dense_m.groups[c].n - sparse_s.groups[c][1])
            * np.divide(mean[c], sd[c], out=np.zeros(40), where=sd[c] > 0) ** 2
        )
        np.testing.assert_allclose(total, dense_s.groups[c][0], rtol=1e-12, atol=1e-13)
    genes = rng.choice(40, size=25, replace=False)
    g_mean, g_std = rng.random(25) + 0.2, rng.random(25) * 0.5 + 0.1
    g_mean[:2], g_std[:2] = 3.0, 0.2  # genes whose zeros are clipped (mean / std > 10)
    # log1p of numba (libm) and of NumPy may differ by an ulp: values <= 10 over SDs >= 0.1
    np.testing.assert_allclose(
        scale(block, genes, g_mean, g_std, **settings),
        scale(dense, genes, g_mean, g_std, **settings),
        rtol=0,
        atol=1e-13,
    )


def test_standardized_variances_without_the_clip_pass_equal_the_pass(rng):
    """When no value reaches the clip, VST's standardized variance is the variance over the
    expected one: the table without the second pass equals the table from it."""
    x = sp.csr_matrix(rng.poisson(rng.gamma(0.5, 2.0, 60), size=(300, 60)).astype(np.float32))
    codes = rng.integers(0, 2, 300)
    first = group_moments(x, codes, normalize=True)
    expected = {c: expected_variance(m.mean, m.variance) for c, m in first.groups.items()}
    sd = {c: np.sqrt(e) for c, e in expected.items()}
    mean = {c: m.mean for c, m in first.groups.items()}
    genes = pd.Index([f"g{j}" for j in range(60)])
    clip = np.sqrt(300.0)
    assert not any(clip_reached(first.groups[c], sd[c], clip) for c in sd)
    squares = clipped_squares(x, codes, mean=mean, sd=sd, clip=clip, normalize=True)
    with_pass, without = (vst_table(first, s, expected, ["a", "b"], genes) for s in (squares, None))
    assert list(with_pass["symbol"]) == list(without["symbol"])  # the same ranking
    np.testing.assert_allclose(without["variance_standardized"], with_pass["variance_standardized"], rtol=1e-13)
    # a clip below some gene's largest z-score is reached: the pass is needed
    z_max = max(((first.groups[c].maximum - mean[c]) / np.where(sd[c] > 0, sd[c], np.inf)).max() for c in sd)
    assert clip_reached(first.groups[0], sd[0], 0.9 * z_max) or clip_reached(first.groups[1], sd[1], 0.9 * z_max)


def test_value_counts_of_sparse_and_dense_blocks_agree():
    x = np.array([[1.0, 0.0, np.nan], [np.inf, -2.0, 0.5], [0.0, 0.0, 0.0], [-np.inf, 3.0, 0.0]])
    for block in (x, sp.csr_matrix(x), x.astype(np.float32)):
        c = count_bad_values(block)
        assert (c.n_nan, c.n_inf, c.n_negative, c.n_non_integer, c.n_empty_cells) == (1, 2, 2, 1, 1)
    ints = count_bad_values(sp.csr_matrix(np.array([[2, -1], [0, 0]], dtype=np.int32)))
    assert (ints.n_negative, ints.n_non_integer, ints.n_empty_cells, ints.n_values) == (1, 0, 1, 2)


def test_cell_totals_accumulate_in_float64():
    x = sp.csr_matrix(np.full((2, 3000), 0.1, dtype=np.float32))
    np.testing.assert_allclose(cell_totals(x), [3000 * float(np.float32(0.1))] * 2, rtol=1e-14)
    np.testing.assert_allclose(log_normalize(x).toarray(), log_normalize(x.toarray()), rtol=1e-14)


def test_svd_from_gram_equals_numpy_svd(rng):
    x = rng.normal(size=(200, 30))
    u, s = svd_from_gram(x.T @ x, 5)
    _, s_np, vt = np.linalg.svd(x, full_matrices=False)
    np.testing.assert_allclose(s, s_np[:5], rtol=1e-12)
    np.testing.assert_allclose(np.abs(u.T @ vt[:5].T), np.eye(5), atol=1e-10)
    assert np.all(u[np.argmax(np.abs(u), axis=0), np.arange(5)] > 0)  # sign convention
    np.testing.assert_array_equal(orient(-u), u)


def test_soft_assign_is_the_softmax_formula(rng):
    z = cosine_normalize(rng.normal(size=(20, 4)))
    y = cosine_normalize(rng.normal(size=(4, 6)), axis=0)
    r = soft_assign(z, y, 0.1)
    raw = np.exp(-2 * (1 - z @ y) / 0.1)
    np.testing.assert_allclose(r, raw / raw.sum(1, keepdims=True), rtol=1e-12)


def naive_correction(z, r, x, penalty):
    """Harmony's moe_correct_ridge written as in the paper: one cluster at a time, dense design."""
    out = z.copy()
    for k in range(r.shape[1]):
        xr = x.T * r[:, k]  # (1+B) x n
        w = np.linalg.inv(xr @ x + np.diag(penalty)) @ xr @ z
        w[0] = 0
        out -= (w.T @ xr).T
    return out


def test_ridge_correction_equals_paper_formula(rng):
    n, d, k = 80, 5, 4
    meta = pd.DataFrame({"a": rng.choice(["x", "y", "z"], n), "b": rng.choice(["p", "q"], n)})
    design = make_design(meta, ["a", "b"])
    assert design.patterns.shape[1] == 1 + 3 + 2
    z = rng.normal(size=(n, d))
    r = rng.dirichlet(np.ones(k), size=n)
    penalty = np.array([0.0, 1, 1, 1, 2, 2])
    s, t = ridge_statistics(z, r, design.codes, len(design.patterns))
    w = solve_batch_terms(*ridge_system(s, t, design.patterns), penalty)
    got = apply_batch_terms(z, r, design.codes, np.einsum("pa,kad->pkd", design.patterns, w))
    full = design.patterns[design.codes]
    np.testing.assert_allclose(got, naive_correction(z, r, full, penalty), rtol=1e-11, atol=1e-12)


def test_query_design_as_r(rng):
    meta = pd.DataFrame({"donor": ["b", "a", "b"], "one": ["x", "x", "x"]})
    d = query_design(meta, ["donor"])
    np.testing.assert_array_equal(d.patterns[d.codes], [[1, 0, 1], [1, 1, 0], [1, 0, 1]])
    d = query_design(meta, [])  # no variable: two rows of ones
    np.testing.assert_array_equal(d.patterns[d.codes], np.ones((3, 2)))
    d = query_design(meta, ["one"])  # one level: one row of ones
    np.testing.assert_array_equal(d.patterns[d.codes], np.ones((3, 2)))


def test_majority_vote_counts_and_seeded_ties():
    codes = np.array([[0, 0, 1, 1, 2], [2, 2, 2, 0, 1], [1, 1, 1, 1, 1]])
    winner, votes = majority_vote(codes, 3, seed=0)
    assert winner[0] in (0, 1) and list(winner[1:]) == [2, 1]
    assert list(votes) == [2, 3, 5]
    ties = np.tile([0, 1], (200, 1))
    first = majority_vote(ties, 2, seed=3)[0]
    np.testing.assert_array_equal(first, majority_vote(ties, 2, seed=3)[0])
    assert 0 < first.mean() < 1  # ties go both ways


def test_kmeans_finds_separated_clusters(rng):
    centers = np.array([[10.0, 0], [0, 10], [-10, 0]])
    x = np.vstack([c + rng.normal(size=(50, 2)) for c in centers])
    found = kmeans(x, 3, n_init=3, seed=1)
    assert np.abs(np.sort(found[:, 0]) - np.sort(centers[:, 0])).max() < 1
    np.testing.assert_array_equal(found, kmeans(x, 3, n_init=3, seed=1))
    with pytest.raises(ValueError, match="cannot form 5 clusters from 3 distinct cells"):
        kmeans(np.eye(3).repeat(2, axis=0), 5)


def test_harmonize_removes_a_shift_and_is_seeded(rng):
    n = 400
    types = rng.integers(0, 2, n)
    batch = rng.integers(0, 2, n)
    z = np.column_stack([types * 6.0 + batch * 3.0, rng.normal(size=n), rng.normal(size=n)]) + 1
    meta = pd.DataFrame({"batch": batch.astype(str)})
    res = harmonize(z, meta, "batch", n_clusters=4, max_iter_harmony=10, seed=5)
    shift_before = z[batch == 1, 0].mean() - z[batch == 0, 0].mean()
    shift_after = res.Z_corr[batch == 1, 0].mean() - res.Z_corr[batch == 0, 0].mean()
    assert abs(shift_after) < 0.25 * abs(shift_before)
    np.testing.assert_allclose(res.R.sum(1), 1.0, rtol=1e-12)
    again = harmonize(z, meta, "batch", n_clusters=4, max_iter_harmony=10, seed=5)
    np.testing.assert_array_equal(res.Z_corr, again.Z_corr)


def test_tree_reduce_and_map_helpers():
    x = da.from_array(np.arange(40.0).reshape(20, 2), chunks=(3, 2))
    for split_every in (2, 3, 8):
        total = map_reduce(lambda b: b.sum(0), x, combine=np.add, split_every=split_every).compute()
        np.testing.assert_array_equal(total, [380.0, 400.0])
    doubled = map_rows(lambda b, factor: b[:, :1] * factor, x, n_out=1, factor=2.0)
    assert doubled.chunks == ((3, 3, 3, 3, 3, 3, 2), (1,))
    np.testing.assert_array_equal(doubled.compute().ravel(), np.arange(0.0, 80, 4))
    assert dask.compute(tree_reduce([dask.delayed(i) for i in range(5)], lambda a, b: a + b, 2))[0] == 10
