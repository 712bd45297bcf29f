"""%%dpo, %%kto and the evaluation on the tiny model: every loss type trains, data errors are clear,
class balancing happens and is said, the evaluation measures what it claims."""

import json
import math

import pytest
from helpers import interrupt_at, live_models, logged, moved_weights

import nbalign
from nbalign import NbalignError
from nbalign.examples import style_pairs, style_thumbs

# Small and fast: no evaluation watch (WATCHED: 4 generated tokens, one short text) unless a test needs it.
FAST = dict(batch_size=4, max_steps=2, watch=False)
WATCHED = dict(batch_size=4, max_steps=2, eval_points=0, eval_max_new_tokens=4, general_text=["A short text."])
ALL_DPO_LOSSES = [
    "sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sigmoid_norm",
]


# The loss of a reference-based DPO loss at a zero margin, which it has at step 1, while the policy is its
# reference (beta 0.1; no SFT term, sft_weight 0): sigmoid -log(sigmoid(0)) = ln 2; IPO (0 - 1 / (2 beta))^2 = 25;
# hinge max(0, 1 - 0) = 1; robust with no label smoothing = sigmoid.
AT_ZERO_MARGIN = {"sigmoid": math.log(2), "ipo": 25.0, "hinge": 1.0, "robust": math.log(2)}


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"])
def test_each_named_loss_trains_a_few_steps(in_tmp, tiny_model, loss):
    # One of them also runs TRL's own evaluation (what held-out data feeds when the watch is off).
    held_out = {"eval_data": style_pairs("heldout")[:4]} if loss == "sigmoid" else {}
    alone = {"sft_weight": 0} if loss in AT_ZERO_MARGIN else {}  # the named loss alone, to check its value
    run = nbalign.dpo(style_pairs()[:8], model=tiny_model, out=f"runs/{loss}", loss=loss, **held_out, **alone, **FAST)
    assert run.status == "finished" and run.summary["steps"] == 2
    rows = logged(run, "loss")
    assert [r["step"] for r in rows] == [1, 2]  # 8 pairs at batch 4, max_steps 2: a loss at each step
    if loss in AT_ZERO_MARGIN:
        assert rows[0]["rewards/margins"] == 0.0  # the reference is the policy with its adapter off
        assert rows[0]["loss"] == pytest.approx(AT_ZERO_MARGIN[loss], rel=1e-4), rows[0]
    assert all(math.isfinite(r["loss"]) for r in rows), rows
    # The adapter learnt: every LoRA B matrix (zero at init) of 2 layers x 7 linear modules moved.
    assert len(moved_weights(tiny_model, run.path / "adapter")) == 14
    assert live_models() == 0


def test_a_weighted_mixture_of_every_dpo_loss_trains(in_tmp, tiny_model):
    weights = {name: round(1 / len(ALL_DPO_LOSSES), 3) for name in ALL_DPO_LOSSES}
    run = nbalign.dpo(style_pairs()[:8], model=tiny_model, out="runs/mix", loss=weights, **FAST)
    config = run.spec["trl_config"]
    assert config["loss_type"] == ALL_DPO_LOSSES + ["sft"]  # sft_weight adds the SFT anchor
    assert config["loss_weights"][-1] == 1.0
    assert run.status == "finished"


def test_dpo_defaults_and_reference_choices(in_tmp, tiny_model):
    run = nbalign.dpo(style_pairs()[:8], model=tiny_model, out="runs/d", **{**FAST, "max_steps": 4})
    config = run.spec["trl_config"]
    assert config["beta"] == 0.1 and config["loss_type"] == ["sigmoid", "sft"]
    assert config["precompute_ref_log_probs"] is True  # 4 steps x 4 rows = two passes: one reference pass, not two
    run = nbalign.dpo(style_pairs()[:8], model=tiny_model, out="runs/p", sft_weight=0, **FAST)  # one pass
    config = run.spec["trl_config"]
    assert config["loss_type"] == ["sigmoid"] and config["precompute_ref_log_probs"] is False
    simpo = nbalign.dpo(style_pairs()[:8], model=tiny_model, out="runs/s", loss="simpo", **FAST)
    assert simpo.spec["trl_config"]["beta"] == 2.0 and simpo.spec["trl_config"]["loss_type"] == "simpo"


def test_the_reference_is_the_adapter_switched_off_not_a_second_model(in_tmp, tiny_model, monkeypatch):
    """With an adapter, TRL must get no ref_model and must not load one."""
    import trl

    seen = {}
    original = trl.DPOTrainer.__init__

    def spy(self, *args, **kwargs):
        seen["ref_model"] = kwargs.get("ref_model")
        original(self, *args, **kwargs)
        seen["trainer_ref"] = self.ref_model

    monkeypatch.setattr(trl.DPOTrainer, "__init__", spy)
    nbalign.dpo(style_pairs()[:8], model=tiny_model, out="runs/r", epochs=1, **FAST)
    assert seen == {"ref_model": None, "trainer_ref": None}


def test_the_evaluation_is_shown_saved_and_summarised(in_tmp, tiny_model, capsys):
    run = nbalign.dpo(style_pairs()[:8], model=tiny_model, out="runs/e", eval_data=style_pairs("heldout")[:4],
                      **{**WATCHED, "eval_points": 1, "max_steps": 3, "learning_rate": 5e-3})
    out = capsys.readouterr().out
    assert "preference accuracy" in out and "perplexity on general text" in out
    saved = json.loads((run.path / "evaluation.json").read_text())
    assert saved["source"] == "held-out"
    assert saved["before"]["accuracy"] == 0.5 and saved["before"]["kl"] == 0.0
    assert saved["after"]["kl"] > 0  # the adapter moved the policy away from the reference
    assert len(saved["examples"]) == 4
    # The run's summary carries the saved evaluation's numbers (to 4 decimals), after and before.
    summary = run.summary
    for key in ("accuracy", "margin", "kl", "length", "perplexity"):
        assert summary[key] == pytest.approx(saved["after"][key], abs=1e-4), key
    for key in ("accuracy", "length"):
        assert summary[f"{key}_before"] == pytest.approx(saved["before"][key], abs=1e-4), key
    # The curves: the watch logged at the start, once in between, and at the end.
    watched = [r for r in run.metrics.to_dict("records") if r.get("watch/accuracy") == r.get("watch/accuracy")
               and "watch/accuracy" in r]
    assert [r["step"] for r in watched] == [0, 2, 3]


def test_evaluate_a_run_from_python(in_tmp, tiny_model):
    run = nbalign.dpo(style_pairs()[:8], model=tiny_model, out="runs/ev", **{**FAST, "learning_rate": 5e-3})
    evaluation = nbalign.evaluate(str(run.path), style_pairs("heldout")[:4], general_text=["Some text here."],
                                  max_new_tokens=4)
    assert evaluation.before["accuracy"] == 0.5 and evaluation.before["margin"] == 0.0  # the reference: all ties
    # Two steps at 5e-3 with the SFT term: the held-out chosen answers became likelier, and more so than the
    # rejected ones (margin 0.17, chosen log-prob +0.08 per token, when written).
    assert evaluation.after["margin"] > 0 and evaluation.after["chosen_logp_change"] > 0, evaluation.after
    assert evaluation.after["kl"] > 0
    # Perplexity is measured on the tuned model, not the reference (a random model: near the vocabulary size).
    assert evaluation.after["perplexity"] != pytest.approx(evaluation.before["perplexity"], rel=1e-6)
    assert "preference accuracy" in repr(evaluation) and "<table>" in evaluation._repr_html_()
    assert live_models() == 0
    with pytest.raises(NbalignError, match="reference"):
        nbalign.evaluate(tiny_model, style_pairs("heldout")[:2])


def test_kto_balances_skewed_thumbs_and_says_so(in_tmp, tiny_model, capsys):
    thumbs = style_thumbs()[:12]  # 7 up, 5 down
    run = nbalign.kto(thumbs, model=tiny_model, out="runs/k", **WATCHED)
    assert "7 thumbs up vs 5 down" in capsys.readouterr().out
    config = run.spec["trl_config"]
    assert config["desirable_weight"] == 1.0 and config["undesirable_weight"] == 1.4
    assert run.status == "finished" and "label_accuracy" in run.summary
    given = nbalign.kto(thumbs, model=tiny_model, out="runs/k2", undesirable_weight=1.5, **FAST)
    assert given.spec["trl_config"]["undesirable_weight"] == 1.5


def test_kto_takes_pairs_only_when_asked(in_tmp, tiny_model):
    with pytest.raises(NbalignError, match="--unpair"):
        nbalign.kto(style_pairs()[:4], model=tiny_model, out="runs/x", **FAST)
    run = nbalign.kto(style_pairs()[:4], model=tiny_model, out="runs/u", unpair=True, **FAST)
    assert run.spec["examples"] == 8 and run.status == "finished"


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"question": "q", "good": "a", "bad": "b"}], "rename the columns"),
        ([{"prompt": "q", "chosen": "", "rejected": "b"}], "empty chosen or rejected"),
        ([{"prompt": "q", "chosen": "same", "rejected": "same"}], "identical chosen and rejected"),
        ([{"prompt": "q", "completion": "a", "label": True}], "%%kto"),
        ([], "empty"),
    ],
)
def test_bad_pairs_give_one_clear_error_and_write_nothing(in_tmp, tiny_model, rows, message):
    with pytest.raises(NbalignError, match=message) as info:
        nbalign.dpo(rows, model=tiny_model, out="runs/bad", **FAST)
    assert "Fix:" in str(info.value)
    assert not (in_tmp / "runs" / "bad").exists()


def test_prompts_longer_than_max_length_are_refused(in_tmp, tiny_model):
    rows = [{"prompt": "word " * 300, "chosen": "a", "rejected": "b"}]
    with pytest.raises(NbalignError, match="max_length 128.*raise --max-length"):
        nbalign.dpo(rows, model=tiny_model, out="runs/long", max_length=128, **FAST)


def test_thumbs_labels_in_the_forms_people_write_them():
    from nbalign.preference_data import to_unpaired

    rows = [{"prompt": "q", "completion": "a", "label": v} for v in (True, 1, "up", "👍", "false", 0, "down")]
    assert [r["label"] for r in to_unpaired(rows)] == [True, True, True, True, False, False, False]
    with pytest.raises(NbalignError, match="neither thumbs up nor thumbs down"):
        to_unpaired([{"prompt": "q", "completion": "a", "label": "maybe"}])


def test_pairs_with_an_implicit_prompt_are_split():
    from nbalign.preference_data import to_pairs

    chosen = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    rejected = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey there, how can I help?"}]
    (pair,) = to_pairs([{"chosen": chosen, "rejected": rejected}])
    assert pair["prompt"] == chosen[:1] and pair["chosen"] == chosen[1:] and pair["rejected"] == rejected[1:]


def test_dpo_spec_errors_name_the_fix():
    from nbalign.preference_specs import DPOSpec

    with pytest.raises(NbalignError, match="did you mean 'sigmoid'"):
        DPOSpec.from_dict({"data": [1], "loss": "sigmod"})
    with pytest.raises(NbalignError, match="cannot be mixed"):
        DPOSpec.from_dict({"data": [1], "loss": {"simpo": 1, "sigmoid": 1}})
    assert DPOSpec.from_dict({"data": [1], "loss": "ipo+hinge"}).loss == {"ipo": 1.0, "hinge": 1.0}


def test_an_interrupted_dpo_run_resumes_and_still_shows_its_evaluation(in_tmp, tiny_model, monkeypatch):
    from nbalign.callbacks import MetricsWriter

    original = MetricsWriter.on_log
    data = style_pairs()[:8]
    options = {**WATCHED, "max_steps": 4, "learning_rate": 5e-3}
    interrupt_at(monkeypatch, step=2)
    run = nbalign.dpo(data, model=tiny_model, out="runs/i", **options)
    assert run.status == "interrupted" and not (run.path / "evaluation.json").exists()
    monkeypatch.setattr(MetricsWriter, "on_log", original)
    resumed = nbalign.dpo(data, model=tiny_model, out="runs/i", resume=True, **options)
    assert resumed.status == "finished" and resumed.summary["steps"] == 4
    # The "before" numbers were kept from the first start, measured on the untouched model.
    assert resumed.evaluation.before["accuracy"] == 0.5 and "accuracy" in resumed.summary
    assert live_models() == 0


def test_the_evaluation_warns_when_ranking_improves_but_answers_do_not_move():
    from nbalign.results import Evaluation

    before = {"accuracy": 0.5, "like_chosen": 0.56, "length": 140, "perplexity": 51.6, "chosen_logp_change": 0.0}
    # Measured on the built-in model: KTO on 56 thumbs rows ranked every held-out pair right, answers unchanged.
    stuck = Evaluation(before, {"accuracy": 1.0, "like_chosen": 0.56, "length": 131, "perplexity": 54.1,
                                "chosen_logp_change": -0.2})
    assert any("barely moved" in w for w in stuck.warnings)
    assert any("less likely" in w for w in stuck.warnings)
    longer = Evaluation(before, {"accuracy": 1.0, "like_chosen": 0.9, "length": 300, "perplexity": 80.0,
                                 "chosen_logp_change": 1.0})
    assert [w.split()[0] for w in longer.warnings] == ["Answers", "Perplexity"]
    moved = Evaluation(before, {"accuracy": 1.0, "like_chosen": 1.0, "length": 14, "perplexity": 52.7,
                                "chosen_logp_change": 3.0})
    assert moved.warnings == []
