"""The normalize=True path: log(CP10K + 1) of raw counts, checked against the formula."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import symphony_dask as sd
from symphony_dask._preprocessing.normalize import log_normalize


def by_formula(counts: sp.csr_matrix) -> sp.csr_matrix:
    """``log(1 + x / cell_total * 1e4)`` on the stored values, written out directly."""
    counts = sp.csr_matrix(counts, dtype=np.float64)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    out = sp.diags(1e4 / totals) @ counts
    out.data = np.log1p(out.data)
    return sp.csr_matrix(out)


def test_log_normalize_kernel_equals_formula(raw_pbmcs):
    counts = raw_pbmcs.X
    expected = by_formula(counts)
    sparse = log_normalize(counts)
    assert sp.issparse(sparse)
    assert abs(sparse - expected).max() < 1e-13
    dense = log_normalize(counts[:50].toarray())
    assert np.abs(dense - expected[:50].toarray()).max() < 1e-13


def test_pbmcs_small_counts_reproduce_its_log_values(pbmcs):
    """The bundled counts are normalized by nUMI (total over all original genes), as its README says."""
    counts = sp.csr_matrix(pbmcs.layers["counts"], dtype=np.float64)
    logged = sp.diags(1e4 / pbmcs.obs["nUMI"].to_numpy()) @ counts
    logged.data = np.log1p(logged.data)
    assert abs(logged - pbmcs.X).max() < 1e-14


@pytest.fixture(scope="module")
def normalized_pair(raw_pbmcs):
    raw = raw_pbmcs.copy()
    logged = raw_pbmcs.copy()
    logged.X = by_formula(raw.X)
    kw = dict(n_hvg=500, hvg_batch_key="batch", n_pcs=10, n_clusters=8)
    return (
        sd.build_reference(raw, "batch", normalize=True, **kw),
        sd.build_reference(logged, "batch", normalize=False, **kw),
        raw,
        logged,
    )


def test_build_on_counts_equals_build_on_formula_values(normalized_pair):
    from_counts, from_logged, _, _ = normalized_pair
    assert list(from_counts.genes) == list(from_logged.genes)
    for name in ("mean", "std", "loadings", "compression", "embedding"):
        assert np.abs(getattr(from_counts, name) - getattr(from_logged, name)).max() < 1e-10, name


def test_scaling_statistics_equal_numpy_on_formula_values(normalized_pair):
    from_counts, _, raw, logged = normalized_pair
    idx = raw.var_names.get_indexer(from_counts.genes)
    x = logged.X[:, idx].toarray()
    assert np.abs(from_counts.mean - x.mean(axis=0)).max() < 1e-12
    assert np.abs(from_counts.std - x.std(axis=0, ddof=1)).max() < 1e-12


def test_map_query_on_counts_equals_formula_values(normalized_pair):
    ref, _, raw, logged = normalized_pair
    from_counts = sd.map_query(ref, raw.copy(), "batch", normalize=True)
    from_logged = sd.map_query(ref, logged.copy(), "batch", normalize=False)
    assert np.abs(from_counts.obsm["X_symphony"] - from_logged.obsm["X_symphony"]).max() < 1e-10


def test_normalizing_non_integer_values_warns(normalized_pair):
    ref, _, _, logged = normalized_pair
    with pytest.warns(
        UserWarning, match=r"non-integer value.*raw counts are expected \(normalization is on\).*pass normalize=False"
    ):
        sd.map_query(ref, logged.copy(), "batch", normalize=True)
