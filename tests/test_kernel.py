"""The real magics in a real IPython kernel (jupyter_client), including the notebook's interrupt button."""

from __future__ import annotations

import json
import queue
import sys
import time

import pytest
from helpers import chats


@pytest.fixture
def kernel(tmp_path):
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    # This interpreter, whatever kernelspec is installed: the kernel must see the same packages.
    km.kernel_spec.argv[0] = sys.executable
    km.start_kernel(cwd=str(tmp_path), env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    client = km.client()
    client.start_channels()
    client.wait_for_ready(timeout=120)
    yield km, client, tmp_path
    client.stop_channels()
    km.shutdown_kernel(now=True)


def execute(client, code: str, timeout: float = 300) -> dict:
    """Run `code`; collect its text outputs, rich outputs and error, as a front end would."""
    msg_id = client.execute(code)
    texts, data, error = [], [], None
    deadline = time.time() + timeout
    while True:
        try:
            msg = client.get_iopub_msg(timeout=max(1, deadline - time.time()))
        except queue.Empty:
            raise TimeoutError(f"cell did not finish in {timeout}s: {code[:80]}") from None
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            texts.append(content["text"])
        elif kind in ("execute_result", "display_data", "update_display_data"):
            data.append(content["data"])
        elif kind == "error":
            error = content
            texts.extend(content["traceback"])
        elif kind == "status" and content["execution_state"] == "idle":
            return {"text": "".join(texts), "data": data, "error": error}


def test_magics_train_and_generate_in_a_real_kernel(kernel, tiny_model):
    km, client, folder = kernel
    assert execute(client, "%load_ext nbalign")["error"] is None
    execute(client, f"chats = {json.dumps(chats(16))}")
    out = execute(client, f"%%lora --model {tiny_model}\nr: 4\ntarget_modules: [q_proj, v_proj]\n")
    assert out["error"] is None and "trainable parameters" in out["text"]
    out = execute(client, f"%%sft --model {tiny_model} --data chats --out runs/k -o run\nepochs: 1\nbatch_size: 8\n")
    assert out["error"] is None, out["text"]
    # The progress bar and loss curve were displayed and updated in place, then the Run summary shown.
    html = [d.get("text/html", "") for d in out["data"]]
    assert any("<progress" in h for h in html) and any("image/png" in d for d in out["data"])
    assert "nbalign sft run" in html[-1] and "finished" in html[-1]
    # `-o run` bound the Run in the kernel: 16 chats at batch 8, one epoch = 2 steps; it generates.
    out = execute(client, "answer = run.generate('Say the number 3.', max_new_tokens=3)\n"
                          "print(run.status, run.summary['steps'], len(run.metrics.dropna(subset=['loss'])))")
    assert out["error"] is None and out["text"].strip() == "finished 2 2", out["text"]
    out = execute(client, "%nbalign runs")
    assert "runs/k" in str(out["data"])
    # A mistake is one paragraph, no traceback wall, and nothing is written.
    out = execute(client, f"%%sft --model {tiny_model} --data chats --out runs/bad\nepocs: 2\n")
    assert out["error"] is not None and "did you mean 'epochs'" in out["text"]
    assert "Traceback" not in out["text"] and not (folder / "runs/bad").exists()


def test_kernel_interrupt_stops_training_cleanly_and_resume_finishes(kernel, tiny_model):
    km, client, folder = kernel
    execute(client, "%load_ext nbalign")
    execute(client, f"chats = {json.dumps(chats(16))}")
    cell = f"%%sft --model {tiny_model} --data chats --out runs/long -o run\nepochs: 4\nbatch_size: 8\n"
    msg_id = client.execute(cell)
    metrics = folder / "runs/long/metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.time() < deadline, "training never logged a step"
        time.sleep(0.2)
    km.interrupt_kernel()  # what the notebook's stop button does
    texts, error = [], None
    while True:
        msg = client.get_iopub_msg(timeout=300)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            texts.append(msg["content"]["text"])
        if msg["msg_type"] == "error":
            error = msg["content"]
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    text = "".join(texts)
    assert error is None, error  # no KeyboardInterrupt traceback: the run stopped and saved
    assert "interrupt received" in text and "re-run the cell with --resume" in text
    status = json.loads((folder / "runs/long/status.json").read_text())
    assert status["status"] == "interrupted" and status["summary"]["steps"] < 8  # 16 chats at batch 8 x 4 epochs
    assert (folder / "runs/long/adapter/adapter_config.json").exists()
    # The kernel is alive and holds no model.
    out = execute(client, "import gc, warnings; warnings.simplefilter('ignore'); "
                          "from transformers import PreTrainedModel; gc.collect(); "
                          "print(sum(isinstance(o, PreTrainedModel) for o in gc.get_objects()))")
    assert out["text"].strip() == "0"
    out = execute(client, cell.replace("-o run", "-o run --resume"))
    assert out["error"] is None, out["text"]
    status = json.loads((folder / "runs/long/status.json").read_text())
    assert status["status"] == "finished" and status["summary"]["steps"] == 8
