"""One symphony_dask build for build_scale.py, run in a process of its own; prints a JSON line.

    python benchmarks/_build_ours.py STORE {default,no-umap,no-index,peer-work} [--hvg-batch-key donor]

``build_reference(STORE, "donor", n_hvg=2000, n_pcs=20, chunk_size=10_000)`` (with ``hvg_batch_key``: each
group's top 2,000 variable genes, pooled) with the settings of the build asked for (build_scale.py's
``BUILDS`` says what each leaves out), on the threaded scheduler.
The line: wall seconds (the import of symphony_dask excluded), stage times, and what the build chose.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import symphony_dask as sd

#: Each build's arguments beyond the common ones.
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "no-umap": {"umap": False},
    "no-index": {"umap": False, "neighbor_index": False},
    "peer-work": {"umap": False, "neighbor_index": False, "harmony_flavor": "harmony2"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="a zarr store of raw counts with obs column 'donor'")
    parser.add_argument("build", choices=list(SETTINGS))
    parser.add_argument("--hvg-batch-key", default=None, help="obs column whose groups' variable genes are pooled")
    args = parser.parse_args()
    start = time.perf_counter()
    ref = sd.build_reference(
        args.store, "donor", n_hvg=2000, hvg_batch_key=args.hvg_batch_key, n_pcs=20, chunk_size=10_000,
        **SETTINGS[args.build],
    )  # fmt: skip
    wall = time.perf_counter() - start
    p = ref.params
    result = {
        "seconds": round(wall, 1),
        "stages_s": {k: round(v, 1) for k, v in p["timings_s"].items()},
        "genes": p["n_variable_genes"],
        "pca_solver": p["pca_solver"],
        "pca_passes": p["pca_passes"],
        "gene_cache": p.get("gene_cache"),
        "clusters": p["n_clusters"],
        "harmony_iterations": p["harmony_iterations"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
