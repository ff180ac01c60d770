"""The README's Python examples on the bundled data run as written."""

from __future__ import annotations

import re

import matplotlib
import pytest
from _helpers import ROOT

README = ROOT / "README.md"


def _section(title: str, text: str) -> str:
    start = text.index(f"## {title}\n")
    following = text.find("\n## ", start + 1)
    return text[start : following if following >= 0 else None]


@pytest.mark.slow
def test_in_python_examples_run_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", _section("In Python", README.read_text()), flags=re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    matplotlib.use("Agg")
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    query = namespace["query"]
    assert {"cell_type_pred", "percent_mito_pred", "mapping_score"} <= set(query.obs.columns)
    accuracy = (query.obs["cell_type_pred"].astype(str) == query.obs["cell_type"].astype(str)).mean()
    assert accuracy == pytest.approx(0.914, abs=0.01)  # README: 0.914 (the cells min_confidence leaves out were wrong)
    assert (tmp_path / "pbmc_ref.zarr").is_dir()
    assert namespace["cells"].obsm["X_umap"].shape == (910, 2) and query.obsm["X_umap"].shape == (290, 2)
