"""fed_helpers.py and the notebooks must not drift apart.

Every top-level definition in a notebook cell that starts with `#| export` must appear in
fed_helpers.py with exactly the same source, every definition in fed_helpers.py must be
introduced by exactly one notebook, and its docstring (for functions and classes) must
name that notebook.
"""

from __future__ import annotations

import ast
import difflib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MARKER = "#| export"


def definitions(source: str) -> dict[str, tuple[str, ast.stmt]]:
    """name -> (exact source text, node) of each top-level def, class and assignment."""
    tree = ast.parse(source)
    lines = source.splitlines()
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        else:
            continue
        first = node.decorator_list[0].lineno if getattr(node, "decorator_list", None) else node.lineno
        text = "\n".join(lines[first - 1 : node.end_lineno])
        for name in names:
            out[name] = (text, node)
    return out


def exported() -> dict[str, list[tuple[str, str]]]:
    """name -> [(notebook stem, source)] over all export cells of all notebooks."""
    found: dict[str, list[tuple[str, str]]] = {}
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] == "code" and source.startswith(MARKER):
                for name, (text, _) in definitions(source).items():
                    found.setdefault(name, []).append((path.stem, text))
    return found


MODULE = definitions((ROOT / "fed_helpers.py").read_text())
EXPORTED = exported()


def test_notebooks_export_something():
    assert len(NOTEBOOKS) >= 6
    assert len(EXPORTED) >= 20


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_notebook_cell_matches_module(name):
    (stem, text), *more = EXPORTED[name]
    assert not more, f"{name} is introduced in several notebooks: {[stem] + [m[0] for m in more]}"
    assert name in MODULE, f"{name} is exported by {stem} but missing from fed_helpers.py"
    module_text = MODULE[name][0]
    diff = "\n".join(difflib.unified_diff(module_text.splitlines(), text.splitlines(),
                                          "fed_helpers.py", f"{stem}.ipynb", lineterm=""))
    assert module_text == text, f"{name} differs between fed_helpers.py and {stem}:\n{diff}"


@pytest.mark.parametrize("name", sorted(MODULE))
def test_module_definition_is_introduced_by_its_notebook(name):
    assert name in EXPORTED, f"fed_helpers.{name} is not introduced in any notebook's #| export cell"
    stem = EXPORTED[name][0][0]
    node = MODULE[name][1]
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        doc = ast.get_docstring(node) or ""
        assert f"Introduced in {stem}" in " ".join(doc.split()), (
            f"the docstring of {name} must say 'Introduced in {stem}'")


def test_later_notebooks_import_rather_than_redefine():
    """A helper introduced in notebook N is imported, never redefined, by later notebooks.

    (Earlier ones may show a simpler version: 00_overview shows the original 40-line
    example with its own SimpleNN before 01_model builds ours.)
    """
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        redefined = [name for src in code if not src.startswith(MARKER)
                     for name in definitions(src) if name in MODULE and EXPORTED[name][0][0] < path.stem]
        assert not redefined, f"{path.name} redefines {redefined}; import them from fed_helpers"
