"""Small data, probes and notebook/kernel helpers shared by the tests (plain functions; fixtures live in
conftest.py)."""

from __future__ import annotations

import gc
import json
import os
import signal
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def chats(n: int = 16) -> list[dict]:
    """A trivially learnable task: always answer 'OK <n>'."""
    return [
        {"messages": [{"role": "user", "content": f"Say the number {i}."},
                      {"role": "assistant", "content": f"OK {i}"}]}
        for i in range(n)
    ]


def shared_run(name: str, train):
    """The run `name`, trained by `train(out)` once per test session and shared by the tests that need the same
    training, on any worker: the first to ask trains it under a file lock while the others wait, and a run that did
    not finish (a failed or interrupted first try) is trained again. The folder lives in NBALIGN_TEST_SHARED_RUNS
    (conftest.py), which the workers inherit."""
    import shutil

    from filelock import FileLock

    from nbalign import Run
    from nbalign.runfolder import read_status

    root = Path(os.environ["NBALIGN_TEST_SHARED_RUNS"])
    root.mkdir(parents=True, exist_ok=True)
    out = root / name
    with FileLock(str(root / f"{name}.lock")):
        if read_status(out).get("status") != "finished":
            shutil.rmtree(out, ignore_errors=True)
            train(str(out))
    return Run(out)


def live_models() -> int:
    """How many transformers models are still alive in this process."""
    from transformers import PreTrainedModel

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, PreTrainedModel))


def close(expected, rel: float = 1e-4, abs: float = 1e-6):
    """pytest.approx for a number computed twice in different batches: padding and batch shape change float
    sums at ~1e-6 relative on some CPUs (AVX2), so 1e-4 relative, and a small absolute slack near 0."""
    import pytest

    return pytest.approx(expected, rel=rel, abs=abs)


def moved_weights(base: str, saved: Path) -> list[str]:
    """Names of the saved tensors that training moved: the LoRA B matrices (zero at init) of an adapter
    folder, or the weights that differ from the base model's in a full model folder."""
    import torch
    from safetensors.torch import load_file

    saved = Path(saved)
    if (saved / "adapter_model.safetensors").exists():
        tensors = load_file(saved / "adapter_model.safetensors")
        return [k for k, v in tensors.items() if "lora_B" in k and v.abs().max() > 0]
    before, after = load_file(Path(base) / "model.safetensors"), load_file(saved / "model.safetensors")
    return [k for k in after if k in before and not torch.equal(before[k], after[k])]


def logged(run, key: str) -> list[dict]:
    """The metrics rows of a run that carry a (non-NaN) `key`."""
    return [r for r in run.metrics.to_dict("records") if key in r and r[key] == r[key]]


def interrupt_at(monkeypatch, step: int, times: int = 1):
    """Send SIGINT to ourselves (what a kernel interrupt does) `times` times, once, when training logs `step`."""
    from nbalign.callbacks import MetricsWriter

    original = MetricsWriter.on_log
    fired = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        original(self, args, state, control, logs=logs, **kwargs)
        if state.global_step == step and "loss" in (logs or {}) and not fired:
            fired.append(step)
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(MetricsWriter, "on_log", on_log)


# ----------------------------------------------------------------------------------------------------
# Notebooks executed by a real kernel (tests/test_notebooks*.py)


def python3_kernel(prefix: Path, monkeypatch) -> str:
    """The name of a `python3` kernel spec. When the environment has none, one is installed under `prefix`
    and JUPYTER_PATH points there (through `monkeypatch`, so the caller undoes it)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    name = "python3"
    try:
        KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        install(prefix=str(prefix), kernel_name=name)
        monkeypatch.setenv("JUPYTER_PATH", str(Path(prefix) / "share" / "jupyter"))
    return name


def execute_notebook(name: str, cwd: Path, kernel: str, timeout: int = 600):
    """Run notebooks/<name> in `cwd`; returns the executed notebook (also saved in `cwd`). A failing cell
    raises CellExecutionError with its traceback."""
    import nbclient
    import nbformat

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in nb.cells:  # stored with a full run's outputs: none of them may be read as this run's
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name=kernel, resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute()
    finally:  # kept next to the run folder, to read when a test fails
        nbformat.write(nb, cwd / f"executed-{name}")
    return nb


def code_outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def stdout_of(nb) -> str:
    return "".join(o.get("text", "") for o in code_outputs(nb) if o.output_type == "stream" and o.name == "stdout")


def assert_no_errors(nb):
    """No error, no "IProgress not found" warning, and each cell shows a training curve at most once (the live
    plot is replaced by the Run's summary, which carries the whole curve)."""
    errors = [o for o in code_outputs(nb) if o.output_type == "error"]
    assert not errors, errors
    warned = [o for o in code_outputs(nb) if "IProgress not found" in json.dumps(o)]
    assert not warned, warned
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        curves = [o for o in cell.get("outputs", []) if _is_loss_curve(o)]
        assert len(curves) <= 1, (cell.source, [o.get("data", {}).get("text/plain") for o in curves])


def _is_loss_curve(output) -> bool:
    data = output.get("data", {})
    live = "image/png" in data and "Figure size" not in data.get("text/plain", "")
    summary = "data:image/png" in data.get("text/html", "") and "nbalign " in data.get("text/html", "")
    return live or summary


def figure_axes(nb) -> list[int]:
    """The matplotlib figures the notebook showed, in order, as their number of axes (read from the figure's
    text form, '<Figure size 600x350 with 1 Axes>'). nbalign's live curves are PNG images, not figures."""
    import re

    out = []
    for o in code_outputs(nb):
        text = o.get("data", {}).get("text/plain", "") if o.output_type in ("display_data", "execute_result") else ""
        match = re.fullmatch(r"<Figure size \S+ with (\d+) Axes>", text.strip())
        if match and "image/png" in o.get("data", {}):
            out.append(int(match.group(1)))
    return out
