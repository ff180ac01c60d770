"""Reference building at atlas scale from chunked zarr, beside symphonypy (scanpy + harmonypy).

Each build runs in its own process; its peak RSS is sampled over the whole process tree (every
0.2 s, with psutil). Datasets come from ``symphony_dask.datasets.synthetic`` (written first if missing).

    python benchmarks/build_scale.py --cells 100000 500000 1400000 --builds default peer-work \\
        --peer-python /path/to/venv-with-symphonypy/bin/python

symphony_dask (``_build_ours.py``): ``build_reference(store, "donor", n_hvg=2000, n_pcs=20, chunk_size=10_000)``
as ``--builds`` asks (``default``: UMAP and neighbor index included; ``no-umap``; ``no-index``: no UMAP
and no neighbor index; ``peer-work``: Harmony 2 with harmonypy's defaults as symphonypy runs it, no UMAP
and no neighbor index) on the threaded scheduler (raw counts, log-normalized on the fly). symphonypy
(``_build_peer.py``): the same steps in memory (read the whole AnnData, ``normalize_total`` + ``log1p``,
2,000 Seurat-flavor variable genes, ``scale(max_value=10)``, 20 PCs, ``symphonypy.pp.harmony_integrate``
over ``donor``) with its defaults for Harmony (harmonypy 2.1). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from _common import machine, print_ratios, stage_times, write_atlas, write_results

HERE = Path(__file__).resolve().parent

#: Our builds (``--builds``): their labels in the table and what each leaves out.
BUILDS = {
    "default": ("symphony_dask", "the defaults (UMAP and neighbor index included)"),
    "no-umap": ("symphony_dask, umap=False", "no UMAP"),
    "no-index": ("symphony_dask, no UMAP, no index", "no UMAP and no neighbor index: the build's own work"),
    "peer-work": (
        "symphony_dask, peer's work",
        "the peer's work only: Harmony 2 with harmonypy's defaults, no UMAP, no neighbor index",
    ),
}


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``; return its last JSON line plus peak RSS of its process tree, or the failure."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    result = {"peak_rss_gb": round(peak[0] / 1e9, 2), "wall_s": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0:
        lines = err.strip().splitlines() or [f"exit code {proc.returncode}"]
        result["error"] = f"exit code {proc.returncode}: {lines[-1]}"
        return result
    result.update(json.loads(out.strip().splitlines()[-1]))
    return result


def dataset(n: int, data_dir: Path) -> Path:
    path = data_dir / f"atlas_{n}.zarr"
    if not path.exists():
        write_atlas(n, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000, 500_000, 1_400_000])
    parser.add_argument("--data-dir", type=Path, default=HERE / "data")
    parser.add_argument("--peer-python", help="a Python with symphonypy installed; omit to skip the peer")
    parser.add_argument("--peer-max-cells", type=int, default=500_000, help="largest dataset the peer is run on")
    parser.add_argument(
        "--builds",
        nargs="+",
        choices=list(BUILDS),
        default=["default"],
        help="our builds to run: " + "; ".join(f"{k}: {what}" for k, (_, what) in BUILDS.items()),
    )
    parser.add_argument(
        "--hvg-batch-key",
        default=None,
        help="pool each group's variable genes (as atlases are built: one group per donor); default: all cells",
    )
    parser.add_argument("--peer-umap", action="store_true", help="also run the peer with neighbors and UMAP")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "build_scale.json")
    args = parser.parse_args()
    pooled = ["--hvg-batch-key", args.hvg_batch_key] if args.hvg_batch_key else []

    rows = []
    for n in args.cells:
        path = dataset(n, args.data_dir)
        runs = [
            (BUILDS[b][0], [sys.executable, str(HERE / "_build_ours.py"), str(path), b, *pooled]) for b in args.builds
        ]
        if args.peer_python and n <= args.peer_max_cells:
            peer = [args.peer_python, str(HERE / "_build_peer.py"), str(path), *pooled]
            runs.append(("symphonypy", peer))
            if args.peer_umap:
                runs.append(("symphonypy + neighbors + UMAP", [*peer, "--umap"]))
        for method, cmd in runs:
            row = {"method": method, "cells": n, **run_measured(cmd)}
            rows.append(row)
            print(_row(row), flush=True)
    print_ratios(rows, args.cells, "symphonypy")
    setup = machine()
    setup["machine"] += f", {round(psutil.virtual_memory().total / 2**30)} GiB"
    write_results(args.out, setup, rows)


def _row(r: dict) -> str:
    head = f"{r['method']:<30}{r['cells']:>10}"
    if "error" in r:
        return f"{head}  failed after {r['wall_s']} s at {r['peak_rss_gb']} GB: {r['error']}"
    return f"{head}{r['seconds']:>9.1f} s{r['peak_rss_gb']:>8.2f} GB  {stage_times(r['stages_s'])}"


if __name__ == "__main__":
    main()
