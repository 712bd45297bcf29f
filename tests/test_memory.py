"""The memory check before every run: the estimate is in the run's first line, a run that will not fit stops
before loading with the fix, and the estimate is within 25% of the peak measured on the built-in model."""

import json
import os
import subprocess
import sys

import pytest
from helpers import chats

import nbalign
from nbalign.errors import NbalignError


def test_a_run_that_will_not_fit_stops_before_loading_and_names_the_fix(tiny_model, in_tmp, monkeypatch, capsys):
    from nbalign import models

    loaded = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loaded.append(1) or real(*a, **k))
    monkeypatch.setenv("NBALIGN_MEMORY_LIMIT", "1MiB")
    with pytest.raises(NbalignError) as caught:
        nbalign.sft(chats(8), model=tiny_model, out="runs/big", batch_size=4, max_length=256)
    message = str(caught.value)
    assert "this run needs about" in message and "1 MiB" in message and "stopped before loading" in message
    assert "quantize: 4bit" in message and "max_length (now 256)" in message
    assert "one row per step with gradient accumulation and activation checkpointing does not fit" in message
    assert not loaded and not (in_tmp / "runs" / "big").exists()

    monkeypatch.setenv("NBALIGN_MEMORY_LIMIT", "64GiB")
    nbalign.sft(chats(8), model=tiny_model, out="runs/ok", batch_size=4, epochs=1)
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("nbalign sft:"))
    assert "| memory about " in first and "of 65,536 MiB free (weights" in first and "activations" in first


def test_a_batch_that_does_not_fit_is_split_then_checkpointed(tiny_model, in_tmp, monkeypatch, capsys):
    """Fewer rows per step, accumulated to the same effective batch, then activation checkpointing: the same
    optimizer steps and the same loss."""
    from nbalign.api import build_spec
    from nbalign.methods import base
    from nbalign.methods.sft import SFT

    monkeypatch.setenv("NBALIGN_MEMORY_LIMIT", "64GiB")
    options = {"data": chats(8), "model": tiny_model, "max_length": 256, "epochs": 1, "watch": False, "eval_split": 0}
    totals = {rows: base.plan_run(SFT(), build_spec("sft", {**options, "out": f"runs/plan{rows}", "batch_size": rows}))
              .memory.total for rows in (2, 4)}
    assert totals[2] < totals[4]
    whole = nbalign.sft(out="runs/whole", batch_size=4, **options)
    monkeypatch.setenv("NBALIGN_MEMORY_LIMIT", str((totals[2] + totals[4]) // 2))
    split = nbalign.sft(out="runs/split", batch_size=4, **options)
    assert "a batch of 4 needs" in capsys.readouterr().out
    config = split.spec["trl_config"]
    assert (config["per_device_train_batch_size"], config["gradient_accumulation_steps"]) == (2, 2)
    assert whole.spec["trl_config"]["per_device_train_batch_size"] == 4
    assert split.summary["steps"] == whole.summary["steps"] == 2
    assert split.summary["train_loss"] == pytest.approx(whole.summary["train_loss"], rel=1e-3)

    # Where one row per step does not fit either, activations are checkpointed (recomputed in the backward pass).
    plan = {ckpt: base.plan_run(SFT(), build_spec("sft", {**options, "out": f"runs/ckpt{ckpt}", "batch_size": 1,
                                                             "activation_checkpointing": ckpt})).memory.total
            for ckpt in (False, True)}
    assert plan[True] < plan[False]
    monkeypatch.setenv("NBALIGN_MEMORY_LIMIT", str((plan[True] + plan[False]) // 2))
    checkpointed = nbalign.sft(out="runs/checkpointed", batch_size=4, **options)
    assert "activation checkpointing (about a third more compute)" in capsys.readouterr().out
    config = checkpointed.spec["trl_config"]
    assert (config["per_device_train_batch_size"], config["gradient_accumulation_steps"]) == (1, 4)
    assert config["activation_checkpointing"] is True
    assert checkpointed.summary["train_loss"] == pytest.approx(whole.summary["train_loss"], rel=1e-3)


def test_the_estimate_grows_with_what_the_run_holds(smollm2_dir):
    """More tokens, full fine-tuning, 4-bit weights and a separate reference move the estimate the right way."""
    from nbalign.devices import Device
    from nbalign.memory import estimate, trainable
    from nbalign.models import resolve, skeleton
    from nbalign.adapters import AdapterSpec

    skel = skeleton(resolve("smollm2-135m"))
    cpu = Device("cpu", False, amp=True)
    lora, full, qlora = AdapterSpec(), AdapterSpec.from_dict({"type": "full"}), AdapterSpec.from_dict({"quantize": "4bit"})
    small = estimate(skel, lora, cpu, sequences=4, length=100)
    assert estimate(skel, lora, cpu, sequences=8, length=100).parts["activations"] \
        == 2 * small.parts["activations"]
    assert trainable(skel, lora) == 4_884_480  # what peft reports for r=16 on all-linear
    whole = estimate(skel, full, cpu, sequences=4, length=100)
    assert whole.parts["gradients and optimizer"] == 12 * 134_515_008
    assert estimate(skel, qlora, cpu, sequences=4, length=100).parts["weights"] < small.parts["weights"] / 2
    assert estimate(skel, full, cpu, sequences=4, length=100, reference_copy=True).total > whole.total - \
        whole.parts["gradients and optimizer"]


def _ragged_chats(n: int) -> list[dict]:
    words = " ".join(f"w{i}" for i in range(60))
    return [{"messages": [{"role": "user", "content": f"Q{i} " + words[: 6 + (i * 37) % 170]},
                          {"role": "assistant", "content": f"A{i} " + words[: 4 + (i * 53) % 120]}]} for i in range(n)]


@pytest.mark.parametrize("method, extra", [("sft", {"epochs": 2, "trl": {"data_seed": 0}}),
                                           ("sft", {"trl": {"train_sampling_strategy": "sequential"}}),
                                           ("reward_model", {}), ("kto", {})])
def test_the_estimate_counts_the_batches_the_trainer_will_draw(tiny_model, in_tmp, monkeypatch, method, extra):
    """Ragged rows are flattened, so a batch's memory follows its own tokens, not its rows times the longest: the
    estimate works out, before loading, which rows each batch will hold (the trainer's shuffle, seeded with the
    run's seed or data_seed, anew each epoch, or its sequential order for KTO) and each batch's tokens as the run
    pads or flattens it. They are the batches the run then computes, in order (recorded as the model's forward
    flattened or padded them)."""
    from nbalign import batching

    predicted, computed = [], []
    drawn, record = batching.drawn_batches, batching.Flattening.record
    monkeypatch.setattr(batching, "drawn_batches", lambda *a, **k: predicted.append(drawn(*a, **k)) or predicted[-1])
    monkeypatch.setattr(batching.Flattening, "record", lambda self, flat, lengths, width: computed.append(
        sum(lengths) if flat else len(lengths) * width) or record(self, flat, lengths, width))
    rows = _ragged_chats(22)  # batches of 4: each epoch's last batch short
    if method != "sft":
        pairs = [{"prompt": r["messages"][:1], "chosen": r["messages"][1:],
                  "rejected": [{"role": "assistant", "content": "No. " * (1 + i % 9)}]} for i, r in enumerate(rows)]
        rows = pairs if method == "reward_model" else [
            {"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"} for p in pairs for k in ("chosen",
                                                                                                      "rejected")]
    options = {"watch": False} if method == "kto" else {"watch": False, "eval_split": 0} if method == "sft" else {}
    run = getattr(nbalign, method)(rows, model=tiny_model, out=f"runs/{method}", batch_size=4, seed=7,
                                   **options, **extra)
    assert run.summary["batches_flattened"] > 0
    batches = predicted[0]
    assert len(set(batches)) > 2 and len(batches) == run.summary["steps"]
    # The run's forwards: one per batch, the reward model's evaluation after them; KTO's per step: its KL
    # completions' forward first, then the batch's. KTO's epochs (3, the default) precompute the reference's
    # log-probs first, in TRL's constructor: one pass over the first epoch's batches (sequential), two forwards each,
    # flattened too.
    if method == "kto":
        assert run.spec["trl_config"]["precompute_ref_log_probs"]
        reference, computed = computed[: len(computed) - 2 * len(batches)], computed[-2 * len(batches):]
        per_epoch = len(batches) // int(run.spec["spec"]["epochs"])
        assert reference[1::2] == batches[:per_epoch], reference
    trained = computed[1::2] if method == "kto" else computed[: len(batches)]
    assert trained == batches, computed


def test_a_fraction_of_an_epoch_is_planned_as_the_trainer_runs_it(tiny_model, in_tmp, capsys):
    """1.5 epochs of 3 batches: the trainer runs 5 steps (it rounds up), and the plan, which sizes the estimate's
    batches and the logging, says 5 too."""
    run = nbalign.sft(_ragged_chats(12), model=tiny_model, out="runs/frac", batch_size=4, epochs=1.5, watch=False,
                      eval_split=0)
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("nbalign sft:"))
    assert "12 examples, 5 steps" in first and run.summary["steps"] == 5


MEASURE = r"""
import json, sys
import nbalign

def rss(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))

text = " ".join(f"word{i % 50}" for i in range(30))
sft_rows = [{"messages": [{"role": "user", "content": f"Question {i}: {text}"},
                          {"role": "assistant", "content": f"Answer {i}: {text}"}]} for i in range(8)]
pairs = [{"prompt": f"Question {i}: {text}", "chosen": f"Yes {i}: {text}", "rejected": f"No {i}: {text} {text}"}
         for i in range(4)]
import transformers, trl, peft
out = []
calls = {"sft": lambda: nbalign.sft(sft_rows, out="runs/sft", batch_size=4, max_steps=2, watch=False),
         "dpo": lambda: nbalign.dpo(pairs, out="runs/dpo", batch_size=2, max_steps=2, watch=False),
         # One row per step: the watch's evaluation (its answers' KV cache, the scoring's log-probs) is the peak.
         "sft-watch": lambda: nbalign.sft(sft_rows, eval_data=sft_rows, out="runs/watch", batch_size=1, max_steps=2,
                                          eval_points=0, probe=False, fewshot=0)}
for name, call in [(sys.argv[1], calls[sys.argv[1]])]:
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the present resident set
    before = rss("VmRSS:")
    run = call()
    summary = json.loads((run.path / "status.json").read_text())["summary"]
    out.append({"method": name, "peak": rss("VmHWM:") - before, "estimate": summary["memory_estimate_mib"] * 2**20,
                "run_peak": summary["memory_peak_mib"] * 2**20})
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_the_estimate_is_within_a_quarter_of_the_measured_peak(smollm2_dir, tmp_path):
    """Two steps of SFT (4 x 200 tokens) and DPO (2 pairs, 4 sequences of up to 300 tokens) with LoRA on the
    built-in model, and two steps of SFT on one row per step with the watch on (answers and KL measured before and
    after: the evaluation's memory is the peak), each against its fresh process's peak resident set above what it
    held before the run. Measured (estimate / peak): 0.89, 0.98 and 0.96 with bf16 autocast, 0.86, 0.91 and 0.95 in
    fp32 (the third was 0.81 before the evaluation released the heap the training steps left; DPO read 1.38 before
    the count was refitted to per-example attention, which took about 450 MiB off its peak, and 1.18 before its
    bytes per value were set apart from SFT's: memory.PAIRS_KEPT)."""
    results = []
    for method in ("sft", "dpo", "sft-watch"):  # each in a fresh process: memory a run freed may stay with the process
        proc = subprocess.run([sys.executable, "-c", MEASURE, method], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results += json.loads(proc.stdout.split("RESULT ", 1)[1])
    for r in results:
        ratio = r["estimate"] / r["peak"]
        print(f"{r['method']}: estimate {r['estimate'] / 2**20:.0f} MiB, measured {r['peak'] / 2**20:.0f} MiB, "
              f"ratio {ratio:.2f}")
        assert 0.75 <= ratio <= 1.25, results
        # The run's own figure says the same, but for the tokenizer and data planned before its meter starts (about
        # 145 MiB measured on every method; 10% of the smallest peak, 1,470 MiB, was too tight a bound for that).
        assert abs(r["run_peak"] - r["peak"]) <= max(0.1 * r["peak"], 200 * 2**20), results
