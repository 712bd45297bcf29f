"""Labels flow into training: a label store (or its path) given as --data becomes TRL's rows for %%dpo,
%%kto and %%reward_model, ties and 'both bad' used as the options say and said in the run's summary; the run
keeps the rows it trained on, so it replays as it was even after more labels arrive."""

import json

import pytest

import nbalign
from nbalign.errors import NbalignError
from nbalign.examples import style_pairs
from nbalign.labeling.store import LabelStore

from helpers import logged

FAST = dict(batch_size=4, max_steps=2, watch=False)


def _store(path="labels/s.sqlite", n=8) -> LabelStore:
    """n pairs where the person chose the terse answer (shown on side A or B), plus one tie, one 'both bad'
    and one skip."""
    store = LabelStore(path, labeller="ann")
    pairs = style_pairs()[: n + 3]
    items = []
    for k, p in enumerate(pairs):
        swapped = k % 2 == 1
        a, b = (p["rejected"], p["chosen"]) if swapped else (p["chosen"], p["rejected"])
        items.append({"prompt": p["prompt"], "a": a, "b": b, "swapped": swapped,
                      "source_a": {"model": "terse" if not swapped else "rambling"},
                      "source_b": {"model": "rambling" if not swapped else "terse"}})
    ids = store.add_items(items)
    for k, item_id in enumerate(ids[:n]):
        store.label(item_id, "B" if k % 2 else "A")
    store.label(ids[n], "tie")
    store.label(ids[n + 1], "both_bad")
    store.label(ids[n + 2], "skip")
    return store


def test_dpo_on_a_store_path_trains_on_its_pairs_and_keeps_them(in_tmp, tiny_model, capsys):
    store = _store()
    run = nbalign.dpo("labels/s.sqlite", model=tiny_model, out="runs/d", **FAST)
    said = capsys.readouterr().out
    assert "8 pairs rows" in said and "1 ties dropped" in said and "1 'both bad' dropped" in said, said
    spec = json.loads((run.path / "spec.json").read_text())["spec"]
    assert spec["data"]["labels"]["label_store"].endswith("s.sqlite")
    assert spec["data"]["labels"]["counts"] == {"pairs": 8, "ties dropped": 1, "'both bad' dropped": 1, "skipped": 1}
    saved = [json.loads(line) for line in (run.path / "data" / "data.jsonl").read_text().splitlines()]
    assert len(saved) == 8
    # Every saved row prefers the terse answer, whichever side it was shown on, and says where it came from.
    assert all(r["chosen"].startswith("Answer:") and r["chosen_source"]["model"] == "terse" for r in saved)
    assert all(r["labelled_by"] == "human" for r in saved)
    assert "8 pairs rows" in run._repr_html_()

    # More labels arrive; the replay trains on the rows the run kept, not on the grown store.
    store.label(store.add_items([{"prompt": "q", "a": "x", "b": "y"}])[0], "A")
    again = nbalign.replay(run.path, out="runs/d2")
    assert len((again.path / "data" / "data.jsonl").read_text().splitlines()) == 8
    assert [r["loss"] for r in logged(again, "loss")] == pytest.approx([r["loss"] for r in logged(run, "loss")], rel=1e-4)


def test_ties_both_ways_and_kto_both_bad_as_thumbs_down(in_tmp, tiny_model, capsys):
    store = _store()
    run = nbalign.dpo(store, model=tiny_model, out="runs/t", ties="both_ways", **FAST)
    assert "1 ties used both ways" in capsys.readouterr().out  # one tie, given in both orders
    rows = [json.loads(x) for x in (run.path / "data" / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and rows[-1]["chosen"] == rows[-2]["rejected"]

    run = nbalign.kto(store, model=tiny_model, out="runs/k", **FAST)
    said = capsys.readouterr().out
    assert "1 'both bad' as two thumbs down" in said and "1 ties dropped" in said, said
    rows = [json.loads(x) for x in (run.path / "data" / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 18 and sum(r["label"] for r in rows) == 8
    run = nbalign.kto(store, model=tiny_model, out="runs/k2", both_bad="drop", **FAST)
    assert len((run.path / "data" / "data.jsonl").read_text().splitlines()) == 16


def test_reward_model_from_a_labeller_like_object(in_tmp, tiny_model):
    class Labeller:  # anything with a `.store`, as the widgets have
        store = _store()

    rm = nbalign.reward_model(Labeller(), model=tiny_model, out="runs/rm", batch_size=4, max_steps=2)
    spec = json.loads((rm.path / "spec.json").read_text())["spec"]
    assert spec["data"]["rows"] == 8 and spec["data"]["in_memory"] == "LabelRows"


def test_label_store_errors_name_the_fix(in_tmp, tiny_model):
    empty = LabelStore("labels/empty.sqlite")
    empty.add_items([{"prompt": "q", "a": "x", "b": "y"}])
    with pytest.raises(NbalignError, match="gives no training rows yet"):
        nbalign.dpo(empty, model=tiny_model, out="runs/e", **FAST)
    with pytest.raises(NbalignError, match="cannot train on a label store"):
        nbalign.sft(_store("labels/x.sqlite"), model=tiny_model, out="runs/s", max_steps=1)
    with pytest.raises(NbalignError, match="'ties' must be one of"):
        nbalign.dpo("labels/x.sqlite", model=tiny_model, out="runs/e", ties="keep", **FAST)
