"""PCA accuracy of both solvers against an exact SVD of the densified scaled matrix."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import scipy.sparse as sp

import symphony_dask as sd
from symphony_dask._io.expression import read_expression
from symphony_dask._preprocessing.normalize import scale
from symphony_dask._preprocessing.pca import choose_solver, fit_pca

D = 20


def exact(expr_x, scaling):
    dense = scale(expr_x, **scaling)
    _, s, vt = np.linalg.svd(dense, full_matrices=False)
    return s[:D], vt[:D].T


def check(loadings, singular_values, s, v):
    cosines = np.cos(scipy.linalg.subspace_angles(loadings, v))
    assert cosines.min() >= 0.9999
    assert np.abs(singular_values - s).max() / s.min() <= 1e-6


@pytest.fixture(scope="module")
def pbmc_scaling(pbmcs, oracle, built_reference):
    cells = pbmcs[oracle.ref_cells].copy()
    genes = cells.var_names.get_indexer(built_reference.genes)
    scaling = dict(genes=genes, mean=built_reference.mean, std=built_reference.std, normalize=False)
    return cells, scaling


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["gram", "krylov"])
def test_pbmcs_small_against_exact_svd(pbmc_scaling, solver):
    cells, scaling = pbmc_scaling
    s, v = exact(cells.X, scaling)
    for chunk_size in (None, 137):
        pca = fit_pca(read_expression(cells, chunk_size=chunk_size).X, scaling, D, solver=solver)
        loadings, values = pca.loadings, pca.singular_values
        assert pca.solver == solver and (pca.passes == 1 if solver == "gram" else 5 < pca.passes < 40)
        check(loadings, values, s, v)
        # each loading vector, not only the subspace: Krylov stops on residual norms (observed 1.6e-9)
        error = np.minimum(np.abs(loadings - v).max(axis=0), np.abs(loadings + v).max(axis=0)).max()
        assert error <= (1e-8 if solver == "krylov" else 1e-10)


def test_krylov_does_not_depend_on_chunking(pbmc_scaling):
    cells, scaling = pbmc_scaling
    one = fit_pca(read_expression(cells).X, scaling, D, solver="krylov")
    many = fit_pca(read_expression(cells, chunk_size=100).X, scaling, D, solver="krylov")
    assert np.abs(one.loadings - many.loadings).max() < 1e-10
    assert np.abs(one.singular_values - many.singular_values).max() < 1e-10 and one.passes == many.passes


@pytest.fixture(scope="module")
def synthetic_20k():
    """20,000 cells x 3,000 genes: negative-binomial counts of 12 cell types in 4 donors."""
    rng = np.random.default_rng(0)
    n, g = 20_000, 3_000
    types, donors = rng.integers(0, 12, n), rng.integers(0, 4, n)
    base = np.exp(rng.normal(-1.0, 1.2, g))
    program = np.exp(rng.normal(0.0, 0.8, (12, g)) * (rng.random((12, g)) < 0.1))
    effect = np.exp(rng.normal(0.0, 0.2, (4, g)))
    mu = base * program[types] * effect[donors] * np.exp(rng.normal(0, 0.4, n))[:, None]
    counts = rng.poisson(rng.gamma(4.0, mu / 4.0)).astype(np.float32)
    obs = pd.DataFrame({"donor": donors.astype(str)}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))


@pytest.fixture(scope="module")
def exact_once():
    """``exact`` computed once per scaling (both solvers choose the same genes, means and SDs)."""
    done: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    def get(x, scaling):
        key = b"".join(np.asarray(scaling[k]).tobytes() for k in ("genes", "mean", "std"))
        if key not in done:
            done[key] = exact(x, scaling)
        return done[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["gram", "krylov"])
def test_synthetic_20k_against_exact_svd(synthetic_20k, exact_once, solver):
    ref = sd.build_reference(
        synthetic_20k,
        "donor",
        n_hvg=1000,
        n_clusters=30,
        max_iter_harmony=1,
        pca_solver=solver,
        chunk_size=5_000,
        umap=False,
    )
    genes = synthetic_20k.var_names.get_indexer(ref.genes)
    scaling = dict(genes=genes, mean=ref.mean, std=ref.std, normalize=True)
    s, v = exact_once(synthetic_20k.X, scaling)
    assert ref.params["pca_solver"] == solver
    check(ref.loadings, np.asarray(ref.params["singular_values"]), s, v)


def test_solver_choice_by_cost():
    assert choose_solver(1_360, 20) == "gram"
    assert choose_solver(4_000, 20) == "gram"
    assert choose_solver(10_000, 20) == "krylov"
    with pytest.raises(ValueError, match="pca_solver must be 'auto', 'gram' or 'krylov'"):
        fit_pca(
            read_expression(ad.AnnData(np.ones((50, 30)))).X,
            dict(genes=np.arange(30), mean=np.zeros(30), std=np.ones(30), normalize=False),
            5,
            solver="lanczos",
        )
