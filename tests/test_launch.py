"""The same cell beyond this process: --launch subprocess (one process of its own) and --launch accelerate (DDP
over two CPU processes), streamed into the cell, stopped cleanly by an interrupt, giving back the same Run."""

import json
import os
import signal
import threading
import time

import pytest
from helpers import chats

import nbalign
from nbalign.errors import NbalignError
from nbalign.runfolder import read_metrics

OPTIONS = dict(epochs=2, batch_size=4, learning_rate=3e-2, watch=False)


@pytest.mark.parametrize("options, message", [
    ({"launch": "cloud"}, "--launch must be one of here, subprocess, accelerate"),
    ({"num_processes": 2}, "--num-processes 2 needs --launch accelerate"),
    ({"launch": "accelerate", "accelerate_config": "nowhere.yaml"}, "'nowhere.yaml' is not a file"),
])
def test_bad_launch_options_are_refused_before_anything_is_written(tiny_model, in_tmp, options, message):
    with pytest.raises(NbalignError, match=message):
        nbalign.sft(chats(8), model=tiny_model, out="runs/x", **options)
    assert not (in_tmp / "runs").exists()


def test_a_subprocess_run_is_the_same_run_and_streams_into_the_cell(tiny_model, in_tmp, capfd):
    nbalign.lora(model=tiny_model, r=4)
    here = nbalign.sft(chats(16), model=tiny_model, out="runs/here", **OPTIONS)
    there = nbalign.sft(chats(16), model=tiny_model, out="runs/there", launch="subprocess", **OPTIONS)
    assert type(there) is type(here) and there.status == "finished"
    assert there.summary["steps"] == here.summary["steps"] == 8
    assert there.summary["final_loss"] == pytest.approx(here.summary["final_loss"], rel=1e-4)
    assert (in_tmp / "runs/there/adapter/adapter_config.json").is_file()
    assert os.getpid() != json.loads((in_tmp / "runs/there/status.json").read_text()).get("pid", -1)
    printed = capfd.readouterr().out
    assert "training in its own process -> runs/there" in printed  # this process's line
    assert "nbalign sft: finished after" in printed  # the launched process's last line, streamed
    # The stored spec says how it was launched; replaying it launches it the same way.
    assert json.loads((in_tmp / "runs/there/spec.json").read_text())["spec"]["launch"] == "subprocess"


def test_an_interrupt_stops_the_launched_run_which_saves_and_resumes(tiny_model, in_tmp):
    nbalign.lora(model=tiny_model, r=4)
    metrics = in_tmp / "runs/i/metrics.jsonl"

    def interrupt_after_two_steps():
        deadline = time.time() + 120
        while time.time() < deadline:
            if metrics.is_file() and sum(1 for r in read_metrics(metrics.parent) if "loss" in r) >= 2:
                os.kill(os.getpid(), signal.SIGINT)  # what a kernel interrupt does to this process
                return
            time.sleep(0.05)

    threading.Thread(target=interrupt_after_two_steps, daemon=True).start()
    run = nbalign.sft(chats(16), model=tiny_model, out="runs/i", launch="subprocess", epochs=12, batch_size=4,
                      watch=False)
    assert run.status == "interrupted", run.message
    assert "re-run the cell with --resume" in run.message
    assert (in_tmp / "runs/i/adapter/adapter_config.json").is_file()
    done = run.summary["steps"]
    assert 2 <= done < 48
    resumed = nbalign.sft(chats(16), model=tiny_model, out="runs/i", epochs=12, batch_size=4, watch=False,
                          resume=True)  # here, from the launched run's last checkpoint
    assert resumed.status == "finished" and resumed.summary["steps"] == 48


@pytest.mark.slow
def test_two_cpu_processes_under_accelerate_reach_the_single_process_loss(tiny_model, in_tmp, capfd):
    """DDP over 2 CPU processes (gloo) with 4 rows each per step trains like one process with 8: the same
    steps and the same loss within noise (a tenth of what training took off it), one run folder written by the
    first process."""
    nbalign.lora(model=tiny_model, type="full")  # the tiny model learns this task with full fine-tuning: 10.8 -> 3.5
    options = dict(epochs=6, learning_rate=1e-2, watch=False)
    one = nbalign.sft(chats(32), model=tiny_model, out="runs/one", batch_size=8, **options)
    two = nbalign.sft(chats(32), model=tiny_model, out="runs/two", batch_size=4, launch="accelerate",
                      num_processes=2, **options)
    assert two.status == "finished", two.message
    losses = {name: [r["loss"] for r in read_metrics(run.path) if "loss" in r] for name, run in (("one", one), ("two", two))}
    with capfd.disabled():
        print({k: [round(v, 3) for v in l] for k, l in losses.items()})
    assert two.summary["steps"] == one.summary["steps"] == 24
    start, end = losses["one"][0], losses["one"][-1]
    assert end < start - 2, losses  # it learnt: the comparison below is about training, not an untrained model
    assert losses["two"][0] == pytest.approx(start, abs=0.05)  # the same data in the same first batch
    assert abs(losses["two"][-1] - end) <= 0.1 * (start - end), losses  # the same place within a tenth of the drop
    printed = capfd.readouterr().out
    assert "x 2 processes" in printed and printed.count("nbalign sft: finished after") == 2  # one, two's rank 0
    logged = [r["step"] for r in read_metrics(two.path) if "loss" in r]
    assert logged == sorted(set(logged)) and logged[-1] == 24  # one writer
