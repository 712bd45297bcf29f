"""Outcomes on the built-in model: a run says whether it learnt the behaviour asked for and what it cost
(knowledge lost, over-refusal), beside what prompting alone reached. Real training, measured on held-out prompts."""

from __future__ import annotations

import json

import pytest

import nbalign
from nbalign.evaluation import fewshot_prompt
from nbalign.examples import json_answers, refusals
from nbalign.outcomes import references, scores

pytestmark = pytest.mark.slow

# Only before and after (no curve points): each measurement answers every held-out prompt and the probe.
WATCH = {"eval_points": 0}


def test_an_aggressive_run_is_told_it_forgot(tmp_path):
    """Learning rate 1e-3 (five times the default) for 2 epochs: the answers take the JSON form, the facts go,
    and the run says so."""
    run = nbalign.sft(json_answers("train"), eval_data=json_answers("heldout")[::2], out=str(tmp_path / "hot"),
                      learning_rate=1e-3, epochs=2, fewshot=0, **WATCH)
    saved = json.loads((run.path / "evaluation.json").read_text())
    before, after = saved["before"], saved["after"]
    assert after["form_n"] >= 6 > before["form_n"]  # the behaviour asked for was learnt...
    assert after["probe_n"] < before["probe_n"] - 4  # ...and knowledge went with it
    text = " ".join(saved["warnings"])
    assert "knowledge probe dropped" in text or "lost the facts" in text, saved["warnings"]
    # The same table, answers and warnings in the cell's HTML, model text escaped.
    page = run._repr_html_()
    assert "answers carrying the reference answer&#x27;s content" in page or "reference answer's content" in page
    assert "knowledge probe answered right" in page and "&quot;answer&quot;" in page
    assert saved["examples"][0]["prompt"] == json_answers("heldout")[0]["messages"][0]["content"]


def test_the_prompting_baseline_is_what_a_manual_few_shot_prompt_gives(tmp_path):
    """The numbers shown beside the tuned result are those of the same model with the same demonstrations."""
    heldout = json_answers("heldout")[::2]
    run = nbalign.sft(json_answers("train"), eval_data=heldout, out=str(tmp_path / "ladder"), max_steps=1,
                      probe=False, eval_max_new_tokens=32, **WATCH)
    saved = json.loads((run.path / "evaluation.json").read_text())
    prompting = saved["prompting"]
    assert prompting["k"] == 3 and len(prompting["demos"]) == 3
    demos = [(d["prompt"], d["answer"]) for d in prompting["demos"]]
    # The demonstrations come from across the training data, not its first three rows.
    assert len({json.loads(a)["category"] for _, a in demos}) == 3
    questions = [r["messages"][0]["content"] for r in heldout]
    manual = nbalign.generate("smollm2-135m", [fewshot_prompt(demos, q) for q in questions], max_new_tokens=32)
    refs = references([r["messages"][1]["content"] for r in heldout], questions)
    expected = scores(manual, refs)
    assert manual == prompting["answers"]
    assert (prompting["form_n"], prompting["content_n"]) == (expected["form_n"], expected["content_n"])
    assert prompting["form_n"] > saved["before"]["form_n"]  # demonstrations teach the format in context
    assert "3-shot prompting" in repr(run.evaluation)


def test_over_refusal_is_measured_and_flagged(tmp_path):
    """A run built to over-refuse (its data refuses the innocent prompts too) is flagged, with both shares."""
    run = nbalign.sft(refusals("train", over_refuse=True), eval_data=refusals("heldout"),
                      out=str(tmp_path / "scared"), epochs=2, probe=False, fewshot=0, eval_max_new_tokens=32, **WATCH)
    after = run.evaluation.after
    assert after["refused"] >= 0.8  # the harmful prompts are refused...
    assert after["over_refused"] >= 0.5  # ...and so are the innocent ones that share their words
    assert run.evaluation.before["over_refused"] <= 0.2
    assert any(w.startswith("Over-refusal") for w in run.evaluation.warnings), run.evaluation.warnings


def test_replay_mixes_the_base_models_own_right_answers_into_the_rows(tmp_path, capsys):
    """replay: 0.2 over 20 rows adds 5 general rows (a fifth of 25), each the base's own answer, kept where right."""
    from nbalign import mixing
    from nbalign.examples import GENERAL_QUESTIONS
    from nbalign.outcomes import probe_score

    run = nbalign.sft(json_answers("train")[:20], out=str(tmp_path / "replay"), replay=0.2, max_steps=1,
                      watch=False, eval_split=0)
    assert json.loads((run.path / "spec.json").read_text())["examples"] == 25
    assert "replay: 5 general questions answered by the base model itself" in capsys.readouterr().out
    answered = mixing.base_answers("smollm2-135m")
    keys = dict(GENERAL_QUESTIONS)
    assert len(answered) >= 20
    assert all(probe_score([a], [(q, keys[q])])["probe_n"] == 1 for q, a in answered)
