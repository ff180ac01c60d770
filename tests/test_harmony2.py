"""Harmony 2 (``flavor="harmony2"``): against harmonypy 2.1 (the oracle), its formulas, and the
invariances of the chunked engine."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from _helpers import CLI_BUILD

import symphony_dask as sd
from symphony_dask._harmony.kernels import cross_entropy, pattern_penalty
from symphony_dask._harmony.mixture import make_design, solve_harmony2_terms

harmonypy = pytest.importorskip("harmonypy", minversion="2.1")
logging.getLogger("harmonypy").setLevel(logging.WARNING)

TOL = 1e-10


def _synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """12 cell types in 6 batches of unequal composition, each batch shifted."""
    rng = np.random.default_rng(seed)
    batch = rng.integers(0, 6, n)
    weights = rng.dirichlet(np.ones(12), size=6)
    types = (rng.random(n)[:, None] > np.cumsum(weights[batch], axis=1)).sum(axis=1).clip(0, 11)
    z = rng.normal(size=(n, 20)) + (rng.normal(size=(12, 20)) * 3.0)[types] + rng.normal(size=(6, 20))[batch]
    return z, pd.DataFrame({"batch": batch.astype(str)})


def _agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per PC: Pearson r, and the RMSE relative to the PC's spread (blind spots of r: scale, offset)."""
    r = np.array([np.corrcoef(ours[:, j], theirs[:, j])[0, 1] for j in range(ours.shape[1])])
    rmse = np.sqrt(((ours - theirs) ** 2).mean(axis=0)) / theirs.std(axis=0)
    return r, rmse


def test_matches_harmonypy_with_its_defaults(pbmc3500):
    z, meta, _ = pbmc3500
    ours = sd.harmonize(z, meta, "donor", flavor="harmony2")
    theirs = harmonypy.run_harmony(z, meta, "donor", verbose=False)
    r, rmse = _agreement(np.asarray(ours.Z_corr), np.asarray(theirs.Z_corr))
    assert r.min() >= 0.99  # observed 0.9978 (median 0.9991)
    assert rmse.max() <= 0.1  # observed 0.067 (median 0.042); harmony1's result is 0.95 in r
    assert ours.n_iter == len(theirs.objective_harmony) - 1  # both converge after 5 iterations
    assert ours.cluster_iterations == 4 * ours.n_iter  # harmony2's 4 rounds per iteration


@pytest.mark.slow
def test_matches_harmonypy_on_50k_synthetic_cells():
    z, meta = _synthetic(50_000)
    ours = sd.harmonize(z, meta, "batch", flavor="harmony2", chunk_size=12_500)
    theirs = harmonypy.run_harmony(z, meta, "batch", verbose=False)
    r, rmse = _agreement(np.asarray(ours.Z_corr), np.asarray(theirs.Z_corr))
    assert r.min() >= 0.99  # observed 1.0000
    assert rmse.max() <= 0.01  # observed < 5e-4


def test_differs_from_harmony1(pbmc3500):
    """The flavor changes the algorithm, not only the defaults."""
    z, meta, _ = pbmc3500
    kw = dict(max_iter_harmony=2, max_iter_cluster=4, epsilon_cluster=-1.0, epsilon_harmony=-1.0, n_init=1, lamb=1.0)
    one = sd.harmonize(z, meta, "donor", flavor="harmony1", **kw)
    two = sd.harmonize(z, meta, "donor", flavor="harmony2", **kw)
    assert np.abs(np.asarray(one.Z_corr) - np.asarray(two.Z_corr)).max() > 0.1


@pytest.mark.parametrize("n_chunks", [3, 7])
def test_chunking_does_not_change_results(pbmc3500, n_chunks):
    z, meta, _ = pbmc3500
    one = sd.harmonize(z, meta, "donor", flavor="harmony2")
    many = sd.harmonize(z, meta, "donor", flavor="harmony2", chunk_size=-(-len(z) // n_chunks))
    assert np.abs(np.asarray(many.Z_corr) - np.asarray(one.Z_corr)).max() <= TOL
    assert np.abs(np.asarray(many.R) - np.asarray(one.R)).max() <= TOL
    assert many.n_iter == one.n_iter


def test_settings_of_the_other_flavor_are_named(pbmc3500):
    z, meta, _ = pbmc3500
    with pytest.warns(UserWarning, match="alpha is a harmony2 setting"):
        sd.harmonize(z[:600], meta[:600], "donor", alpha=0.5, max_iter_harmony=1, n_clusters=5)
    with pytest.raises(ValueError, match="'harmony1' or 'harmony2'"):
        sd.harmonize(z, meta, "donor", flavor="harmony3")


@pytest.mark.parametrize("stabilized", [False, True])
def test_penalty_and_cross_entropy_formulas(stabilized):
    """Per cluster and batch, harmony 0.1's ((E + 1) / (O + 1)) ** theta and sigma theta O log((O + 1) / (E + 1)),
    or harmony 2's ((2E + 1) / (O + E + 1)) ** theta and sigma theta O log((O + E + 1) / (2E + 1)), written
    out for two batch variables, in float64 and float32, with a pattern empty in a cluster."""
    rng = np.random.default_rng(1)
    meta = pd.DataFrame({"a": rng.choice(["x", "y", "z"], 40), "b": rng.choice(["u", "v"], 40)})
    design = make_design(meta, ["a", "b"])
    s = rng.random((len(design.patterns), 4)) * 10
    s[0, 2] = 0.0
    pr_b = design.level_counts() / 40
    theta = np.array([1.0, 2.0, 0.5, 2.0, 1.5])
    phi = design.patterns[:, 1:]
    o, e = s.T @ phi, np.outer(s.sum(axis=0), pr_b)
    ratio = (2 * e + 1) / (o + e + 1) if stabilized else (e + 1) / (o + 1)
    for dtype in (np.float64, np.float32):
        got = pattern_penalty(s.astype(dtype), design.patterns, pr_b, theta, stabilized=stabilized)
        for p in range(len(phi)):
            for k in range(4):
                want = sum(ratio[k, b] ** theta[b] for b in np.flatnonzero(phi[p]))
                np.testing.assert_allclose(got[p, k], want, rtol=1e-6 if dtype == np.float32 else 1e-12)
    want = 0.1 * (theta * o * np.log(1 / ratio)).sum()
    np.testing.assert_allclose(
        cross_entropy(s, design.patterns, pr_b, theta, 0.1, stabilized=stabilized), want, rtol=1e-12
    )
    empty = pattern_penalty(np.zeros_like(s), design.patterns, pr_b, theta, stabilized=stabilized)
    np.testing.assert_array_equal(empty, np.repeat(phi.sum(axis=1)[:, None], 4, axis=1))  # no cells: no push


def _cellwise_fit(z, r, design, pr_b, alpha, cutoff):
    """harmony 2's correction written cell by cell, as harmonypy does it (one batch variable here)."""
    x = design.patterns[design.codes]
    phi = x[:, 1:]
    n_b, corrected, intercepts = phi.sum(axis=0), z.copy(), {}
    for k in range(r.shape[1]):
        o, e = r[:, k] @ phi, r[:, k].sum() * pr_b
        kept = o / n_b > cutoff
        if kept.sum() < 2:
            continue
        cells = phi[:, kept].any(axis=1)
        xk = x[np.ix_(cells, np.r_[True, kept])]
        a = (xk * r[cells, k, None]).T @ xk + np.diag(np.r_[0.0, alpha * e[kept]])
        w = np.linalg.solve(a, (xk * r[cells, k, None]).T @ z[cells])
        intercepts[k] = w[0]
        corrected[cells] -= r[cells, k, None] * (xk[:, 1:] @ w[1:])
    return corrected, intercepts


def test_ridge_with_estimated_penalty_and_left_out_batches():
    rng = np.random.default_rng(2)
    n, k = 300, 3
    meta = pd.DataFrame({"batch": rng.choice(["b1", "b2", "b3", "b4"], n)})
    design = make_design(meta, ["batch"])
    z = rng.normal(size=(n, 5))
    r = rng.dirichlet(np.ones(k), size=n)
    r[design.codes == 3, 1] = 1e-9  # batch b4 holds nearly none of cluster 1: left out of its fit
    r[design.codes != 0, 2] = 1e-9  # only b1 in cluster 2: nothing to correct there
    r /= r.sum(axis=1, keepdims=True)
    pr_b = design.level_counts() / n
    s = np.zeros((len(design.patterns), k))
    t = np.zeros((len(design.patterns), k, 5))
    np.add.at(s, design.codes, r)
    np.add.at(t, design.codes, r[:, :, None] * z[:, None, :])
    w, intercepts, fitted = solve_harmony2_terms(s, t, design.patterns, design.variables(), alpha=0.2, cutoff=1e-5)
    want, want_intercepts = _cellwise_fit(z, r, design, pr_b, 0.2, 1e-5)
    got = z - np.einsum("nk,nkd->nd", r, np.einsum("pa,kad->pkd", design.patterns, w)[design.codes])
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert fitted.tolist() == [True, True, False] and sorted(want_intercepts) == [0, 1]
    for c, intercept in want_intercepts.items():
        np.testing.assert_allclose(intercepts[c], intercept, atol=1e-12)
    assert np.all(w[1, 4] == 0)  # b4's coefficient in cluster 1
    assert np.all(np.abs(got[design.codes == 3] - z[design.codes == 3]) > 0)  # corrected by cluster 0


def test_harmony2_reference_from_the_command_line_maps_splitA(split, tmp_path, capsys):
    """A harmony2 reference (built, saved, loaded) maps the 3'v1 query as well as a harmony1 one
    (5-NN accuracy 0.9138), with the query's ridge penalty estimated as Harmony 2 does."""
    from symphony_dask.cli import main

    ref_cells, query = split
    ref_cells.write_h5ad(tmp_path / "ref.h5ad")
    args = ["--no-normalize", *CLI_BUILD, "--no-umap", "--harmony-flavor", "harmony2", "-q"]
    assert main(["build", str(tmp_path / "ref.h5ad"), "--out", str(tmp_path / "ref.zarr"), *args]) == 0
    ref = sd.load_reference(tmp_path / "ref.zarr")
    assert ref.params["harmony_flavor"] == "harmony2" and ref.params["alpha"] == 0.2
    assert ref.params["max_iter_cluster"] == 4 and ref.params["max_iter_harmony"] == 10
    mapped = sd.transfer_labels(ref, sd.map_query(ref, query.copy(), normalize=False), "cell_type")
    assert mapped.uns["symphony"]["lamb"] == "estimated (alpha=0.2)"
    accuracy = (mapped.obs["cell_type_pred"].astype(str) == query.obs["cell_type"].astype(str)).mean()
    assert accuracy >= 0.9138 - 0.01  # observed 0.9172 (0.9069 with the paper's fixed lamb=1)
    fixed = sd.map_query(ref, query.copy(), normalize=False, lamb=1.0)
    assert fixed.uns["symphony"]["lamb"] == 1.0
    assert np.abs(fixed.obsm["X_symphony"] - mapped.obsm["X_symphony"]).max() > 1e-3


@pytest.mark.parametrize("flavor", ["harmony1", "harmony2"])
def test_objective_equals_its_formula(pbmc3500, flavor):
    """After one iteration the recorded objective is, from the final R, the centroids and the PCs:
    sum R dist + sigma sum R log R + sigma sum_kb theta O_kb log(ratio_kb), each flavor's ratio."""
    z, meta, _ = pbmc3500
    z, meta = z[:1500], meta[:1500]
    res = sd.harmonize(z, meta, "donor", flavor=flavor, max_iter_harmony=1, n_clusters=20)
    r, y = np.asarray(res.R), res.centroids
    dist = 2.0 * (1.0 - (z / np.linalg.norm(z, axis=1, keepdims=True)) @ y)
    phi = pd.get_dummies(meta["donor"]).to_numpy(float)
    o, e = r.T @ phi, np.outer(r.sum(axis=0), phi.mean(axis=0))
    ratio = (o + e + 1) / (2 * e + 1) if flavor == "harmony2" else (o + 1) / (e + 1)
    want = (r * dist).sum() + 0.1 * (r * np.log(r)).sum() + 0.1 * (2.0 * o * np.log(ratio)).sum()
    assert res.objective[-1] == pytest.approx(want, rel=1e-12)  # observed 1.4e-16
