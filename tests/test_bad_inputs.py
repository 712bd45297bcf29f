"""Bad input, tried as a new user would: every case gets one paragraph that names the problem and a fix,
before anything is written, for every method. (Data-format cases: tests/test_data_formats.py.)"""

import json
import os
import subprocess
import sys

import pytest
from helpers import chats

import nbalign
from nbalign import NbalignError
from nbalign.examples import style_pairs, style_thumbs

PAIRS = style_pairs()[:4]
METHODS = {
    "sft": (nbalign.sft, lambda: chats(4), {}),
    "dpo": (nbalign.dpo, lambda: PAIRS, {"watch": False}),
    "kto": (nbalign.kto, lambda: style_thumbs()[:6], {"watch": False}),
    "reward_model": (nbalign.reward_model, lambda: PAIRS, {}),
    "rlhf": (nbalign.rlhf, lambda: ["What is 1 plus 2?", "Name a colour."],
             {"reward": lambda completions, **kw: [0.0] * len(completions), "num_generations": 2,
              "batch_size": 4, "max_completion_length": 4}),
}

# (options, the message's key words). `{tmp}` is the test's folder.
COMMON = [
    ({"out": "afile"}, "--out 'afile' is an existing file, not a folder"),
    ({"out": "afile/run"}, "lies under 'afile', which is a file"),
    ({"out": "/proc/nbalign-test/run"}, "nbalign cannot write in '/proc'"),
    ({"seed": -1}, "'seed' must be a whole number from 0"),
    ({"epochs": 0}, "'epochs' must be positive"),
    ({"epochs": float("nan")}, "'epochs' must be positive, got nan"),
    ({"learning_rate": float("inf")}, "'learning_rate' must be positive"),
    ({"epochs": "2.0e-4x"}, r"'epochs' must be a float, got '2.0e-4x'.*`epochs: \d"),
    ({"learning_rate": -1e-4}, "'learning_rate' must be positive"),
    ({"num_train_epochs": 1, "epochs": 2}, "'num_train_epochs: 1' \\(a TRL field\\) and 'epochs: 2' disagree"),
    ({"output_dir": "elsewhere"}, "'output_dir' is set by nbalign from --out"),
    ({"lora": {"r": "sixteen"}}, "'r' must be an int, got 'sixteen'"),
    ({"max_lenght": 64}, "did you mean 'max_length'"),
    ({"resume": True}, "holds no run to resume"),
]
SPECIFIC = [
    ("sft", {"data": [{"prompt": "word " * 200, "completion": "ok"}], "max_length": 64},
     "%%sft: the prompt of row 0 takes 2\\d\\d tokens of the training data, which leaves no room"),
    ("dpo", {"loss": {"sigmoid": -1.0}}, "negative"),
    ("dpo", {"loss": {"sigmoid": 0, "ipo": 0}}, "every loss weight is 0"),
    ("dpo", {"loss_type": ["ipo"]}, "'loss_type' is a TRL field that nbalign sets from `loss`"),
    ("dpo", {"loss": "orpo", "sft_weight": 0.5}, "orpo has its own SFT term"),
    ("dpo", {"loss": "sigmod"}, "did you mean 'sigmoid'"),
    ("dpo", {"loss": "xyzzy"}, "pick from sigmoid, ipo"),
    ("kto", {"desirable_weight": -1}, "'desirable_weight' must be positive"),
    ("kto", {"beta": float("nan")}, "'beta' must be positive"),
    ("dpo", {"beta": float("nan")}, "'beta' must be positive"),
    ("rlhf", {"temperature": 0}, "'temperature' must be above 0"),
    ("rlhf", {"num_generations": 1}, "'num_generations' must be at least 2"),
]


def _call(method, tiny_model, **options):
    function, data, defaults = METHODS[method]
    values = {"model": tiny_model, "out": "runs/bad", "max_steps": 1, **defaults, **options}
    values.setdefault("data", data())
    return function(**values)


def _one_paragraph(error: NbalignError) -> str:
    text = str(error)
    assert "Fix:" in text and "\n" not in text and "Traceback" not in text, text
    return text


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("options, message", COMMON, ids=[m.split("'")[1] if "'" in m else m for _, m in COMMON])
def test_common_bad_input_is_refused_before_anything_is_written(tiny_model, in_tmp, method, options, message):
    (in_tmp / "afile").write_text("not a folder")
    with pytest.raises(NbalignError, match=message) as info:
        _call(method, tiny_model, **options)
    _one_paragraph(info.value)
    assert not (in_tmp / "runs").exists()
    assert (in_tmp / "afile").read_text() == "not a folder"


@pytest.mark.parametrize("method, options, message", SPECIFIC, ids=[f"{m}-{list(o)[-1]}" for m, o, _ in SPECIFIC])
def test_method_specific_bad_input(tiny_model, in_tmp, method, options, message):
    with pytest.raises(NbalignError, match=message) as info:
        _call(method, tiny_model, **options)
    _one_paragraph(info.value)
    assert not (in_tmp / "runs").exists()


def test_a_trl_field_that_means_a_spec_field_is_mapped_onto_it(tiny_model, in_tmp, capsys):
    # 16 rows at batch 4 for 1 epoch: 4 steps; the step plan and TRL agree on it.
    run = nbalign.sft(chats(16), model=tiny_model, out="runs/m", num_train_epochs=1, per_device_train_batch_size=4)
    assert run.spec["spec"]["epochs"] == 1.0 and run.spec["spec"]["batch_size"] == 4
    assert run.spec["trl_config"]["num_train_epochs"] == 1.0 and run.summary["steps"] == 4
    assert "4 steps" in capsys.readouterr().out
    assert "num_train_epochs" not in run.spec["spec"]["trl"]


def test_lora_coerces_its_arguments_like_the_magic():
    with pytest.raises(NbalignError, match="'r' must be an int, got 'sixteen'.*Fix: write e.g. `r: 16`"):
        nbalign.lora(r="sixteen")
    assert nbalign.lora(r="8", alpha="16").adapter.r == 8
    assert nbalign.session.adapter.scaling_alpha == 16


def test_session_reset_is_reachable_as_nbalign_session(tiny_model):
    import nbalign._session  # noqa: F401  (importing the module must not shadow the object)

    nbalign.lora(r=4, model=tiny_model)
    assert nbalign.session.adapter.r == 4
    nbalign.session.reset()
    assert nbalign.session.adapter.r == 16


def test_an_invalid_output_variable_is_refused_before_training(monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell

    called = []
    monkeypatch.setattr("nbalign.api.run_spec", lambda spec: called.append(spec))
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbalign")
    shell.user_ns["rows"] = chats(2)
    for var in ("1run", "class", "my-run"):
        result = shell.run_cell(f"%sft --data rows -o {var}")
        assert isinstance(result.error_in_exec, NbalignError), var
        assert "is not a valid Python variable name" in str(result.error_in_exec)
    assert not called


def test_a_reward_that_returns_nan_fails_the_run_by_name(tiny_model, in_tmp):
    def sometimes_nan(completions, **kwargs):
        return [float("nan")] + [0.0] * (len(completions) - 1)

    with pytest.raises(NbalignError, match=r"sometimes_nan returned nan for completion 0 of 4.*Fix: return a finite"):
        _call("rlhf", tiny_model, reward=sometimes_nan, out="runs/nan")
    assert json.loads((in_tmp / "runs/nan/status.json").read_text())["status"] == "failed"


def test_killed_during_the_final_save_resumes_without_training_past_the_end(tiny_model, in_tmp):
    """SIGKILL after the last step, while the adapter was being written: a temporary folder is left, the
    status still says running. --resume must finish the run from the last checkpoint with no extra step."""
    script = (
        "import os, signal, sys\n"
        "import nbalign\n"
        "from nbalign import runfolder\n"
        "def killed(*args, **kwargs):\n"
        "    os.makedirs('runs/k/.adapter-partial', exist_ok=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "runfolder.save_weights = killed\n"
        "rows = [{'messages': [{'role': 'user', 'content': f'Say {i}.'}, {'role': 'assistant', 'content': f'OK {i}'}]}"
        " for i in range(8)]\n"
        f"nbalign.sft(rows, model={tiny_model!r}, out='runs/k', batch_size=4, max_steps=3, save_steps=1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=in_tmp, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = nbalign.Run(in_tmp / "runs/k")
    assert run.status == "interrupted" and (run.path / ".adapter-partial").is_dir()
    resumed = nbalign.sft(out="runs/k", model=tiny_model, batch_size=4, max_steps=3, save_steps=1, resume=True)
    assert resumed.status == "finished" and resumed.summary["steps"] == 3
    steps = [r["step"] for r in resumed.metrics.to_dict("records") if r.get("loss") == r.get("loss") and "loss" in r]
    assert steps == [1, 2, 3]  # no step 4 of 3
    assert (resumed.path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (resumed.path / ".adapter-partial").exists()


def test_a_reward_that_scores_nothing_fails_the_run(tiny_model, in_tmp):
    def abstains(completions, **kwargs):
        return [None] * len(completions)  # TRL allows None for "cannot score"; all None teaches nothing

    with pytest.raises(NbalignError, match="no step logged a finite reward, so the policy learnt nothing"):
        _call("rlhf", tiny_model, reward=abstains, out="runs/none")
    status = json.loads((in_tmp / "runs/none/status.json").read_text())
    assert status["status"] == "failed" and "finite reward" in status["message"]


def test_overwrite_refuses_to_empty_a_folder_the_run_reads(tiny_model, in_tmp):
    nbalign.sft(chats(4), model=tiny_model, out="runs/x", max_steps=1)
    with pytest.raises(NbalignError, match="--overwrite would empty 'runs/x', but this run reads '.*runs/x' from inside it"):
        nbalign.sft(chats(4), model="runs/x", out="runs/x", max_steps=1, overwrite=True)
    assert nbalign.Run("runs/x").status == "finished"
