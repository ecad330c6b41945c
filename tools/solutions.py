"""Run each "change X" exercise headless and print the figures its solution quotes.

A solution must state what a run of exactly that change shows, not what one expects. For each
notebook, `tools/solutions/<notebook>.json` lists its exercises: the knobs to change in the
parameter cell and the expressions whose values the solution quotes, e.g.

    [{"exercise": 1, "set": {"CLIENT_FRACTION": 0.3},
      "print": {"final IID accuracy": "iid_history[-1]['accuracy']"}}]

This runs the notebook with those knobs (every other cell unchanged), evaluates the expressions
just before the last cell (which shuts Ray down), and prints them. It takes a few minutes per
exercise and is not part of `make test`; run it after changing a notebook or its exercises:

    python tools/solutions.py                      # every notebook that has a spec
    python tools/solutions.py 05_round_loop --exercise 1
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "tools" / "solutions"


def with_knobs(nb, knobs: dict) -> None:
    """Set each knob in the first code cell that assigns it at the start of a line."""
    for name, value in knobs.items():
        pattern = re.compile(rf"^{re.escape(name)}\s*=.*?(?=\s+#|$)", re.M)
        cell = next((c for c in nb.cells if c.cell_type == "code" and pattern.search(c.source)), None)
        if cell is None:
            raise SystemExit(f"no cell assigns {name}: check the spec")
        cell.source = pattern.sub(f"{name} = {value!r}", cell.source, count=1)


def run_exercise(stem: str, spec: dict, timeout: int) -> dict:
    nb = nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4)
    with_knobs(nb, spec.get("set", {}))
    probe = "import json as _j\nprint('@@' + _j.dumps({%s}, default=str))" % ", ".join(
        f"{k!r}: ({v})" for k, v in spec.get("print", {}).items())
    nb.cells.insert(len(nb.cells) - 1, nbformat.v4.new_code_cell(probe))
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    out = "".join(o.get("text", "") for o in nb.cells[-2].outputs)
    return json.loads(out.split("@@", 1)[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="notebook names without .ipynb (default: all with a spec)")
    parser.add_argument("--exercise", type=int, action="append", help="only these exercise numbers")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell (default 900)")
    args = parser.parse_args()
    stems = args.notebooks or sorted(p.stem for p in SPECS.glob("*.json"))
    for stem in stems:
        for spec in json.loads((SPECS / f"{stem}.json").read_text()):
            if args.exercise and spec["exercise"] not in args.exercise:
                continue
            start = time.perf_counter()
            figures = run_exercise(stem, spec, args.timeout)
            print(f"{stem} exercise {spec['exercise']} with {spec.get('set', {})} "
                  f"({time.perf_counter() - start:.0f} s):")
            for name, value in figures.items():
                print(f"    {name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
