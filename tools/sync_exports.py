"""Copy definitions from fed_helpers.py into the notebook cells that introduce them.

The course's rule is "edit the notebook, then copy the cell into fed_helpers.py"; when a
change is easier to make (and test) in the module, this does the copy the other way:
every top-level definition in an `#| export` cell whose source differs from the module's
is replaced by the module's text. It never adds or removes definitions, and only touches
notebooks whose export cells changed. `tests/test_sync.py` checks the result.

    python tools/sync_exports.py            # rewrite the notebooks
    python tools/sync_exports.py --check    # only list what differs; exit 1 if anything does
    python tools/sync_exports.py --only 07_scaling_with_ray   # touch this notebook only
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "#| export"


def definitions(source: str) -> dict[str, str]:
    """name -> exact source text of each top-level def, class and assignment."""
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        else:
            continue
        first = node.decorator_list[0].lineno if getattr(node, "decorator_list", None) else node.lineno
        for name in names:
            out[name] = "\n".join(lines[first - 1 : node.end_lineno])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report differences (exit 1 if any)")
    parser.add_argument("--only", action="append", default=[], metavar="STEM",
                        help="only this notebook (its name without .ipynb); may be repeated")
    args = parser.parse_args()
    module = definitions((ROOT / "fed_helpers.py").read_text())
    changed = []
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        if args.only and path.stem not in args.only:
            continue
        nb = json.loads(path.read_text())
        touched = False
        for cell in nb["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] != "code" or not source.startswith(MARKER):
                continue
            new = source
            for name, text in definitions(source).items():
                if name in module and module[name] != text:
                    new = new.replace(text, module[name], 1)
                    changed.append(f"{path.stem}: {name}")
            if new != source:
                cell["source"] = new.splitlines(keepends=True)
                touched = True
        if touched and not args.check:
            path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    for line in changed:
        print(("differs: " if args.check else "updated: ") + line)
    return 1 if (changed and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
