"""Shared fixtures: the bundled PBMC data, the R Symphony oracle (splitA), and references built once."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import symphony_dask as sd
from symphony_dask.datasets import pbmcs_small

DATA = Path(__file__).parent / "data"
ORACLE = DATA / "symphony_r_oracle_splitA"

#: R Symphony's buildReference parameters of the oracle run (splitA).
R_BUILD = dict(normalize=False, n_hvg=1000, hvg_batch_key="donor", n_pcs=20, n_clusters=100, theta=2.0)


class Oracle:
    """Reader of the R Symphony outputs; per-cell matrices come back cells x components."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ref_cells = (root / "ref_cells.txt").read_text().split()
        self.query_cells = (root / "query_cells.txt").read_text().split()

    def table(self, name: str, **kwargs) -> pd.DataFrame:
        return pd.read_csv(self.root / f"{name}.csv.gz", **kwargs)

    def matrix(self, name: str) -> np.ndarray:
        return self.table(name, index_col=0).to_numpy()

    def per_cell(self, name: str, cells: list[str]) -> np.ndarray:
        m = self.table(name, index_col=0)
        return m.T.loc[cells].to_numpy()

    @property
    def vargenes(self) -> pd.DataFrame:
        return self.table("vargenes")


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
    vg = oracle.vargenes
    return sd.Reference.from_arrays(
        vg["symbol"],
        vg["mean"],
        vg["stddev"],
        oracle.matrix("loadings_U"),
        oracle.matrix("centroids_Ycos"),
        oracle.matrix("cache_Nr").ravel(),
        oracle.matrix("cache_C"),
        embedding=oracle.per_cell("ref_Z_corr", oracle.ref_cells),
        obs=pbmcs.obs.loc[oracle.ref_cells],
    )


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
