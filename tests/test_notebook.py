"""notebooks/quickstart.ipynb runs: every code cell, in order, in one namespace (no Jupyter needed)."""

import json
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_top_to_bottom():
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert len(code) >= 4
    namespace = {"__name__": "__main__"}
    for index, cell in enumerate(code):
        source = "".join(cell["source"])
        exec(compile(source, f"{NOTEBOOK.name} code cell {index}", "exec"), namespace)
    assert "reloaded" in namespace and namespace["scores"]["chrf"] > 30  # trained, then saved and reloaded
