"""The example notebook runs top to bottom on the bundled data (outputs are not kept in git)."""

from __future__ import annotations

from pathlib import Path

import nbclient
import nbformat

NOTEBOOK = Path(__file__).parents[1] / "examples" / "pbmc_mapping.ipynb"


def test_example_notebook_runs(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in notebook.cells if cell.cell_type == "code"), "commit the notebook with outputs stripped"
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    accuracy = float(text.split("5-NN accuracy ")[1].split(",")[0])
    assert accuracy >= 0.9
    difference = float(text.split("max |difference| of the corrected embedding: ")[1].split()[0])
    assert difference <= 1e-10
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3
