"""The reference's neighbor index at scale: faiss's HNSW (ours) beside hnswlib (the library we
used before; it ships no wheels) and exact search, on the same embedding.

    python benchmarks/neighbor_index.py --cells 1400000 --out benchmarks/results/neighbor_index.json

The embedding is a synthetic corrected embedding of ``--cells`` cells x 20 PCs: 30 cell types
with unequal sizes and spreads, each with a 3-d substructure (a harder search than a real
Harmony embedding, whose cells lie on lower-dimensional manifolds). Per library: the index time
(one thread, as the reference build does, so the graph is reproducible), recall@5 against exact
search (KD-tree) on 2,000 query cells, and 5-NN label transfer of 100,000 query cells with
``transfer_labels`` (ours; every core). hnswlib is timed only where it is installed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import machine, write_results

D, TYPES = 20, 30


def embedding(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(TYPES, D)) * 2.0
    arms = rng.normal(size=(TYPES, 3, D))
    sizes = rng.dirichlet(np.full(TYPES, 2.0))
    types = rng.choice(TYPES, size=n, p=sizes)
    spread = rng.uniform(0.1, 0.4, TYPES)
    z = centers[types] + np.einsum("nk,nkd->nd", rng.normal(size=(n, 3)), arms[types]) * 0.5
    z += rng.normal(size=(n, D)) * spread[types, None]
    return z.astype(np.float32), types


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(found, exact, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[1_400_000])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "neighbor_index.json")
    args = parser.parse_args()

    import anndata as ad
    import pandas as pd
    from scipy.spatial import cKDTree

    import symphony_dask as sd
    from symphony_dask._embedding.neighbors import HNSW_EF, HNSW_EF_CONSTRUCTION, HNSW_M, NeighborIndex

    rows = []
    for n in args.cells:
        z, types = embedding(n, seed=0)
        q, q_types = embedding(100_000, seed=0)  # same cell types ...
        q += np.random.default_rng(1).normal(size=q.shape).astype(np.float32) * 0.05  # ... other cells
        exact = cKDTree(z).query(q[:2000], k=5, workers=-1)[1]
        start = time.perf_counter()
        ours = NeighborIndex.build(z, method="hnsw", seed=0)
        row = {
            "cells": n,
            "faiss_index_s": round(time.perf_counter() - start, 1),
            "faiss_recall_at_5": round(recall(ours.query(q[:2000], 5), exact), 4),
        }
        genes = pd.Index(["g0"])
        ref = sd.Reference.from_arrays(
            genes,
            np.zeros(1),
            np.ones(1),
            np.zeros((1, D)),
            np.random.default_rng(2).normal(size=(D, TYPES)),
            np.ones(TYPES),
            np.zeros((TYPES, D)),
            embedding=z,
            obs=pd.DataFrame({"cell_type": types.astype(str)}),
        )
        ref.neighbors = ours
        query = ad.AnnData(obs=pd.DataFrame(index=[f"q{i}" for i in range(len(q))]), obsm={"X_symphony": q})
        start = time.perf_counter()
        sd.transfer_labels(ref, query, "cell_type", k=5)
        row["transfer_100k_s"] = round(time.perf_counter() - start, 2)
        row["transfer_accuracy"] = round(float((query.obs["cell_type_pred"] == q_types.astype(str)).mean()), 4)
        try:
            import hnswlib
        except ImportError:
            hnswlib = None
        if hnswlib is not None:
            start = time.perf_counter()
            peer = hnswlib.Index(space="l2", dim=D)
            peer.init_index(max_elements=n, ef_construction=HNSW_EF_CONSTRUCTION, M=HNSW_M, random_seed=0)
            peer.add_items(z, np.arange(n), num_threads=1)
            row["hnswlib_index_s"] = round(time.perf_counter() - start, 1)
            peer.set_ef(HNSW_EF)
            row["hnswlib_recall_at_5"] = round(recall(peer.knn_query(q[:2000], k=5)[0], exact), 4)
            start = time.perf_counter()
            peer.knn_query(q, k=5, num_threads=-1)
            row["hnswlib_query_100k_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        ours.query(q, 5)
        row["faiss_query_100k_s"] = round(time.perf_counter() - start, 2)
        print(row, flush=True)
        rows.append(row)

    print(
        f"\n{'cells':>10} {'faiss index':>12} {'recall@5':>9} {'hnswlib index':>14} {'recall@5':>9} "
        f"{'transfer 100k':>14}"
    )
    for r in rows:
        print(
            f"{r['cells']:>10,} {r['faiss_index_s']:>11.1f}s {r['faiss_recall_at_5']:>9.4f} "
            f"{r.get('hnswlib_index_s', float('nan')):>13.1f}s {r.get('hnswlib_recall_at_5', float('nan')):>9.4f} "
            f"{r['transfer_100k_s']:>13.2f}s"
        )
    meta = {**machine(), "M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF}
    write_results(args.out, meta, rows)


if __name__ == "__main__":
    main()
