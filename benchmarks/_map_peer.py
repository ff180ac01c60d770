"""symphonypy's build and mapping for map_scale.py, run by the peer's Python; prints a JSON line per query size.

    /path/to/venv-with-symphonypy/bin/python benchmarks/_map_peer.py REFERENCE_STORE QUERY_STORE

The reference is built in memory as build_scale.py's peer does (``raw`` kept for the mapping). Each query,
the first 1k, 10k and 100k cells of QUERY_STORE, is mapped with ``map_embedding`` after
``normalize_total`` + ``log1p`` (best of 3, one run at 100k), then labeled by ``transfer_labels_kNN``
with 5 neighbors.
"""

from __future__ import annotations

import argparse
import json
import time

import anndata as ad
import scanpy as sc
import symphonypy as sp
import zarr
from anndata.experimental import read_elem_lazy

SIZES = (1_000, 10_000, 100_000)


def first_cells(path: str, n: int) -> ad.AnnData:
    """The first ``n`` cells of a store as an in-memory AnnData (read lazily, only those rows)."""
    g = zarr.open_group(path, mode="r")
    x = read_elem_lazy(g["X"], chunks=(10_000, -1))[:n].compute()
    return ad.AnnData(x, obs=ad.io.read_elem(g["obs"]).iloc[:n].copy(), var=ad.io.read_elem(g["var"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference_store", help="reference atlas store (raw counts, obs column 'donor')")
    parser.add_argument("query_store", help="query atlas store (>= 100k cells)")
    args = parser.parse_args()
    start = time.perf_counter()
    ref = ad.read_zarr(args.reference_store)
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, n_top_genes=2000, flavor="seurat")
    ref.raw = ref
    ref = ref[:, ref.var["highly_variable"]].copy()
    sc.pp.scale(ref, max_value=10)
    sc.tl.pca(ref, n_comps=20)
    sp.pp.harmony_integrate(ref, key="donor", verbose=False)
    build = time.perf_counter() - start
    for n in SIZES:
        q0 = first_cells(args.query_store, n)
        best = float("inf")
        for _ in range(3 if n <= 10_000 else 1):
            q = q0.copy()
            t = time.perf_counter()
            sc.pp.normalize_total(q, target_sum=1e4)
            sc.pp.log1p(q)
            sp.tl.map_embedding(q, ref, key="donor")
            best = min(best, time.perf_counter() - t)
        t = time.perf_counter()
        sp.tl.transfer_labels_kNN(q, ref, ref_labels=["cell_type"], n_neighbors=5)
        transfer = time.perf_counter() - t
        row = {
            "method": "symphonypy",
            "reference_cells": ref.n_obs,
            "reference_build_s": round(build, 1),
            "query_cells": n,
            "map_s": round(best, 3),
            "transfer_s": round(transfer, 3),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
