"""The quick-start notebook runs, ships with its outputs, and uses only the public API."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _code(notebook: dict) -> str:
    return "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")


def test_shipped_notebook_is_executed_and_uses_the_public_api():
    notebook = json.loads(NOTEBOOK.read_text())
    code = _code(notebook)
    assert "recipe_search.search(" in code and "apply_recipe(" in code
    for internal in ("pipeline", "LoadedModel", "search_recipes", "load_model", "build_inputs"):
        assert internal not in code, internal
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(c["execution_count"] for c in cells), "run scripts/execute_notebook.py to ship outputs"
    text = "".join("".join(o.get("text", "")) for c in cells for o in c["outputs"])
    assert "pruned model (25% FLOPs) says:" in text and "Traceback" not in text


@pytest.mark.skipif(importlib.util.find_spec("nbclient") is None, reason="nbclient is in the test extra")
def test_notebook_executes(tmp_path):
    import sys

    sys.path.insert(0, str(NOTEBOOK.parents[1] / "scripts"))
    from execute_notebook import execute

    executed = execute(NOTEBOOK, tmp_path)
    text = "".join("".join(o.get("text", "")) for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    searched = re.search(r"25%: full FLOPs [\d.]+%, visual tokens entering each layer (\[[\d, ]+\])", text)
    applied = re.search(r"^visual tokens entering each layer: (\[[\d, ]+\])", text, re.M)
    assert searched and applied and searched.group(1) == applied.group(1)  # generate() ran the searched schedule
    assert (tmp_path / "demo-25pct.json").is_file() and (tmp_path / "retention.png").stat().st_size > 1000
