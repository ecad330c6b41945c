"""Execute every notebook headless, in order, and keep the results.

Writes executed copies (with outputs) to build/notebooks/ and HTML to build/html/, and
prints each notebook's wall time. Exits non-zero if any notebook fails.
Usage: python tools/run_notebooks.py [notebooks/NN_name.ipynb ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"


def run(path: Path) -> tuple[float, str]:
    """Execute one notebook in its own folder; return (seconds, error or "")."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    error = ""
    try:
        client.execute()
    except CellExecutionError as err:
        error = str(err).strip().splitlines()[-1]
    seconds = time.perf_counter() - start
    (BUILD / "notebooks").mkdir(parents=True, exist_ok=True)
    (BUILD / "html").mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, BUILD / "notebooks" / path.name)
    html, _ = HTMLExporter().from_notebook_node(nb)
    (BUILD / "html" / path.with_suffix(".html").name).write_text(html, encoding="utf-8")
    return seconds, error


def main(paths: list[str]) -> int:
    notebooks = [Path(p).resolve() for p in paths] or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    failed = 0
    total = 0.0
    print(f"{'notebook':<34} {'seconds':>8}  result")
    for path in notebooks:
        seconds, error = run(path)
        total += seconds
        failed += bool(error)
        print(f"{path.name:<34} {seconds:>8.1f}  {'FAILED: ' + error if error else 'ok'}", flush=True)
    print(f"{'total':<34} {total:>8.1f}  executed copies in {BUILD / 'notebooks'}, HTML in {BUILD / 'html'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
