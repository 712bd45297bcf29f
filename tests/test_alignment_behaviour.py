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
    print(f"{label}: accuracy {before.get('accuracy', 0.5):.2f} -> {accuracy:.2f}, terse {terse_before}/16 -> "
          f"{terse_after}/16, length {before['length']:.0f} -> {after['length']:.0f}, KL {after['kl']:.2f}, "
          f"perplexity {before['perplexity']:.1f} -> {after['perplexity']:.1f}")
    assert len(answers_after) == 16
    assert accuracy >= 0.9, evaluation
    assert terse_before <= 2, answers_before
    assert terse_after >= 12, answers_after  # most held-out answers take the preferred style
    assert after["length"] < 0.6 * before["length"], (answers_before, answers_after)
    assert not evaluation["warnings"], evaluation["warnings"]


# Training settings are the defaults; only the watch is measured before and after, not in between.
WATCH = {"eval_points": 0}


def test_dpo_defaults_move_the_answers_not_only_the_reward(in_tmp):
    run = nbalign.dpo(style_pairs("train"), eval_data=style_pairs("heldout"), out="runs/dpo", **WATCH)
    _check(run, "dpo")


def test_kto_from_thumbs_reaches_the_same_target(in_tmp):
    run = nbalign.kto(style_thumbs("train"), eval_data=style_pairs("heldout"), out="runs/kto", **WATCH)
    _check(run, "kto")
