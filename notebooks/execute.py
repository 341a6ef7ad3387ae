"""Run the notebooks top to bottom and store them with their outputs (tables and plots), so a reader of the
repository sees what they produce without running them.

    python notebooks/execute.py            # both notebooks, full settings (digits, a few minutes on 2 cores)

The test suite runs the same notebooks at small settings (``tests/test_notebook.py``) and checks that the
stored copies carry the outputs of every code cell, no error, and no path of the machine that ran them.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
NOTEBOOKS = ("quickstart.ipynb", "your_model.ipynb")


def scrub(text: str) -> str:
    """Outputs name no path of the machine that ran them: its home and working folders become ``~`` and ``.``."""
    for path, short in ((str(HERE.parent), "."), (os.path.expanduser("~"), "~")):
        text = text.replace(path, short)
    return re.sub(r"/tmp/[^\s'\"]+", "<tmp>", text)


def execute(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    os.environ.pop("MPLBACKEND", None)        # the kernel's inline backend: plots are stored as images
    os.environ["CI"] = "1"                    # no progress bars in the stored outputs
    NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = scrub(out["text"])
            for kind in ("text/plain", "text/html", "text/markdown"):
                if kind in out.get("data", {}):
                    out["data"][kind] = scrub(out["data"][kind])
    nbformat.write(nb, path)
    print(f"executed and stored {path.name}")


if __name__ == "__main__":
    for name in sys.argv[1:] or NOTEBOOKS:
        execute(HERE / name)
