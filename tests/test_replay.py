"""A spec is the whole run: spec.json (with the data saved beside it) trains the same run again, in this
process or in a fresh one, with no notebook session behind it."""

import json
import os
import subprocess
import sys

import pytest
from helpers import chats

import nbalign
from nbalign import NbalignError
from nbalign.runfolder import read_metrics


def losses(run_path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_path) if "loss" in r]


def test_replay_in_a_fresh_process_reaches_the_same_loss_curve(tiny_model, in_tmp):
    # The adapter comes from the session's %%lora setting: spec.json must carry it, or the replay differs.
    nbalign.lora(r=4, alpha=16, target_modules=["q_proj", "v_proj"], model=tiny_model)
    first = nbalign.sft(chats(16), model=tiny_model, out="runs/x", epochs=1, batch_size=4, learning_rate=1e-2,
                        logging_steps=1, seed=7)
    stored = json.loads((first.path / "spec.json").read_text())["spec"]
    assert stored["lora"]["r"] == 4 and stored["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert stored["data"]["saved"] == "data/data.jsonl" and stored["trl"] == {"logging_steps": 1}
    nbalign.session.reset()  # nothing of this session may leak into the replay

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "nbalign", "run", "runs/x/spec.json", "--out", "runs/x2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    again = nbalign.Run("runs/x2")
    assert again.status == "finished"
    assert again.spec["spec"]["lora"] == stored["lora"] and again.spec["seed"] == 7
    a, b = losses(first.path), losses(again.path)
    assert len(a) == len(b) == 4  # 16 rows at batch 4, one epoch, a loss logged every step
    assert a[0] != a[-1]  # it trained (a constant curve would match anything)
    assert b == pytest.approx(a, abs=1e-4), (a, b)

    # In this process too, from the folder.
    third = nbalign.replay("runs/x", out="runs/x3")
    assert losses(third.path) == pytest.approx(a, abs=1e-4)


def test_replay_of_a_notebook_reward_function_asks_for_it_again(tiny_model, in_tmp):
    def brevity(completions, **kwargs):
        return [-len(c) / 10 for c in completions]

    nbalign.rlhf(["Hi?", "Yes?"], reward=brevity, model=tiny_model, out="runs/rl", batch_size=4, num_generations=2,
                 max_completion_length=4, max_steps=1)
    stored = json.loads((in_tmp / "runs/rl/spec.json").read_text())["spec"]
    assert stored["reward"] == {"function": brevity.__qualname__, "module": __name__}
    assert stored["data"]["saved"] == "data/data.jsonl"
    again = nbalign.replay("runs/rl", out="runs/rl2", reward=brevity)
    assert again.status == "finished" and again.spec["spec"]["reward"]["function"] == brevity.__qualname__
    # A function defined in a notebook cannot be re-imported: the replay says how to pass it.
    spec = json.loads((in_tmp / "runs/rl/spec.json").read_text())
    spec["spec"]["reward"] = {"function": "brevity", "module": "__main__"}
    (in_tmp / "runs/rl/spec.json").write_text(json.dumps(spec))
    with pytest.raises(NbalignError, match=r"defined in a notebook.*replay\(path, out=\.\.\., reward=brevity\)"):
        nbalign.replay("runs/rl", out="runs/rl3")
    assert not (in_tmp / "runs/rl3").exists()


def test_replay_refuses_what_is_not_a_run(in_tmp):
    (in_tmp / "empty").mkdir()
    with pytest.raises(NbalignError, match="holds no nbalign spec.json"):
        nbalign.replay("empty", out="runs/y")


def test_resume_continues_the_run_as_it_started_whatever_the_session(tiny_model, in_tmp, monkeypatch):
    """After a kernel restart the session's %%lora is the default again: --resume must still continue with the
    adapter and settings the run started with, and refuse a cell that asks for others."""
    from helpers import interrupt_at

    from nbalign.callbacks import MetricsWriter

    original = MetricsWriter.on_log
    nbalign.lora(r=4, target_modules=["q_proj", "v_proj"], model=tiny_model)
    interrupt_at(monkeypatch, step=2)
    run = nbalign.sft(chats(16), model=tiny_model, out="runs/r", epochs=2, batch_size=4, learning_rate=1e-3)
    assert run.status == "interrupted"
    monkeypatch.setattr(MetricsWriter, "on_log", original)
    nbalign.session.reset()
    with pytest.raises(NbalignError, match=r"--resume: learning_rate \(0.001 -> 0.01\) differs"):
        nbalign.sft(out="runs/r", model=tiny_model, learning_rate=1e-2, resume=True)
    resumed = nbalign.sft(out="runs/r", resume=True)  # no data, no model, no settings: all from spec.json
    assert resumed.status == "finished" and resumed.summary["steps"] == 8
    spec = resumed.spec
    assert spec["spec"]["lora"]["r"] == 4 and spec["spec"]["learning_rate"] == 1e-3
    assert spec["trl_config"]["learning_rate"] == 1e-3 and spec["spec"]["model"] == tiny_model


def test_replay_in_place_keeps_its_own_copy_of_the_data(tiny_model, in_tmp):
    nbalign.sft(chats(8), model=tiny_model, out="runs/p", max_steps=2, batch_size=4)
    nbalign.replay("runs/p", out="runs/p", overwrite=True)  # the folder it came from is emptied first
    again = nbalign.replay("runs/p", out="runs/p2")
    assert again.status == "finished" and (again.path / "data" / "data.jsonl").is_file()
    assert again.spec["spec"]["data"]["rows"] == 8


def test_parquet_message_lists_are_saved_as_lists_and_replay(tiny_model, in_tmp):
    import pandas as pd

    pd.DataFrame(chats(8)).to_parquet(in_tmp / "chats.parquet")
    frame = pd.read_parquet(in_tmp / "chats.parquet")  # `messages` cells are numpy arrays of dicts
    nbalign.sft(frame, model=tiny_model, out="runs/q", max_steps=1, batch_size=4)
    saved = [json.loads(line) for line in (in_tmp / "runs/q/data/data.jsonl").read_text().splitlines()]
    assert saved[3]["messages"] == chats(8)[3]["messages"]
    assert nbalign.replay("runs/q", out="runs/q2").status == "finished"


def test_a_partial_reward_is_not_replayed_without_its_arguments(tiny_model, in_tmp):
    import functools

    def scaled(completions, scale, **kwargs):
        return [scale * len(c) for c in completions]

    nbalign.rlhf(["Hi?", "Yes?"], reward=functools.partial(scaled, scale=-0.1), model=tiny_model, out="runs/rl",
                 batch_size=4, num_generations=2, max_completion_length=4, max_steps=1)
    with pytest.raises(NbalignError, match="functools.partial whose arguments spec.json does not hold"):
        nbalign.replay("runs/rl", out="runs/rl2")
