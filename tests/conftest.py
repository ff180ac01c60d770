"""Shared fixtures: the bundled PBMC data, the R Symphony oracle (splitA), references built once, and
local clusters. What the tests share besides fixtures is in _helpers.py."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _helpers import DATA, ORACLE, R_BUILD, LocalClusters, Oracle, oracle_reference

import symphony_dask as sd
from symphony_dask.datasets import pbmcs_small


@pytest.fixture(scope="session")
def oracle() -> Oracle:
    return Oracle(ORACLE)


@pytest.fixture(scope="session")
def pbmcs() -> ad.AnnData:
    return pbmcs_small()


@pytest.fixture()
def split(pbmcs, oracle) -> tuple[ad.AnnData, ad.AnnData]:
    """Fresh copies of the oracle's reference cells (3pv2 + 5p) and query cells (3pv1), in R's order."""
    return pbmcs[oracle.ref_cells].copy(), pbmcs[oracle.query_cells].copy()


@pytest.fixture(scope="session")
def r_reference(pbmcs, oracle) -> sd.Reference:
    """R's reference elements through Reference.from_arrays, with R's corrected embedding."""
    return oracle_reference(oracle, pbmcs)


@pytest.fixture(scope="session")
def built_reference(pbmcs, oracle) -> sd.Reference:
    """A reference built from scratch with R's parameters (seed 111)."""
    return sd.build_reference(pbmcs[oracle.ref_cells].copy(), "donor", **R_BUILD)


@pytest.fixture(scope="session")
def pbmc3500() -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """Harmony's PBMC example: 3,500 cells' PCs, their donors, and R Harmony's corrected PCs."""
    root = DATA / "harmony_pbmc3500"
    z = pd.read_csv(root / "pbmc_3500_pcs.tsv.gz", sep="\t").to_numpy()
    meta = pd.read_csv(root / "pbmc_3500_meta.tsv.gz", sep="\t")
    r_corrected = pd.read_csv(root / "pbmc_3500_pcs_harmonized.tsv.gz", sep="\t").to_numpy()
    return z, meta, r_corrected


@pytest.fixture(scope="session")
def raw_pbmcs() -> ad.AnnData:
    """240 PBMCs from three 10x chemistries, raw counts."""
    return ad.read_h5ad(DATA / "pbmc10x_3chem_small.h5ad")


@pytest.fixture(scope="session")
def synthetic_atlas(tmp_path_factory):
    """A 100,000-cell x 10,000-gene synthetic atlas of raw counts in zarr (1.1 GB of CSR arrays)."""
    from symphony_dask.datasets.synthetic import write_synthetic_atlas

    path = tmp_path_factory.mktemp("atlas") / "atlas.zarr"
    summary = write_synthetic_atlas(path, 100_000, n_genes=10_000, n_types=15, n_donors=6, seed=1)
    return path, summary


@pytest.fixture()
def local_cluster():
    """Start a ``LocalCluster`` and its client: ``cluster, client = local_cluster(n_workers=2)``.

    Test defaults (``dashboard_address=":0"``, ``threads_per_worker=1``, ``processes=True``) unless
    given; ``client=False`` starts no client (``client`` is then None). Whatever was started is closed
    when the test ends; close it sooner (``with cluster, client: ...``) where the test goes on without.
    """
    clusters = LocalClusters()
    yield clusters
    clusters.close()


@pytest.fixture(scope="module")
def module_local_cluster():
    """``local_cluster`` for module fixtures: what it starts is closed when the module's tests end."""
    clusters = LocalClusters()
    yield clusters
    clusters.close()
