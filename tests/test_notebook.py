"""The Colab quickstart runs top to bottom on the default model."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Paris" in outputs
    assert "JAX" in outputs and " on cpu " in outputs  # the runtime it found
    timed = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("%%time")]
    assert len(timed) == sum(c.cell_type == "code" for c in nb.cells)  # every cell says how long its work took
    assert all("Wall time" in "".join(o.get("text", "") for o in c.outputs) for c in timed)
