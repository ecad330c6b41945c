"""Notebooks are committed without outputs, and each has the course's shape."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_stripped(path):
    for i, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name} cell {i} carries outputs"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_cell_has_a_unique_id(path):
    """nbformat 4.5 cell ids (a missing one is a warning today, an error in future nbformat)."""
    ids = [cell.get("id") for cell in json.loads(path.read_text())["cells"]]
    assert None not in ids, f"{path.name}: cell {ids.index(None)} has no id"
    assert len(set(ids)) == len(ids), f"{path.name}: repeated cell ids"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_shape(path):
    assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name), "name must be NN_snake_case_title.ipynb"
    cells = json.loads(path.read_text())["cells"]
    markdown = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert "".join(cells[0]["source"]).startswith("# "), "open with an H1 title"
    for heading in ["**You will learn**", "**Prerequisites:**", "## Parameters", "## Recap",
                    "## Exercises", "<details><summary>Solution", "## Next steps"]:
        assert heading in markdown, f"{path.name} lacks {heading!r}"
    assert any("torch.__version__" in c and "ray.__version__" in c for c in code), "setup cell prints versions"
    assert any(re.search(r"^\s*assert ", c, re.M) for c in code), "learning outcomes are checked with assert"
    assert re.search(r"^1\. \*\*", markdown, re.M), "exercise 1 asks to change, predict, then check"
    if any("ray.init" in c or "init_ray(" in c for c in code):
        assert "ray.shutdown()" in code[-1], "a notebook that starts Ray ends with ray.shutdown()"
