"""%%merge: adapters of one base through peft's weighted-adapter combinations; whole models through mergekit."""

import importlib.util
import json

import pytest
import torch

import nbalign
from nbalign.errors import NbalignError
from helpers import chats


def _sft(model, out, seed, r=4):
    nbalign.lora(r=r, model=model)
    return nbalign.sft(chats(8), model=model, out=out, epochs=1, batch_size=4, learning_rate=5e-2, seed=seed,
                       eval_points=1, probe=False, fewshot=0, watch=False)


def _weights(model_name):
    """The model's final weights (a run's adapter merged in), as a dict of tensors."""
    from nbalign.devices import Device
    from nbalign.models import load_model, resolve

    return {k: v.detach().clone() for k, v in load_model(resolve(model_name), Device("cpu", False)).state_dict().items()}


@pytest.fixture(scope="module")
def two_runs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    a = _sft(tiny_model, str(root / "a"), seed=1)
    b = _sft(tiny_model, str(root / "b"), seed=2)
    return tiny_model, root, a.path, b.path


def test_cat_merge_is_the_exact_weighted_sum_of_the_runs_updates(two_runs):
    tiny, root, a, b = two_runs
    merged = nbalign.merge([str(a), str(b)], weights=[0.7, 0.5], out=str(root / "cat"))
    assert merged.status == "finished" and merged.summary["merge"] == "cat" and merged.summary["rank"] == 8
    base, wa, wb, wm = _weights(tiny), _weights(str(a)), _weights(str(b)), _weights(str(merged.path))
    changed = [k for k in base if not torch.equal(base[k], wa[k])]
    assert len(changed) == 14  # every adapted linear layer of the 2-layer model moved
    for k in base:
        expected = base[k] + 0.7 * (wa[k] - base[k]) + 0.5 * (wb[k] - base[k])
        torch.testing.assert_close(wm[k], expected, rtol=1e-4, atol=1e-6)
    spec = json.loads((merged.path / "spec.json").read_text())
    assert spec["method"] == "merge" and spec["spec"]["sources"] == [str(a), str(b)]
    card = (merged.path / "README.md").read_text()
    assert "cat" in card and str(a) in card and "0.7" in card
    assert card.startswith("---\nbase_model:") and "base_model_relation: merge" in card  # the HF metadata block
    assert "## Intended use" in card and "## Limitations" in card


@pytest.mark.parametrize("method", ["linear", "svd", "ties", "dare_ties", "dare_linear", "magnitude_prune",
                                    "ties_svd", "dare_linear_svd"])
def test_every_combination_gives_a_run_that_loads_as_a_model_and_trains_on(two_runs, method):
    tiny, root, a, b = two_runs
    out = root / f"m-{method}"
    merged = nbalign.merge([str(a), str(b)], method=method, weights=[0.6, 0.4], density=0.5, out=str(out))
    assert merged.status == "finished" and merged.summary["merge"] == method
    base, wm = _weights(tiny), _weights(str(out))
    moved = [k for k in base if not torch.equal(base[k], wm[k])]
    assert moved, f"{method}: the merged run equals its base"
    assert isinstance(merged.generate("Hello", max_new_tokens=3), str)
    # The same merge again gives the same weights: DARE's random drops are seeded.
    again = nbalign.merge([str(a), str(b)], method=method, weights=[0.6, 0.4], density=0.5, out=str(out) + "-2")
    for k, v in _weights(str(again.path)).items():
        torch.testing.assert_close(v, wm[k])
    if method == "svd":  # a run on top of a merged run continues from its weights
        follow = _sft(str(out), str(root / "on-top"), seed=3)
        assert follow.status == "finished"
        assert json.loads((follow.path / "spec.json").read_text())["parent_runs"][-1] == str(out.resolve())


def test_mistakes_are_named_before_anything_is_written(two_runs, tmp_path):
    tiny, root, a, b = two_runs
    with pytest.raises(NbalignError, match="at least two runs"):
        nbalign.merge([str(a)], out=str(tmp_path / "x"))
    with pytest.raises(NbalignError, match="2 weights for 3 runs"):
        nbalign.merge([str(a), str(b), str(a)], weights=[1, 1], out=str(tmp_path / "x"))
    with pytest.raises(NbalignError, match="'method' must be one of"):
        nbalign.merge([str(a), str(b)], method="average", out=str(tmp_path / "x"))
    with pytest.raises(NbalignError, match="slerp merges exactly two"):
        nbalign.merge([str(a), str(b), str(a)], method="slerp", out=str(tmp_path / "x"))
    with pytest.raises(NbalignError, match="does not exist"):
        nbalign.merge([str(a), str(tmp_path / "nothing")], out=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    nbalign.lora(r=8, model=tiny)
    wider = _sft(tiny, str(tmp_path / "r8"), seed=4, r=8)
    with pytest.raises(NbalignError, match="needs adapters of one rank"):
        nbalign.merge([str(a), str(wider.path)], method="ties", out=str(tmp_path / "y"))
    assert nbalign.merge([str(a), str(wider.path)], method="svd", out=str(tmp_path / "z")).summary["rank"] == 8


@pytest.mark.skipif(importlib.util.find_spec("mergekit") is not None, reason="mergekit is installed")
def test_whole_model_merges_without_mergekit_say_how_to_install_it(two_runs, tmp_path):
    tiny, root, a, b = two_runs
    with pytest.raises(NbalignError, match=r"pip install 'nbalign\[merge\]'"):
        nbalign.merge([str(a), str(b)], method="slerp", out=str(tmp_path / "s"))
    assert json.loads((tmp_path / "s" / "status.json").read_text())["status"] == "failed"


@pytest.mark.skipif(importlib.util.find_spec("mergekit") is None, reason="needs the optional extra nbalign[merge]")
@pytest.mark.parametrize("method", ["slerp", "linear", "ties", "dare_ties"])
def test_whole_models_merge_through_mergekit(two_runs, method):
    tiny, root, a, b = two_runs
    merged = nbalign.merge([str(a), str(b)], method=method, weights=[0.5, 0.5], density=0.5, whole=True,
                           out=str(root / f"full-{method}"))
    assert merged.status == "finished" and (merged.path / "model" / "config.json").is_file()
    base, wa, wb, wm = _weights(tiny), _weights(str(a)), _weights(str(b)), _weights(str(merged.path))
    k = next(k for k in base if not torch.equal(wa[k], wb[k]))
    if method == "linear":
        torch.testing.assert_close(wm[k], 0.5 * wa[k] + 0.5 * wb[k], rtol=1e-4, atol=1e-6)
    else:
        assert not torch.equal(wm[k], wa[k]) and not torch.equal(wm[k], wb[k])
    assert isinstance(merged.generate("Hello", max_new_tokens=3), str)


@pytest.mark.slow
@pytest.mark.shares("json-sft")
def test_merging_a_format_adapter_with_a_refusal_adapter_keeps_half_of_each(in_tmp, json_sft_run):
    """On the built-in model: one run learns the one-line JSON answers, another to refuse harmful requests; a
    weighted `cat` merge keeps at least half of each behaviour's held-out gain over the base.

    The JSON run is the shared defaults run: since 2026-12-07 the defaults take 4 rows per step on its 51 rows (39
    steps; 21 of 8 before), a larger update; the refusal run trains 2 epochs at learning rate 1e-3 in 48 steps of 2
    rows to match it (at 12 steps of 8, against the 39-step JSON run, fp32 kept 1/6 refused at weight 0.5). Measured
    with these two runs (greedy, 16 held-out questions, 6 held-out harmful requests; JSON run 16/16 in form, 0/6
    refused; refusal run 0/16, 6/6), merged with weights [1, w]: fp32 0.3 16/16 and 0/6, 0.4 16/16 and 0/6, 0.5
    16/16 and 3/6, 0.6 16/16 and 4/6, 0.7 16/16 and 5/6, 0.8 15/16 and 6/6, 1.0 0/16 and 6/6; bf16 autocast 0.4
    16/16 and 1/6, 0.5 16/16 and 4/6, 0.6 16/16 and 3/6, 0.7 16/16 and 5/6, 0.8 15/16 and 6/6, 1.0 0/16 and 6/6.
    (With 21-step JSON and 12-step refusal runs, until 2026-12-07, the balance lay at 0.3 to 0.5.)"""
    from nbalign.examples import is_json_answer, json_answers, refusals
    from nbalign.outcomes import is_refusal

    fast = {"probe": False, "fewshot": 0, "watch": False, "eval_split": 0}  # every row trains
    json_run = json_sft_run  # the defaults (LoRA r=16, 3 epochs) on all 51 rows, trained once for three tests
    # 6 of 6 held-out harmful requests refused in bf16 and in fp32 (the default learning rate needs 6 epochs).
    safe_run = nbalign.sft(refusals("train"), out="runs/refuse", epochs=2, learning_rate=1e-3, batch_size=2, **fast)
    questions = [r["messages"][0]["content"] for r in json_answers("heldout")]
    harmful = [r["messages"][0]["content"] for r in refusals("heldout")][0::2]

    def rates(model):
        answers = nbalign.generate(model, questions + harmful, max_new_tokens=40)
        return (sum(map(is_json_answer, answers[:len(questions)])) / len(questions),
                sum(map(is_refusal, answers[len(questions):])) / len(harmful))

    base, json_only, safe_only = (rates(m) for m in ("smollm2-135m", str(json_run.path), str(safe_run.path)))
    assert json_only[0] - base[0] >= 0.5 and safe_only[1] - base[1] >= 0.5  # each run learned its behaviour

    def keeps_half(both):
        return (both[0] - base[0] >= 0.5 * (json_only[0] - base[0])
                and both[1] - base[1] >= 0.5 * (safe_only[1] - base[1]))

    # Where the balance lies moves with the number format and with the two runs' steps (docstring), so the weight of
    # the refusal run is found the way a user finds it: the first of a short sweep that keeps half of each (both
    # formats kept half at every weight from 0.5 to 0.8; at 0.4 the refusals fell below half: the sweep stops at the
    # first weight that keeps half of each).
    measured = {}
    for weight in (0.5, 0.6, 0.7, 0.8):
        merged = nbalign.merge([str(json_run.path), "runs/refuse"], weights=[1.0, weight], out=f"runs/both-{weight}")
        measured[weight] = rates(str(merged.path))
        if keeps_half(measured[weight]):
            break
    print(f"JSON form / harmful refused: base {base}, json run {json_only}, refusal run {safe_only}, merged {measured}")
    assert keeps_half(measured[weight]), measured
