"""The tutorial notebooks, executed top to bottom by a real Jupyter kernel (nbclient) in quick mode.

Quick mode (NBALIGN_QUICK=1) is read by each notebook's first code cell: fewer ranks, one short epoch,
four held-out questions. The notebook ends with a `RESULT {...}` line that these tests parse.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "python3"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """The `python3` kernel spec; installed into a private Jupyter path when the environment lacks one."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    mp = pytest.MonkeyPatch()
    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        prefix = tmp_path_factory.mktemp("jupyter")
        install(prefix=str(prefix), kernel_name=KERNEL)
        mp.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    yield KERNEL
    mp.undo()


def execute(name: str, cwd: Path, kernel: str, timeout: int = 600):
    """Run notebooks/<name> in `cwd`; returns the executed notebook (also saved in `cwd`). A failing cell
    raises CellExecutionError with its traceback."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name=kernel, resources={"metadata": {"path": str(cwd)}}
    )
    try:
        client.execute()
    finally:  # kept next to the run folder, to read when a test fails
        nbformat.write(nb, cwd / f"executed-{name}")
    return nb


def stdout_of(nb) -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.output_type == "stream" and out.name == "stdout"
    )


def result_of(nb) -> dict:
    lines = [line for line in stdout_of(nb).splitlines() if line.startswith("RESULT ")]
    assert lines, "the notebook printed no RESULT line"
    return json.loads(lines[-1][len("RESULT "):])


def test_notebooks_are_committed_clean():
    """Notebooks are stored without outputs, so diffs stay readable and nothing stale is shown."""
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has stored outputs"


@pytest.mark.parametrize("name", ["01_lora_sft.ipynb", "03_dpo.ipynb", "04_kto_thumbs.ipynb"])
def test_notebooks_read_quick_mode_first(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert 'QUICK = os.environ.get("NBALIGN_QUICK") == "1"' in first.source


@pytest.mark.slow
def test_lora_sft_notebook_runs_and_teaches_the_format(tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("NBALIGN_QUICK", "1")  # the kernel inherits this process's environment
    nb = execute("01_lora_sft.ipynb", tmp_path, kernel_name)

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors

    result = result_of(nb)
    assert result["status"] == "finished"
    assert result["n"] == 4
    assert result["steps"] == 13  # quick mode: one epoch of 51 examples at batch size 4
    assert result["tuned_ok"] > result["base_ok"], result
    assert result["tuned_ok"] >= 3, result  # quick mode reached 4/4 when written

    # The run folder went to the notebook's working directory, complete.
    run = tmp_path / "runs" / "json-sft"
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "metrics.jsonl").stat().st_size > 0

    text = stdout_of(nb)
    assert "trainable parameters 4,884,480" in text  # the %%lora cell's report (r=16, all-linear)
    assert "QLoRA keeps the base in" in text
    # The rank sweep's plot and the loss curve were drawn.
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 2


def images_in(nb, marker: str) -> int:
    """PNG images drawn by the code cells whose source contains `marker`."""
    return sum(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code" and marker in c.source
        for o in c.outputs
    )


def assert_no_errors(nb):
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors


@pytest.mark.slow
def test_dpo_notebook_runs_the_defaults_the_sweep_and_pure_dpo(tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("NBALIGN_QUICK", "1")
    nb = execute("03_dpo.ipynb", tmp_path, kernel_name)
    assert_no_errors(nb)

    result = result_of(nb)
    assert result["status"] == "finished"
    assert result["n"] == 2  # quick mode: two held-out pairs
    assert result["steps"] == 2  # quick mode: one epoch of two pairs at batch size 1
    assert result["accuracy_before"] == 0.5  # the policy starts as the reference: every pair a tie
    assert result["accuracy_after"] > 0.5, result  # quick mode reached 1.0 when written
    assert 0 <= result["terse_before"] <= result["n"] and 0 <= result["terse_after"] <= result["n"]
    assert result["kl"] > 0
    assert result["betas"] == [0.1, 0.5]
    assert result["sweep_status"] == ["finished", "finished"]
    assert result["pure_status"] == "finished"
    assert 0 <= result["pure_accuracy"] <= 1

    for folder in ("dpo", "dpo-beta-0.5", "dpo-pure"):
        run = tmp_path / "runs" / folder
        assert json.loads((run / "status.json").read_text())["status"] == "finished", folder
        assert (run / "evaluation.json").is_file() and (run / "adapter" / "adapter_config.json").is_file()
    # The pure run really trained without the SFT term; the default run with it.
    assert json.loads((tmp_path / "runs" / "dpo-pure" / "spec.json").read_text())["trl_config"]["loss_type"] == ["sigmoid"]
    assert json.loads((tmp_path / "runs" / "dpo" / "spec.json").read_text())["trl_config"]["loss_type"] == ["sigmoid", "sft"]

    text = stdout_of(nb)
    assert "preference accuracy" in text  # the evaluation table, printed
    # The curves, the beta sweep and the pure-DPO comparison were plotted.
    assert images_in(nb, "watch = metrics.dropna") >= 1
    assert images_in(nb, "by_beta = pd.DataFrame") >= 1
    assert images_in(nb, "logps/rejected") >= 1


@pytest.mark.slow
def test_kto_notebook_balances_thumbs_and_unpairs_pairs(tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("NBALIGN_QUICK", "1")
    nb = execute("04_kto_thumbs.ipynb", tmp_path, kernel_name)
    assert_no_errors(nb)

    result = result_of(nb)
    assert result["status"] == "finished"
    assert result["n"] == 2  # quick mode: two held-out pairs
    # Quick mode: the first six thumbs, four up and two down, balanced by weighing each thumbs-down twice.
    assert (result["rows"], result["n_up"], result["n_down"]) == (6, 4, 2)
    assert (result["desirable_weight"], result["undesirable_weight"]) == (1.0, 2.0)
    assert result["steps"] == 2  # one epoch of six rows at batch size 3
    assert result["accuracy_before"] == 0.5
    assert result["accuracy_after"] > 0.5, result  # quick mode reached 1.0 when written
    assert result["kl"] > 0
    assert result["unpair_status"] == "finished"
    assert result["unpair_rows"] == 4 and result["unpair_weights"] == [1.0, 1.0]  # two pairs: balanced
    assert 0 <= result["unpair_accuracy"] <= 1

    text = stdout_of(nb)
    assert "4 thumbs up vs 2 down; balanced with desirable_weight 1, undesirable_weight 2" in text
    assert "preference accuracy" in text
    for folder in ("kto", "kto-unpair"):
        run = tmp_path / "runs" / folder
        assert json.loads((run / "status.json").read_text())["status"] == "finished", folder
        assert (run / "evaluation.json").is_file()
    assert images_in(nb, "watch = metrics.dropna") >= 1  # the curves were plotted
