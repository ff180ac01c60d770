"""Harmony alone at scale: symphony_dask.harmonize (flavors harmony1 and harmony2) beside harmonypy
2.1 (itself Harmony 2) on the same synthetic PCs.

Every run does the same amount of work: 10 Harmony iterations of 4 clustering iterations each (convergence
tests off), k = 100, one k-means start, 20 PCs. Each run is a fresh process, so its peak RSS
(ru_maxrss, which includes the shared data generation and imports) is its own.

    python benchmarks/harmony_scale.py --cells 100000 1000000 5000000 --out benchmarks/results/harmony_scale.json

Prints a table and writes JSON. Our time is split into the k-means start, the clustering and the
correction. Both use every core of the machine (ours: one thread per CPU; harmonypy: one per
physical core, its default).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from _common import machine, print_ratios, run_json, stage_times, write_results

ITERATIONS = dict(outer=10, inner=4, k=100, d=20, batches=8, types=20)


def synthetic_pcs(n: int, seed: int = 0):
    """PCs of ``types`` cell types with per-batch shifts and unequal batch composition."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    d, n_types, n_batches = ITERATIONS["d"], ITERATIONS["types"], ITERATIONS["batches"]
    batch = rng.integers(0, n_batches, n)
    weights = rng.dirichlet(np.ones(n_types), size=n_batches)  # composition differs between batches
    types = (rng.random(n)[:, None] > np.cumsum(weights[batch], axis=1)).sum(axis=1).clip(0, n_types - 1)
    z = rng.normal(size=(n, d))
    z += (rng.normal(size=(n_types, d)) * 3.0)[types]
    z += rng.normal(size=(n_batches, d))[batch]
    return z, pd.DataFrame({"batch": batch.astype(str)})


def run_one(method: str, n: int, chunk_size: int) -> dict:
    """Run one method in this process and return its measurements."""
    z, meta = synthetic_pcs(n)
    it = ITERATIONS
    # both: the Harmony iterations asked for, convergence tests off
    fixed = dict(max_iter_harmony=it["outer"], epsilon_cluster=-1.0, epsilon_harmony=-1.0)
    if method.startswith("symphony_dask"):
        import symphony_dask as sd

        flavor = "harmony2" if method.endswith("harmony2") else "harmony1"
        start = time.perf_counter()
        res = sd.harmonize(
            z,
            meta,
            "batch",
            n_clusters=it["k"],
            max_iter_cluster=it["inner"],
            n_init=1,
            **fixed,
            chunk_size=chunk_size,
            flavor=flavor,
        )
        wall = time.perf_counter() - start
        split = {name: round(v, 2) for name, v in res.timings_s.items()}
        iterations = res.n_iter
    else:
        import harmonypy

        start = time.perf_counter()
        res = harmonypy.run_harmony(
            z, meta, "batch", nclust=it["k"], max_iter_kmeans=it["inner"], **fixed, verbose=False
        )
        wall = time.perf_counter() - start
        split = {}
        iterations = len(res.objective_harmony) - 1
    return {
        "method": method,
        "cells": n,
        "seconds": round(wall, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
        "harmony_iterations": iterations,
        "split_s": split,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["symphony_dask", "symphony_dask_harmony2", "harmonypy"],
        help="symphony_dask (flavor harmony1), symphony_dask_harmony2, harmonypy (2.1: harmony 2)",
    )
    parser.add_argument("--chunk-size", type=int, default=None, help="cells per chunk (default: harmonize's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/harmony_scale.json"))
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "CELLS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.chunk_size)))
        return

    rows = []
    for n in args.cells:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--one", method, str(n)]
            if args.chunk_size:
                cmd += ["--chunk-size", str(args.chunk_size)]
            result = run_json(cmd)
            rows.append({"method": method, "cells": n, **result} if "error" in result else result)
            print(_row(rows[-1]), flush=True)
    print_ratios(rows, args.cells, "harmonypy")
    write_results(args.out, {**machine(), "work": ITERATIONS, "chunk_size": args.chunk_size}, rows)


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['method']:<14}{r['cells']:>10}  failed: {r['error']}"
    return (
        f"{r['method']:<14}{r['cells']:>10}{r['seconds']:>9.1f} s{r['peak_rss_gb']:>8.2f} GB  "
        f"{r['harmony_iterations']} iterations  {stage_times(r['split_s'])}"
    )


if __name__ == "__main__":
    main()
