"""--live: rounds of training as labels arrive, on the tiny model. A round starts once `live_every` new labels
are in the store, trains a fresh adapter on every label so far, and the labeller then draws its candidates
from it; the widget keeps answering clicks while a round trains in the background."""

import threading
import time

import pytest

import nbalign
from nbalign.errors import NbalignError
from nbalign.labeling.widgets import PairLabeler

ROUND = dict(batch_size=2, max_steps=2, watch=False, live_every=4)


def terse(prompt):
    return f"Answer: {len(prompt)}."


def rambling(prompt):
    return f"Well, that is a long story about '{prompt}', and I will tell it at length."


def _labeller(path, n=12):
    labels = PairLabeler([f"Question number {i}?" for i in range(n)], model=[terse, rambling], store=path,
                         labeller="ann", ahead=n)
    labels.wait(n, timeout=60)
    return labels


def _prefer_terse(labels, k):
    delays = []
    for _ in range(k):
        item = labels.item
        start = time.perf_counter()
        labels.choose("A" if item.a.startswith("Answer:") else "B")
        delays.append(time.perf_counter() - start)
    return delays


def test_background_rounds_train_on_the_labels_and_feed_the_labeller(in_tmp, tiny_model):
    labels = _labeller("labels/live.sqlite")
    live = nbalign.dpo(labels, model=tiny_model, out="runs/live", live=True, live_mode="background", **ROUND)
    try:
        assert live.mode == "background" and live.rounds == []
        _prefer_terse(labels, 4)
        live.wait(rounds=1, timeout=120)
        first = live.latest
        assert first.status == "finished" and first.path.name == "round-1"
        assert first.spec["examples"] == 4 and first.spec["spec"]["data"]["labels"]["rows"] == 4
        # The labeller's next candidates come from the round's adapter (callables before).
        assert [str(s) for s in labels.queue.sources] == [str(first.path)]
        assert "round 1 done" in labels.notice

        # Clicks during the next round are answered while it trains.
        _prefer_terse(labels, 4)
        deadline = time.monotonic() + 60
        while "round 2: " not in live.state and time.monotonic() < deadline:
            time.sleep(0.05)
        during = _prefer_terse(labels, 2)
        assert max(during) < 1.0, during
        live.wait(rounds=2, timeout=180)
        assert live.latest.spec["examples"] >= 8  # every label so far, not only the new ones
        for run in live.rounds:  # each round is a whole run that replays from its folder
            assert run.spec["spec"]["live"] is False
    finally:
        live.stop()
        labels.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("nbalign-live")]


def test_rounds_mode_trains_between_two_labels(in_tmp, tiny_model):
    labels = _labeller("labels/rounds.sqlite", n=6)
    live = nbalign.dpo(labels, model=tiny_model, out="runs/rounds", live=True, live_mode="rounds", **ROUND)
    try:
        assert "rounds mode" in labels.notice
        _prefer_terse(labels, 3)
        assert live.rounds == []
        _prefer_terse(labels, 1)  # the fourth label trains a round before choose() returns
        assert len(live.rounds) == 1 and live.latest.status == "finished"
    finally:
        live.stop()
        labels.close()


def test_re_running_the_cell_stops_the_previous_live_training(in_tmp, tiny_model):
    labels = _labeller("labels/again.sqlite", n=4)
    first = nbalign.dpo(labels, model=tiny_model, out="runs/again", live=True, **ROUND)
    second = nbalign.dpo(labels, model=tiny_model, out="runs/again", live=True, **ROUND)
    try:
        assert first._stop.is_set() and not first._thread.is_alive()
        assert second._thread.is_alive()
    finally:
        second.stop()
        labels.close()


def test_live_needs_a_label_store(in_tmp, tiny_model):
    with pytest.raises(NbalignError, match="--live trains on labels as they arrive"):
        nbalign.dpo([{"prompt": "q", "chosen": "a", "rejected": "b"}], model=tiny_model, live=True)
