"""Behaviour on the real built-in model, SmolLM2-135M-Instruct (minutes on a CPU)."""

import re

import pytest
from helpers import live_models

import nbalign
from nbalign.examples import is_json_answer, json_answers
from nbalign.results import form_costs_content, significant_loss

pytestmark = pytest.mark.slow


def rss_mib() -> float:
    text = open("/proc/self/status").read()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


@pytest.mark.shares("json-sft")
def test_sft_teaches_the_builtin_model_a_one_line_json_format(json_sft_run):
    """The defaults on the JSON task (conftest.json_sft_run: all 51 rows, LoRA r=16, 3 epochs). The run's own
    evaluation answers the held-out prompts before and after (greedy, 64 new tokens)."""
    evaluation = json_sft_run.evaluation
    before, after = evaluation.before["answers"], evaluation.after["answers"]
    ok_before, ok_after = sum(map(is_json_answer, before)), sum(map(is_json_answer, after))
    print(evaluation)
    assert ok_before <= 2, before
    assert ok_after >= 14, after
    # The evaluation's form count is the same reading of the same answers.
    assert evaluation.after["form_n"] >= ok_after and evaluation.before["form_n"] == ok_before
    # A valid answer is the whole output, so those stopped right after the object (the end-of-turn
    # token was learned) instead of running on to max_new_tokens as prose.
    assert sum(map(len, after)) < 0.8 * sum(map(len, before)), (before, after)
    # What it cost is measured too, whatever it was: content against the references, the probe, perplexity.
    assert {"content_n", "probe_n", "perplexity"} <= set(evaluation.after)
    assert evaluation.before["content_n"] >= 6 and evaluation.before["probe_n"] >= 18  # the base knows these
    # Issue 9 asked for as many right answers as the base's prose (7/16). In this answer-first form the built-in
    # model tops out below that whatever the setting: 3-shot prompting gives 6/16 (8-shot 5/16), and tuned runs at
    # four settings gave 5 or 6 (notebooks/07_alignment_tax.ipynb). What the defaults must do is reach the same
    # content as the untrained model in the same form (the prompting baseline), within one answer...
    assert evaluation.after["content_n"] >= evaluation.baseline["content_n"] - 1, (evaluation.baseline, after)
    # ...and say what it cost. Measured: the tuned model answers the probe's general questions in the same
    # answer-first JSON too, and gets fewer right (20/20 -> 9/20; with replay: 0.2, 14/20): the run must say so.
    lost = evaluation.before["content_n"] - evaluation.after["content_n"]
    assert any("lost the facts" in w for w in evaluation.warnings) == (lost >= 2), (lost, evaluation.warnings)
    forgot = significant_loss(evaluation.before["probe_right"], evaluation.after["probe_right"])
    assert any("knowledge probe dropped" in w for w in evaluation.warnings) == forgot, evaluation.warnings
    # Where prompting in the same form lost answers too, the warning puts the blame on the form and names the fix.
    if lost >= 2 and form_costs_content(evaluation.before, evaluation.baseline, evaluation.after):
        named = [w for w in evaluation.warnings if "the form itself seems to cost" in w and '"reasoning"' in w]
        assert named, evaluation.warnings


def test_the_demo_task_on_the_line_defaults_keeps_the_held_out_answers_right(in_tmp):
    """Issue 9's target on `%sft --data chats --out runs/x` with nothing else: the demo's data (json_answers with
    reasoning=True: {"reasoning": "The capital of Poland is Warsaw.", "answer": "Warsaw", ...}, a first field that
    restates the question) learnt in form on >= 80% of the held-out prompts AND right on at least as many as the
    base's own prose. Measured (content: both fields must hold the reference's words): the defaults choose 4 rows per
    step on these 51 rows (39 steps; specs.DEFAULT_BATCH): form 0/16 -> 16/16, content 7/16 -> 10/16, in bf16
    autocast and in fp32 alike. At 8 rows per step (21 steps) the three-times-longer target was not learnt yet
    (0/16 in form); in the answer-first form no setting reached the base's 7 (test above). The knowledge probe still
    drops (20/20 -> 13/20; not measured here: probe=False, like eval_points=0 and fewshot=0, changes only what is
    evaluated, not the training)."""
    train, heldout = json_answers("train", reasoning=True), json_answers("heldout", reasoning=True)
    run = nbalign.sft(train, eval_data=heldout, out="runs/reasoned", eval_points=0, fewshot=0, probe=False)
    assert run.spec["spec"]["batch_size"] == 4 and run.summary["steps"] == 39  # the defaults' choice, for replay
    evaluation = run.evaluation
    before, after = evaluation.before, evaluation.after
    print(evaluation)
    assert before["form_n"] == 0 and before["content_n"] >= 6  # the base answers in prose, often right
    assert sum(is_json_answer(a, reasoning=True) for a in after["answers"]) >= 13, after["answers"]  # >= 80%
    assert after["content_n"] >= before["content_n"], (before["answers"], after["answers"])
    assert not [w for w in evaluation.warnings if "lost the facts" in w], evaluation.warnings


def test_rerunning_a_training_cell_does_not_grow_memory(in_tmp):
    # The smallest real cell (one step of two examples): what is measured is the model each run loads, not
    # the training, and a leaked fp32 copy (~540 MiB) would show whatever the run's length.
    data = json_answers("train")[:2]
    sizes = []
    for _ in range(3):
        nbalign.sft(data, out="runs/again", overwrite=True, batch_size=2, max_steps=1, watch=False)
        assert live_models() == 0
        sizes.append(rss_mib())
    # The first run warms up (imports, allocator pools); the next reruns of the same cell must not add a copy.
    assert sizes[2] - sizes[1] < 150, sizes


def test_qlora_trains_the_builtin_model_on_the_cpu(in_tmp):
    plain = nbalign.lora(r=8)
    report = nbalign.lora(r=8, quantize="4bit")
    assert report.base_bytes < 0.4 * plain.base_bytes  # ~166 MiB vs ~540 MiB
    # test_engine.py trains QLoRA on the tiny model; this checks the real model's NF4 layers load, take
    # optimizer steps with finite losses, and generate: two short steps are enough for that.
    data = json_answers("train")[:4]
    run = nbalign.sft(data, out="runs/qlora", batch_size=2, max_steps=2, learning_rate=1e-3, watch=False)
    assert run.status == "finished" and run.summary["steps"] == 2
    losses = [r["loss"] for r in run.metrics.to_dict("records") if r.get("loss") == r.get("loss") and "loss" in r]
    assert losses and all(loss < 10 for loss in losses), losses
    assert isinstance(run.generate("What is the capital of Spain?", max_new_tokens=8), str)
