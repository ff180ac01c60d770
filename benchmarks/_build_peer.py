"""symphonypy's reference build for build_scale.py, run by the peer's Python; prints a JSON line.

    /path/to/venv-with-symphonypy/bin/python benchmarks/_build_peer.py STORE

The steps of our build, in memory: read the whole AnnData, ``normalize_total`` + ``log1p``, 2,000
Seurat-flavor variable genes, ``scale(max_value=10)``, 20 PCs, ``symphonypy.pp.harmony_integrate``
over ``donor`` with its defaults (harmonypy). The line: wall seconds and each step's.
"""

from __future__ import annotations

import argparse
import json
import time

import anndata as ad
import scanpy as sc
import symphonypy as sp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="a zarr store of raw counts with obs column 'donor'")
    args = parser.parse_args()
    stages: dict[str, float] = {}
    start = t = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal t
        stages[name] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()

    adata = ad.read_zarr(args.store)
    stage("read")
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    stage("normalize")
    sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat")
    stage("variable_genes")
    adata = adata[:, adata.var["highly_variable"]].copy()
    sc.pp.scale(adata, max_value=10)
    stage("scale")
    sc.tl.pca(adata, n_comps=20)
    stage("pca")
    sp.pp.harmony_integrate(adata, key="donor", verbose=False)
    stage("harmony")
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "stages_s": stages}))


if __name__ == "__main__":
    main()
