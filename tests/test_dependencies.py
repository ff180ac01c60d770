"""Every declared runtime dependency is imported by the package (none is declared and unused)."""

from __future__ import annotations

import ast
import re
from importlib.metadata import packages_distributions

import pytest
from _helpers import ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _imported_modules() -> set[str]:
    names = set()
    for path in (ROOT / "symphony_dask").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


#: Runtime dependencies that another dependency imports for us, and which one.
USED_BY_OTHERS = {"bokeh": "distributed"}  # the dashboard: without bokeh it serves only "Dask needs bokeh"


def test_every_runtime_dependency_is_imported():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {_normalized(re.split(r"[\[<>=!~ ;]", spec, maxsplit=1)[0]) for spec in declared}
    providers = packages_distributions()
    used = {_normalized(dist) for module in _imported_modules() for dist in providers.get(module, [])}
    assert declared - used == set(USED_BY_OTHERS), f"declared but never imported: {sorted(declared - used)}"
    assert set(USED_BY_OTHERS.values()) <= used
    assert {"faiss-cpu", "rdata", "xarray", "psutil"} <= declared  # the ones issue #13 asked about
    assert "hnswlib" not in declared and "dask-ml" not in declared
