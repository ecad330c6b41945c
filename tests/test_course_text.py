"""The course's own text must not go stale as notebooks are written.

- The course map in 00_overview and the "Next steps" section of every notebook never call a
  notebook that exists "coming", "being written", "planned", "(soon)" or the like.
- A "Next steps" section (and the course map) links only to notebooks that exist, and names no
  notebook file that does not.

A notebook is recognised by its file name (`06_client_drift`), by "notebook 06" or "notebooks
06-08", and by the number that starts a table row or a list item ("| 06 ·", "- 06 ..."). Each check is
also run on broken copies made in memory, so that it is known to fail when it should.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXISTING = {p.stem[:2]: p.stem for p in NOTEBOOKS}  # "06" -> "06_client_drift"

STALE = re.compile(r"\bcoming\b|\bupcoming\b|being written|\bplanned\b|\(soon\)|\bsoon\b|not (?:yet )?written|"
                   r"yet to be written|to be written|work in progress|\bWIP\b", re.I)
STEM = re.compile(r"\b(\d\d)_[a-z][a-z0-9_]*")
NUMBERED = re.compile(r"\bnotebooks?\s+(\d\d(?:\s*(?:,|and|or|to|–|-)\s*\d\d)*)", re.I)
ROW_START = re.compile(r"^\s*(?:\||[-*])\s*[\[*]*\s*(\d\d)\b")  # "| 06 ...", "- 06 ...", "- **06** ..."
LINK = re.compile(r"\]\(([^)\s]+)\)")


def load_cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def section(cells: list[dict], title: str) -> str:
    """The markdown under the heading `title` (any level), up to the next heading of the same
    or a higher level, or the next code cell. "" when there is no such heading."""
    text = "\n".join("".join(c["source"]) if c["cell_type"] == "markdown" else "\n# (code cell)\n" for c in cells)
    found = re.search(rf"^(#+)\s+{re.escape(title)}\s*$", text, re.M | re.I)
    if not found:
        return ""
    level = len(found.group(1))
    end = re.compile(rf"^#{{1,{level}}}\s", re.M).search(text, found.end())
    return text[found.end(): end.start() if end else len(text)].strip()


def numbers(fragment: str) -> set[str]:
    """Two-digit numbers of the notebooks that `fragment` names."""
    found = {m.group(1) for m in STEM.finditer(fragment)}
    if m := ROW_START.match(fragment):
        found.add(m.group(1))
    for m in NUMBERED.finditer(fragment):
        parts = re.findall(r"\d\d|to|–|-", m.group(1))
        for i, p in enumerate(parts):
            if p.isdigit():
                found.add(p)
            elif 0 < i < len(parts) - 1 and parts[i - 1].isdigit() and parts[i + 1].isdigit():  # a range, 06–08
                found.update(f"{n:02d}" for n in range(int(parts[i - 1]), int(parts[i + 1]) + 1))
    return found


def fragments(text: str) -> list[str]:
    """Table rows whole; other lines split into sentences and clauses."""
    out = []
    for line in text.splitlines():
        if line.lstrip().startswith("|"):
            out.append(line.strip())
        else:
            out += [f for f in re.split(r"(?<=[.!?])\s+(?=[A-Z\[*`(])|;\s+", line) if f.strip()]
    return out


def stale_mentions(text: str) -> list[str]:
    """Fragments that call a notebook that exists coming, being written, planned, ..."""
    return [f for f in fragments(text) if STALE.search(f) and numbers(f) & EXISTING.keys()]


def missing_notebooks(text: str) -> list[str]:
    """Links to notebooks, and notebook file names, that do not exist."""
    bad = [t for t in LINK.findall(text) if t.split("#")[0].endswith(".ipynb") and "://" not in t
           and not (ROOT / "notebooks" / t.split("#")[0]).exists()]
    for m in STEM.finditer(text):
        if not (ROOT / "notebooks" / f"{m.group(0)}.ipynb").exists():
            bad.append(m.group(0))
    return bad


def checked_text(path: Path) -> dict[str, str]:
    """{section name: its text} of the sections these tests read in notebook `path`."""
    cells = load_cells(path)
    out = {"Next steps": section(cells, "Next steps")}
    if path.stem.startswith("00_"):
        out["The map of the course"] = section(cells, "The map of the course")
    return out


def test_the_sections_are_there():
    """Guards the other tests from passing on nothing."""
    assert len(NOTEBOOKS) >= 9
    for path in NOTEBOOKS:
        for name, text in checked_text(path).items():
            assert text, f"{path.name} has no '{name}' section (or it is empty)"
    course_map = checked_text(NOTEBOOKS[0])["The map of the course"]
    assert {n for f in fragments(course_map) for n in numbers(f)} >= set(EXISTING) - {"00"}, (
        "the course map must name every notebook after 00")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_existing_notebook_is_called_coming(path):
    for name, text in checked_text(path).items():
        stale = stale_mentions(text)
        assert not stale, f"{path.name}, '{name}', calls a notebook that exists unfinished: {stale}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_next_steps_link_only_to_notebooks_that_exist(path):
    for name, text in checked_text(path).items():
        missing = missing_notebooks(text)
        assert not missing, f"{path.name}, '{name}', names notebooks that do not exist: {missing}"


def broken(path: Path, title: str, extra: str) -> str:
    """Section `title` of a copy of notebook `path` with the line `extra` put first in it, in memory."""
    cells = copy.deepcopy(load_cells(path))
    heading = re.compile(rf"^(#+\s+{re.escape(title)}\s*\n)", re.M)
    cell = next(c for c in cells if c["cell_type"] == "markdown" and heading.search("".join(c["source"])))
    cell["source"] = [heading.sub(lambda m: m.group(1) + extra + "\n\n", "".join(cell["source"]), count=1)]
    text = section(cells, title)
    assert extra in text
    return text


def test_the_checks_fail_on_broken_copies():
    overview, last = NOTEBOOKS[0], NOTEBOOKS[-1]
    unfinished = [
        (overview, "The map of the course", f"| {EXISTING['06']} *(coming)* | FedProx | non-IID data |"),
        (overview, "The map of the course", "| 07 · scaling *(soon)* | actors | scale |"),
        (last, "Next steps", f"[{EXISTING['05']}]({EXISTING['05']}.ipynb): the loop. (Notebook 06 is being written.)"),
        (last, "Next steps", "- Notebooks 05–07 are planned."),
        (last, "Next steps", "- Notebook 08, on clients that fail, is coming."),
        (last, "Next steps", "- 06 on client drift: coming soon."),
    ]
    for path, title, extra in unfinished:
        assert stale_mentions(broken(path, title, extra)), f"not caught: {extra!r}"
    for path, title, extra in [(last, "Next steps", "[09_privacy](09_privacy.ipynb): what updates leak."),
                               (overview, "The map of the course", "| 13_personalization *(planned)* | x |")]:
        assert missing_notebooks(broken(path, title, extra)), f"not caught: {extra!r}"
    # ...while notebooks that do not exist yet may be called planned, and named without a file name
    for extra in ["- Coming next: privacy and secure aggregation.", "| 12 · robust aggregation *(planned)* | x | y |",
                  "Notebook 12 is coming; notebook 01 is done."]:
        text = broken(overview, "The map of the course", extra)
        assert not stale_mentions(text) and not missing_notebooks(text), f"a false alarm: {extra!r}"
