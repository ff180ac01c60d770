"""What the benchmark scripts share: the synthetic atlases they build from, their runs in processes of
their own, the ratios to a peer, stage times in the tables, and the results file.

Imported as ``from _common import ...``: a script run by path (``python benchmarks/x.py``) has
benchmarks/ on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def write_atlas(cells: int, path: Path | str) -> None:
    """Write a synthetic atlas of ``cells`` cells (``symphony_dask.datasets.synthetic``) to ``path``."""
    subprocess.run(
        [sys.executable, "-m", "symphony_dask.datasets.synthetic", "--cells", str(cells), "--out", str(path)],
        check=True,
    )


def run_json(cmd: list[str], **kwargs) -> dict:
    """Run ``cmd`` (``kwargs`` go to subprocess.run): its last stdout line as JSON, or, where it failed,
    ``{"error": its last stderr line}``."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_ratios(rows: list[dict], cells: list[int], peer: str) -> None:
    """For each size, each of our finished runs' time and peak RSS over the peer's finished run's."""
    for n in cells:
        theirs = next((r for r in rows if r["cells"] == n and r["method"] == peer and "seconds" in r), None)
        for ours in (r for r in rows if r["cells"] == n and r["method"] != peer and "seconds" in r):
            if theirs:
                print(
                    f"{n:>9} cells: time ratio {ours['method']} / {peer} = {ours['seconds'] / theirs['seconds']:.2f}, "
                    f"peak RSS ratio = {ours['peak_rss_gb'] / theirs['peak_rss_gb']:.2f}"
                )


def stage_times(seconds: dict) -> str:
    """Stage times for a table row: ``name seconds, name seconds, ...``."""
    return ", ".join(f"{k} {v}" for k, v in seconds.items())


def machine() -> dict:
    """The machine (architecture, cores) and the Python: what a results file's setup starts with."""
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version()}


def write_results(out: Path, setup: dict, rows: list[dict]) -> None:
    """Write ``{"setup": setup, "runs": rows}`` as JSON to ``out`` (its folder made if missing)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setup": setup, "runs": rows}, indent=2) + "\n")
    print(f"written to {out}")
