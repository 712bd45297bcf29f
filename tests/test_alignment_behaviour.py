"""Preference alignment on the real built-in model, SmolLM2-135M-Instruct, with each magic's default
settings: the held-out implicit-reward accuracy must rise from chance AND the greedy answers must take the
preferred style and get shorter (accuracy alone can rise while generations get worse)."""

import json

import pytest

import nbalign
from nbalign.examples import is_terse, style_pairs, style_thumbs

pytestmark = pytest.mark.slow


def _check(run, label):
    evaluation = json.loads((run.path / "evaluation.json").read_text())
    before, after = evaluation["before"], evaluation["after"]
    answers_before = [e["before"] for e in evaluation["examples"]]
    answers_after = [e["after"] for e in evaluation["examples"]]
    terse_before, terse_after = sum(map(is_terse, answers_before)), sum(map(is_terse, answers_after))
    accuracy = after.get("accuracy", after.get("label_accuracy"))
    n = len(answers_after)
    print(f"{label}: accuracy {before.get('accuracy', 0.5):.2f} -> {accuracy:.2f}, terse {terse_before}/{n} -> "
          f"{terse_after}/{n}, length {before['length']:.0f} -> {after['length']:.0f}, KL {after['kl']:.2f}, "
          f"perplexity {before['perplexity']:.1f} -> {after['perplexity']:.1f}")
    assert n == 8
    assert accuracy >= 0.9, evaluation
    assert terse_before <= 1, answers_before  # 2 of 16 before this set was halved
    assert terse_after >= 6, answers_after  # most held-out answers take the preferred style (12 of 16 before)
    assert after["length"] < 0.6 * before["length"], (answers_before, answers_after)
    assert not evaluation["warnings"], evaluation["warnings"]


# Training settings are the defaults; only the watch is set: measured before and after, not in between, with
# 32-token answers (a terse answer takes about 8; the base model's prose is cut at 32 before and after alike).
# Halving the answer length cut one after-training measurement on the 16 pairs from 58 s to 46 s (one thread,
# measured). Smaller training sets do not teach the style: 26 pairs (12 DPO steps) or 43 thumbs (18 KTO steps)
# left 1 of 16 held-out answers terse. No prompting baseline (fewshot=0): it changes only what is evaluated, and
# nothing here reads it (3-shot prompts on the 8 held-out pairs, about 5 s).
WATCH = {"eval_points": 0, "eval_max_new_tokens": 32, "fewshot": 0}
# Two held-out pairs per category (8 of 16): the watch's cost grows with them (one after-training measurement,
# 32 tokens: 46 s for 16 pairs, 25 s for 8, one thread), and the full set left no doubt: DPO went from 0/16 to
# 16/16 terse answers, 140 -> 14 characters, accuracy 1.0 (64 tokens, measured here); KTO 16/16 (preference_specs).
HELDOUT = style_pairs("heldout")[::2]


# Both runs start from the built-in model and are measured on HELDOUT: on one worker, the second reuses the first's
# measurements of the untrained model (nbalign/evalcache.py; about 23 s of answers, probe and log-probs, bf16).
same_start = pytest.mark.shares("style-heldout-before")


@same_start
def test_labels_given_in_the_widget_train_dpo_to_move_the_answers_not_only_the_reward(in_tmp):
    """A person's labels, given by driving the pair labeller from Python, consistently prefer the terse style;
    `nbalign.dpo(labels)` (what `%%dpo --data labels` calls) must move the held-out answers towards it. The
    two candidates per prompt are the written terse and rambling answers of style_pairs (two "systems")."""
    train = style_pairs("train")
    answers = {row["prompt"]: row for row in train}
    labels = nbalign.label_pairs(list(answers), model=[lambda p: answers[p]["chosen"], lambda p: answers[p]["rejected"]],
                                 store="labels/style.sqlite", labeller="tester")
    swapped = 0
    while labels.wait(1) and labels.item is not None:
        item = labels.item
        swapped += item.swapped
        labels.choose("A" if is_terse(item.a) else "B")
    labels.close()
    assert labels.store.counts()["labelled"] == len(train) and 0 < swapped < len(train)  # sides were shuffled
    run = nbalign.dpo(labels, eval_data=HELDOUT, out="runs/dpo", **WATCH)
    saved = run.spec["spec"]["data"]
    assert saved["rows"] == len(train) and saved["labels"]["counts"] == {"pairs": len(train)}
    _check(run, "dpo")


@same_start
def test_kto_from_thumbs_reaches_the_same_target(in_tmp):
    run = nbalign.kto(style_thumbs("train"), eval_data=HELDOUT, out="runs/kto", **WATCH)
    _check(run, "kto")
