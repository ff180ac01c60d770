"""The example notebook runs top to bottom on the bundled data (outputs are not kept in git)."""

from __future__ import annotations

import nbclient
import nbformat
import pytest
from _helpers import ROOT

NOTEBOOK = ROOT / "examples" / "pbmc_mapping.ipynb"


@pytest.mark.slow
def test_example_notebook_runs(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(
        not cell.get("outputs") and cell.get("execution_count") is None
        for cell in notebook.cells
        if cell.cell_type == "code"
    ), "commit the notebook with outputs stripped"
    nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        store_widget_state=True,
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    text = "\n".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    accuracy = float(text.split("5-NN accuracy ")[1].split(",")[0])
    assert accuracy >= 0.9
    difference = float(text.split("max |difference| of the corrected embedding: ")[1].split()[0])
    assert difference <= 1e-10
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3
    # the builds on threads and on the cluster draw a widget bar per pass, labeled with the stage
    # names the terminal shows, each complete at the end
    state = notebook.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    bars = []
    for cell in (notebook.cells[3], notebook.cells[-1]):
        views = [
            o["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
            for o in cell.outputs
            if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
        ]
        labels = {
            state[state[box]["state"]["children"][0].removeprefix("IPY_MODEL_")]["state"]["value"] for box in views
        }
        assert {"moments", "variable_genes", "pca"} <= labels, labels
        bars += views
    done = [m["state"]["value"] for m in state.values() if m["model_name"] == "FloatProgressModel"]
    assert len(done) == len(bars) and all(value == 1.0 for value in done)
