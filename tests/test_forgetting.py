"""Outcomes on the built-in model: the prompting baseline a run shows beside its result, and replay. The runs that
forget and over-refuse, and their warnings, are tested through the tutorial that shows them
(test_notebooks.py, notebooks/07_alignment_tax.ipynb). Real training, measured on held-out prompts."""

from __future__ import annotations

import json

import pytest

import nbalign
from nbalign.evaluation import fewshot_prompt
from nbalign.examples import json_answers
from nbalign.outcomes import references, scores

pytestmark = pytest.mark.slow

# Only before and after (no curve points): each measurement answers every held-out prompt and the probe.
WATCH = {"eval_points": 0}


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
    # The rows trained on are kept with the run: the base's own answers, as conversations.
    saved = [json.loads(line) for line in (run.path / "data" / "replay.jsonl").read_text().splitlines()]
    assert len(saved) == 5 and all((m[0]["content"], m[1]["content"]) in answered for m in
                                   (r["messages"] for r in saved))
