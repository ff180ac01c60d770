"""symphonypy's reference build for build_scale.py, run by the peer's Python; prints a JSON line.

    /path/to/venv-with-symphonypy/bin/python benchmarks/_build_peer.py STORE [--hvg-batch-key donor] [--umap]

The steps of our build, in memory: read the whole AnnData, ``normalize_total`` + ``log1p``, 2,000
Seurat-flavor variable genes (with ``--hvg-batch-key``: 2,000 per group, pooled, the genes variable in at
least one group, as Symphony pools them), ``scale(max_value=10)``, 20 PCs,
``symphonypy.pp.harmony_integrate`` over ``donor`` with its defaults (harmonypy); with ``--umap``, also
what our default build adds: ``sc.pp.neighbors`` on the corrected PCs and ``sc.tl.umap``. The line: wall
seconds and each step's.
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
    parser.add_argument("--hvg-batch-key", default=None, help="obs column whose groups' variable genes are pooled")
    parser.add_argument("--umap", action="store_true", help="also the neighbor graph and UMAP of the embedding")
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
    sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat", batch_key=args.hvg_batch_key)
    stage("variable_genes")
    chosen = adata.var["highly_variable"] if args.hvg_batch_key is None else adata.var["highly_variable_nbatches"] > 0
    adata = adata[:, chosen].copy()
    sc.pp.scale(adata, max_value=10)
    stage("scale")
    sc.tl.pca(adata, n_comps=20)
    stage("pca")
    sp.pp.harmony_integrate(adata, key="donor", verbose=False)
    stage("harmony")
    if args.umap:
        sc.pp.neighbors(adata, use_rep="X_pca_harmony")
        stage("neighbors")
        sc.tl.umap(adata)
        stage("umap")
    result = {"seconds": round(time.perf_counter() - start, 1), "stages_s": stages, "genes": int(adata.n_vars)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
