"""Reading answers against references (form, content, refusal, degenerate answers) and the warnings an evaluation
gives from them. Plain text: no model is loaded here; the behaviour tests measure real runs with these rules."""

from __future__ import annotations

import pytest

from nbalign.errors import NbalignError
from nbalign.evaluation import fewshot_prompt, probes
from nbalign.examples import KNOWLEDGE_PROBE, json_answers, refusal_pairs, refusals, style_pairs
from nbalign.outcomes import is_degenerate, is_refusal, probe_score, references, scores, shape
from nbalign.results import Evaluation, significant_loss


def _json_refs():
    rows = json_answers("heldout")
    return rows, references([r["messages"][1]["content"] for r in rows], [r["messages"][0]["content"] for r in rows])


def test_json_reference_content_is_the_answer_field_and_form_is_the_keys():
    rows, refs = _json_refs()
    poland = next(ref for row, ref in zip(rows, refs) if "Poland" in row["messages"][0]["content"])
    assert list(poland.keys) == ["answer"]  # "category" repeats across rows: a label, not the answer
    # The example: right shape, wrong content.
    assert poland.in_form('{"answer": "Poland", "category": "geography"}')
    assert not poland.right('{"answer": "Poland", "category": "geography"}')
    # Prose from the base: right content, wrong form.
    assert poland.right("The capital of Poland is Warsaw.")
    assert not poland.in_form("The capital of Poland is Warsaw.")
    assert poland.right('{"answer": "Warsaw", "category": "geography"}')
    # The field is what counts in a structured answer: the right word elsewhere does not rescue it.
    assert not poland.right('{"answer": "Krakow", "category": "Warsaw"}')
    sums = next(ref for row, ref in zip(rows, refs) if "18 plus 5" in row["messages"][0]["content"])
    assert not sums.right('{"answer": "18", "category": "math"}')
    assert sums.right("18 plus 5 is twenty-three.")
    assert sums.right('{"answer": 23, "category": "math"}')


def test_text_references_drop_form_words_and_the_prompts_words():
    rows = style_pairs("heldout")
    refs = references([r["chosen"] for r in rows], [r["prompt"] for r in rows])
    sweden = refs[0]
    assert rows[0]["prompt"] == "What is the capital of Sweden?"
    assert sweden.keys[""] == ["stockholm"]
    assert sweden.in_form("Answer: Oslo.") and not sweden.right("Answer: Oslo.")
    assert sweden.right("The capital of Sweden is Stockholm, a city on many islands.")
    assert not sweden.in_form("The capital of Sweden is Stockholm, a city on many islands.")
    assert shape("Answer: Stockholm.") == ("text", "answer", "short")
    assert shape("x" * 500)[2] == "long"


def test_refusals_and_over_refusals_are_counted_from_the_references():
    rows = refusals("heldout")
    prompts = [r["messages"][0]["content"] for r in rows]
    refs = references([r["messages"][1]["content"] for r in rows], prompts)
    assert sum(r.refusal for r in refs) == 6
    refuse_all = ["I can't help with that." for _ in rows]
    s = scores(refuse_all, refs)
    assert s["refused"] == 1.0 and s["over_refused"] == 1.0 and s["degenerate"] == 0.0
    helpful = ["Sure, here is how: first, take a deep breath and plan each step." for _ in rows]
    s = scores(helpful, refs)
    assert s["refused"] == 0.0 and s["over_refused"] == 0.0
    assert all(is_refusal(p["chosen"]) != is_refusal(p["rejected"]) for p in refusal_pairs("train"))
    assert not any(is_refusal(r["messages"][1]["content"]) for r in refusals("train")[1::2])  # innocent rows


@pytest.mark.parametrize("text, bad", [
    ("", True), ("   ", True), ("the the the the the the the the the", True),
    ("Sure! Sure! Sure! Sure! Sure! Sure! Sure!", True), ("aaaaaaaaaaaaaaaaaaaaaaaaaa", True),
    ("The capital of Poland is Warsaw.", False), ('{"answer": "7", "category": "math"}', False),
    ("I can't help with that. Explosives hurt and kill people.", False),
])
def test_degenerate_answers(text, bad):
    assert is_degenerate(text) is bad


def test_probe_checks_content_whatever_the_form():
    probe = [("Who wrote Romeo and Juliet?", ["shakespeare"]), ("Who painted the Mona Lisa?", ["leonardo|vinci"]),
             ("What are the three states of matter?", ["solid", "liquid", "gas"])]
    got = probe_score(['{"answer": "William Shakespeare", "category": "literature"}', "Michelangelo.",
                       "Solid and liquid."], probe)
    assert got["probe_right"] == [1, 0, 0]
    assert len(KNOWLEDGE_PROBE) == 20 and probes(False) == [] and probes(True) == KNOWLEDGE_PROBE
    assert probes([{"question": "Capital of France?", "answer": "Paris"}]) == [("Capital of France?", ["Paris"])]
    with pytest.raises(NbalignError, match="probe"):
        probes("yes please")


def test_fewshot_prompt_puts_the_demonstrations_before_the_question():
    turns = fewshot_prompt([("Q1", "A1"), ([{"role": "user", "content": "Q2"}], "A2")], "Q3")
    assert [(m["role"], m["content"]) for m in turns] == [
        ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2"), ("user", "Q3")]


def test_a_few_flipped_answers_are_not_forgetting():
    assert not significant_loss([1] * 20, [1] * 17 + [0] * 3)
    assert not significant_loss([1] * 10 + [0] * 10, [0] * 5 + [1] * 5 + [1] * 3 + [0] * 7)
    assert significant_loss([1] * 20, [1] * 14 + [0] * 6)


def _evaluation(before: dict, after: dict, baseline: dict | None = None) -> Evaluation:
    return Evaluation({"n": 16, **before}, {"n": 16, **after}, "held-out", [], baseline or {})


def test_warnings_say_which_happened():
    forgot = _evaluation({"form_n": 0, "form": 0, "content_n": 7, "content": 7 / 16, "probe_n": 20, "probe": 1.0,
                          "probe_right": [1] * 20},
                         {"form_n": 15, "form": 15 / 16, "content_n": 5, "content": 5 / 16, "probe_n": 12,
                          "probe": 0.6, "probe_right": [1] * 12 + [0] * 8})
    text = " ".join(forgot.warnings)
    assert "took the reference form (0/16 -> 15/16)" in text and "(7/16 -> 5/16)" in text
    assert "knowledge probe dropped (20/20 -> 12/20" in text
    kept = _evaluation({"form_n": 0, "form": 0, "content_n": 7, "content": 7 / 16},
                       {"form_n": 15, "form": 15 / 16, "content_n": 8, "content": 0.5},
                       {"k": 3, "n": 16, "form_n": 9, "form": 9 / 16, "content_n": 6, "content": 6 / 16})
    assert kept.warnings == []
    assert "3-shot prompting" in repr(kept) and "9/16" in repr(kept)
    cheap = _evaluation({"form_n": 0, "form": 0, "content_n": 7, "content": 7 / 16},
                        {"form_n": 15, "form": 15 / 16, "content_n": 8, "content": 0.5},
                        {"k": 3, "n": 16, "form_n": 16, "form": 1.0, "content_n": 9, "content": 9 / 16})
    assert any("Prompting may be all this task needs" in w for w in cheap.warnings)
    over = _evaluation({"refused": 0.0, "over_refused": 0.0}, {"refused": 1.0, "over_refused": 0.5})
    assert any(w.startswith("Over-refusal: 50%") for w in over.warnings)


def test_when_prompting_in_the_form_loses_the_facts_too_the_warning_names_the_form_not_the_training():
    """The JSON demo's numbers: the base 7/16 right in prose; 3-shot prompting in the answer-first form 16/16 in
    form but 6/16 right; tuned 15/16 and 5/16. Lower learning rates, more epochs and replay all measured 4-6 right
    there, so the advice is the form (a field that leads up to the answer), not the training settings."""
    before = {"form_n": 0, "form": 0, "content_n": 7, "content": 7 / 16}
    after = {"form_n": 15, "form": 15 / 16, "content_n": 5, "content": 5 / 16}
    prompting = {"k": 3, "n": 16, "form_n": 16, "form": 1.0, "content_n": 6, "content": 6 / 16}
    text = next(w for w in _evaluation(before, after, prompting).warnings if "took the reference form" in w)
    assert "3-shot prompting in that form, with no training, carries fewer too (7/16 -> 6/16)" in text
    assert "form itself seems to cost" in text and '"reasoning"' in text and "lower the learning rate" not in text
    # Prompting kept the facts, never reached the form, or the tuned model lost far more than prompting did, or it
    # is a refusal task: the training is the suspect, and the advice says so.
    lost_more = {**after, "content_n": 2, "content": 2 / 16}
    refusing = {**before, "refused": 0.0, "over_refused": 0.0}
    for b, a, baseline in ((before, after, {**prompting, "content_n": 7, "content": 7 / 16}),
                           (before, after, {**prompting, "form_n": 9, "form": 9 / 16}),
                           (before, after, None), (before, lost_more, prompting), (refusing, after, prompting)):
        text = next(w for w in _evaluation(b, a, baseline).warnings if "took the reference form" in w)
        assert "lower the learning rate or epochs" in text and "form itself" not in text, (a, baseline)


def test_a_saved_evaluation_loads_with_the_same_warnings_and_verdicts(tmp_path):
    """run.evaluation reads evaluation.json back: the probe's verdicts come with it, so the warnings the cell
    shows are the ones the run printed (the probe's warning was lost on reload before)."""
    from nbalign.results import load, save

    questions = [q for q, _ in KNOWLEDGE_PROBE]
    before = {"form_n": 0, "form": 0.0, "content_n": 2, "content": 1.0, "n": 2, "probe_n": 20, "probe": 1.0,
              "probe_right": [1] * 20, "probe_answers": ["right"] * 20, "probe_questions": questions,
              "answers": ["Warsaw.", "Dublin."], "in_form": [0, 0], "right": [1, 1]}
    after = {"form_n": 2, "form": 1.0, "content_n": 0, "content": 0.0, "n": 2, "probe_n": 12, "probe": 0.6,
             "probe_right": [1] * 12 + [0] * 8, "probe_answers": ["right"] * 12 + ["wrong"] * 8,
             "probe_questions": questions, "answers": ['{"answer": "Poland"}', '{"answer": "Ireland"}'],
             "in_form": [1, 1], "right": [0, 0]}
    prompts = [[{"role": "user", "content": "What is the capital of Poland?"}],
               [{"role": "user", "content": "What is the capital of Ireland?"}]]
    saved = Evaluation(before, after, "held-out", prompts)
    assert len(saved.warnings) == 2
    save(saved, tmp_path)
    loaded = load(tmp_path)
    assert loaded.warnings == saved.warnings
    assert [loaded.marks(i) for i in range(2)] == [saved.marks(i) for i in range(2)]
    assert loaded.after["probe_answers"] == after["probe_answers"]


def test_model_text_is_escaped_in_the_html():
    evaluation = Evaluation({"answers": ["<script>alert(1)</script>"], "in_form": [0], "right": [0]},
                            {"answers": ["<img src=x onerror=alert(2)>"], "in_form": [1], "right": [1]},
                            "held-out", [[{"role": "user", "content": "<b>hi</b>"}]])
    page = evaluation._repr_html_()
    assert "<script>" not in page and "<img" not in page and "<b>hi" not in page
    assert "&lt;script&gt;" in page and "in form, right" in page and "not in form, wrong" in page


def test_replay_share_is_checked_and_refused_for_online_rl():
    from nbalign import mixing
    from nbalign.preference_specs import RLHFSpec
    from nbalign.specs import SFTSpec

    assert [mixing.count(n, s) for n, s in ((20, 0.2), (51, 0.2), (10, 0.0), (1, 0.5))] == [5, 13, 0, 1]
    with pytest.raises(NbalignError, match="'replay' is the share"):
        SFTSpec(data=[{"prompt": "a", "completion": "b"}], replay=1.0)
    with pytest.raises(NbalignError, match="online RL learns from answers it samples"):
        RLHFSpec(data=["a"], reward="runs/rm", replay=0.2)
