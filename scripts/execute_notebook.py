"""Execute notebooks/quickstart.ipynb in place, so it ships with the outputs it really produces.

    python scripts/execute_notebook.py [--check]

`--check` runs it in a temporary folder and writes nothing (what tests/test_notebook.py does).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def execute(path: Path, workdir: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """The notebook at `path`, executed with `workdir` as its working folder."""
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    return notebook


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="execute without writing the notebook back")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="quickstart-"))
    try:
        notebook = execute(NOTEBOOK, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if not args.check:
        nbformat.write(notebook, NOTEBOOK)
        print(f"executed and saved {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
