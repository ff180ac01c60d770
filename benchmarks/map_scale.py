"""Query mapping and label transfer at scale, beside symphonypy's mapping on the same data.

References are built from synthetic atlases (``symphony_dask.datasets.synthetic``) and saved once;
queries are the first 1k, 10k and 100k cells of a separate synthetic atlas (37 donors, same cell
types; see benchmarks/README.md for how its donors relate to the references'), held in memory, and
all 1M cells of it mapped from its zarr store in chunks.

    python benchmarks/map_scale.py --reference benchmarks/data/ref_atlas_50000.zarr \\
        --reference benchmarks/data/atlas_1400000.zarr --query benchmarks/data/query_atlas_1000000.zarr \\
        --peer-python /path/to/venv-with-symphonypy/bin/python

Times: ``map_query`` from an in-memory AnnData of raw counts to the corrected embedding (read
excluded; best of 3), the same 100k cells as 4 zarr shards mapped together (read included), the
1M-cell query from disk in chunks (read included), and 5-NN label transfer
(``transfer_labels``). symphonypy 0.2.4 is timed on the 50k reference (it cannot build the 1.4M one
in 24 GB): ``map_embedding`` after ``normalize_total`` + ``log1p``, and ``transfer_labels_kNN``, run by
the peer's Python in ``_map_peer.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import time
from pathlib import Path

from _common import machine, write_results

HERE = Path(__file__).resolve().parent
SIZES = (1_000, 10_000, 100_000)


def first_cells(path: Path, n: int):
    """The first ``n`` cells of a store as an in-memory AnnData (read lazily, only those rows)."""
    import anndata as ad

    from symphony_dask._io.expression import read_expression

    expr = read_expression(path, chunk_size=10_000)
    return ad.AnnData(expr.X[:n].compute(), obs=expr.obs.iloc[:n].copy(), var=expr.var.copy())


def write_shards(path: Path, n: int, n_shards: int) -> Path:
    """The first ``n`` cells of a store written as ``n_shards`` zarr shards (once), for sharded mapping."""
    folder = path.with_name(f"{path.stem}_{n}_shards")
    if not folder.exists():
        query = first_cells(path, n)
        folder.mkdir()
        step = -(-n // n_shards)
        for i in range(n_shards):
            query[i * step : (i + 1) * step].write_zarr(folder / f"shard{i}.zarr")
    return folder


def best_of(runs: int, func) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(runs):
        start = time.perf_counter()
        out = func()
        best = min(best, time.perf_counter() - start)
    return best, out


def ours(reference_store: Path, query_store: Path, full_query: bool) -> list[dict]:
    import symphony_dask as sd

    saved = reference_store.with_name(reference_store.stem + ".symphony_ref.zarr")
    build_s = None
    if not saved.exists():
        start = time.perf_counter()
        ref = sd.build_reference(reference_store, "donor", n_hvg=2000, n_pcs=20, chunk_size=10_000)
        build_s = time.perf_counter() - start
        ref.save(saved)
    start = time.perf_counter()
    ref = sd.load_reference(saved)
    load_s = time.perf_counter() - start
    rows = []
    base = {
        "method": "symphony_dask",
        "reference_cells": ref.n_cells,
        "reference_load_s": round(load_s, 2),
        "neighbor_index": ref.neighbors.method if ref.neighbors else "exact",
        "neighbor_index_build_s": round(ref.params["timings_s"].get("neighbor_index", 0.0), 1),
    }
    if build_s is not None:
        base["reference_build_s"] = round(build_s, 1)
    for n in SIZES:
        query = first_cells(query_store, n)
        seconds, mapped = best_of(3, functools.partial(sd.map_query, ref, query, "donor"))  # annotates query in place
        transfer = functools.partial(sd.transfer_labels, ref, mapped, "cell_type", k=5)
        transfer_s, _ = best_of(1 if n > 10_000 else 3, transfer)
        accuracy = float((mapped.obs["cell_type_pred"] == mapped.obs["cell_type"]).mean())
        rows.append(
            {
                **base,
                "query_cells": n,
                "map_s": round(seconds, 3),
                "transfer_s": round(transfer_s, 3),
                "accuracy": round(accuracy, 4),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    shards = write_shards(query_store, SIZES[-1], n_shards=4)
    seconds, mapped = best_of(1, lambda: sd.map_query(ref, str(shards / "*.zarr"), "donor"))
    rows.append(
        {**base, "query_cells": mapped.n_obs, "query_shards": 4, "map_s": round(seconds, 2), "read_included": True}
    )
    print(json.dumps(rows[-1]), flush=True)
    if full_query:
        start = time.perf_counter()
        mapped = sd.map_query(ref, query_store, "donor", chunk_size=10_000)
        seconds = time.perf_counter() - start
        transfer_s, _ = best_of(1, lambda: sd.transfer_labels(ref, mapped, "cell_type", k=5))
        rows.append(
            {
                **base,
                "query_cells": mapped.n_obs,
                "map_s": round(seconds, 1),
                "read_included": True,
                "transfer_s": round(transfer_s, 1),
                "accuracy": round(float((mapped.obs["cell_type_pred"] == mapped.obs["cell_type"]).mean()), 4),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, action="append", required=True, help="reference atlas store")
    parser.add_argument("--query", type=Path, required=True, help="query atlas store (>= 100k cells)")
    parser.add_argument("--peer-python", help="a Python with symphonypy installed; omit to skip the peer")
    parser.add_argument("--peer-max-cells", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "map_scale.json")
    args = parser.parse_args()

    rows = []
    for store in args.reference:
        rows += ours(store, args.query, full_query=True)
        n_ref = rows[-1]["reference_cells"]
        if args.peer_python and n_ref <= args.peer_max_cells:
            done = subprocess.run(
                [args.peer_python, str(HERE / "_map_peer.py"), str(store), str(args.query)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                rows.append(
                    {"method": "symphonypy", "reference_cells": n_ref, "error": done.stderr.strip().splitlines()[-1]}
                )
                print(json.dumps(rows[-1]))
            for line in done.stdout.strip().splitlines():
                rows.append(json.loads(line))
                print(line, flush=True)
    write_results(args.out, machine(), rows)


if __name__ == "__main__":
    main()
