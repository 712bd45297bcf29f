"""The labelling widgets driven from Python (nbalign/labeling/widgets.py) and the candidate thread behind them
(candidates.py): labels land in the store with provenance, undo and skip, resuming a reopened store, stale
clicks refused, sides shuffled, model text carried as data, errors surfaced, no thread or model left behind,
and a real kernel in which a cell makes a labeller and later cells (and a front end's message) label. Fast:
functions or the tiny random model as sources. The real browser is tests/test_browser*.py."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import threading

import pytest
from helpers import live_models

from nbalign.errors import NbalignError
from nbalign.labeling.candidates import THREAD_NAME, CandidateQueue
from nbalign.labeling.store import LabelStore
from nbalign.labeling.widgets import _CSS, _ESM, PairLabeler, ThumbsLabeler

PROMPTS = [f"Name a colour, number {i}." for i in range(6)]
XSS = "<script>alert(1)</script> & <img src=x onerror=alert(2)>"


def good(prompt):
    return "good: " + prompt


def bad(prompt):
    return "bad: " + prompt


def tuned_run(folder, base: str):
    """A finished run folder holding a (random, non-zero) LoRA adapter on `base`: a tuned model to compare."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from nbalign import runfolder

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(folder / runfolder.ADAPTER)
    runfolder.write_spec(folder, {"method": "sft", "spec": {"model": base}})
    runfolder.set_status(folder, "finished")
    return folder


def generator_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]


@pytest.fixture
def labelers():
    """Labellers made by a test, closed after it (and no generator thread may outlive them)."""
    made = []
    yield made
    for lab in made:
        lab.close()
    assert not generator_threads()


def pair_labeler(labelers, store, prompts=PROMPTS, **options) -> PairLabeler:
    lab = PairLabeler(prompts, store=store, labeller="ann", **{"model": [good, bad], **options})
    labelers.append(lab)
    return lab


# -- labels and provenance ----------------------------------------------------------------------------------
def test_pairs_from_one_model_sampled_twice_land_with_provenance(tmp_path, tiny_model, labelers):
    import torch

    rng_before = torch.random.get_rng_state()
    lab = pair_labeler(labelers, tmp_path / "l.sqlite", PROMPTS[:3], model=tiny_model, max_new_tokens=6, seed=3,
                       sampling={"temperature": 1.0, "top_k": 50}, ahead=3)
    assert lab.wait(3) == 3
    shown = lab.item
    assert lab.item_id == shown.id and lab.answer_a == shown.a and lab.answer_b == shown.b
    label = lab.choose("A")
    assert lab.confirmed == label and lab.item_id != shown.id and lab.labelled == 1
    lab.choose("B")
    lab.choose("both bad")
    store = lab.store
    assert [(r["choice"], r["labeller"], r["origin"]) for r in store.log()] == [
        ("A", "ann", "human"), ("B", "ann", "human"), ("both_bad", "ann", "human")]
    assert all(r["time"] for r in store.log())
    for item in store.items():
        for side, source in (("a", item.source_a), ("b", item.source_b)):
            assert source["model"] == tiny_model and source["adapter"] is None and source["time"]
            assert source["sampling"] == {"temperature": 1.0, "top_k": 50, "do_sample": True, "max_new_tokens": 6,
                                          "seed": source["sampling"]["seed"]}
        assert {item.source_a["sample"], item.source_b["sample"]} == {0, 1}  # one generate call, two rows
        assert item.source_a["sample"] == int(item.swapped)
        assert item.a != item.b  # identical samples are drawn again
    assert lab.status == "done: 3 labelled" and lab.item_id == -1
    # The thread samples with its own generator: the process's RNG (a training loop's) is untouched, and the
    # same seed gives the same candidates.
    assert torch.equal(rng_before, torch.random.get_rng_state())
    again = pair_labeler(labelers, tmp_path / "again.sqlite", PROMPTS[:3], model=tiny_model, max_new_tokens=6, seed=3,
                         sampling={"temperature": 1.0, "top_k": 50}, ahead=3)
    again.wait(3)
    assert [(i.a, i.b) for i in again.store.items()] == [(i.a, i.b) for i in store.items()]


def test_undo_appends_and_reverts_skip_and_stale_ids(tmp_path, labelers):
    lab = pair_labeler(labelers, tmp_path / "l.sqlite")
    lab.wait(2)
    first = lab.item_id
    lab.choose("tie", item=first)
    second = lab.item_id
    # A second click on the item just labelled (a double click) must not label the next one.
    with pytest.raises(NbalignError, match=f"Item {first} is not the item shown"):
        lab.choose("A", item=first)
    sent = []
    lab.send = sent.append
    lab._handle_custom_msg({"action": "B", "item": first, "t": 1.5}, [])
    assert sent == [{"ack": "B", "item": first, "t": 1.5, "ok": False, "label": None}]
    assert "not the item shown" in lab.status and lab.item_id == second
    assert [r["choice"] for r in lab.store.log()] == ["tie"]
    # Undo appends a row naming the label it takes back, and shows that item again.
    assert lab.undo() == first
    log = lab.store.log()
    assert [r["choice"] for r in log] == ["tie", "undo"] and log[1]["undoes"] == log[0]["id"]
    assert lab.item_id == first and lab.labelled == 0 and lab.store.decisions("ann") == {}
    # The front end's undo carries the item shown, so a double click undoes once.
    lab._handle_custom_msg({"action": "skip", "item": first, "t": 2}, [])
    assert sent[-1]["ok"] and lab.item_id == second
    lab._handle_custom_msg({"action": "undo", "item": second, "t": 3}, [])
    lab._handle_custom_msg({"action": "undo", "item": second, "t": 4}, [])
    assert [m["ok"] for m in sent[-2:]] == [True, False] and lab.item_id == first
    assert lab.skip() and lab.store.decisions("ann") == {first: "skip"}
    with pytest.raises(NbalignError, match="'maybe' is not a label here"):
        lab.choose("maybe")
    assert lab.undo() == first and lab.undo() is None and lab.status == "nothing to undo"


def test_thumbs_up_down_skip(tmp_path, labelers):
    lab = ThumbsLabeler(PROMPTS[:4], model=good, store=tmp_path / "t.sqlite", labeller="bo")
    labelers.append(lab)
    lab.wait(4)
    assert lab.kind == "single" and lab.answer_a == "good: " + PROMPTS[0] and lab.answer_b == ""
    lab.up()
    lab.down()
    lab.choose("👍")
    with pytest.raises(NbalignError, match="use one of up, down, skip"):
        lab.choose("A")
    lab.skip()
    assert [r["choice"] for r in lab.store.log()] == ["up", "down", "up", "skip"]
    assert lab.item is None and lab.status == "done: 4 labelled" and lab.labelled == 4
    rows = lab.unpaired()
    assert [r["label"] for r in rows] == [True, False, True]
    assert rows[0]["source"]["function"] == f"{__name__}.good" and rows[0]["labelled_by"] == "human"


def test_reopening_a_store_resumes_without_generating_again(tmp_path, labelers):
    calls = []

    def counted(prompt):
        calls.append(prompt)
        return "x: " + prompt

    lab = pair_labeler(labelers, tmp_path / "l.sqlite", PROMPTS[:4], model=[counted, bad], ahead=2)
    lab.wait(2)
    lab.choose("A")
    lab.wait()
    lab.choose("B")
    lab.wait(2)
    lab.close()
    made = len(lab.store.items())
    assert made >= 3 and len(calls) == made
    # A new session (a new kernel): the first undecided item comes first, the made ones are not made again.
    again = pair_labeler(labelers, tmp_path / "l.sqlite", PROMPTS[:4], model=[counted, bad], ahead=2)
    assert again.item_id == lab.store.items()[2].id and again.labelled == 2
    again.wait(2)
    while again.item_id >= 0:
        again.choose("tie")
        again.wait()
    assert sorted(calls) == sorted(PROMPTS[:4]) and len(again.store.items()) == 4
    assert again.status == "done: 4 labelled"


def test_sides_are_shuffled_recorded_and_mapped_back(tmp_path, labelers):
    prompts = [f"q{i}" for i in range(12)]
    lab = pair_labeler(labelers, tmp_path / "l.sqlite", prompts, seed=7, ahead=12)
    lab.wait(12)
    while lab.item_id >= 0:
        lab.choose("A" if lab.answer_a.startswith("good") else "B")
    items = lab.store.items()
    assert {i.swapped for i in items} == {True, False}
    for i in items:  # A is the second source exactly when swapped
        assert i.a.startswith("bad" if i.swapped else "good")
        assert i.source_a["function"].endswith("bad" if i.swapped else "good")
    rows = lab.pairs()
    assert len(rows) == 12
    assert all(r["chosen"].startswith("good") and r["chosen_source"]["function"].endswith(".good") for r in rows)
    # The same seed shuffles the same way (the shuffle is per prompt, not per run).
    again = pair_labeler(labelers, tmp_path / "again.sqlite", prompts, seed=7, ahead=12)
    again.wait(12)
    assert [i.swapped for i in again.store.items()] == [i.swapped for i in items]


def test_model_text_is_data(tmp_path, labelers):
    lab = pair_labeler(labelers, tmp_path / "l.sqlite", [XSS], model=[lambda p: p, lambda p: "**" + p + "**"])
    lab.wait()
    # The synced state carries the text as it is (no escaping, no Markdown): the front end writes it as text.
    assert {lab.answer_a, lab.answer_b} == {XSS, "**" + XSS + "**"} and lab.prompt == XSS
    assert XSS in repr(lab)
    for bad_sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "marked", "eval("):
        assert bad_sink not in _ESM
    assert _ESM.count("textContent") >= 6 and "createTextNode" in _ESM
    # The DOM contract the browser tests rely on.
    for name in ("nbalign-labeler", "nbalign-btn", "nbalign-prompt", "nbalign-answer-", "nbalign-answer",
                 "nbalign-progress", "nbalign-status", "data-lm-suppress-shortcuts", "stopPropagation", "tabIndex"):
        assert name in _ESM, name
    assert ".nbalign-labeler" in _CSS
    # It never takes the focus by itself (keys typed in another cell would become labels); a click does.
    assert "requestAnimationFrame" not in _ESM and "click here, then keys" in _ESM and "nbalign-keys-on" in _CSS


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to parse the ES module")
def test_the_front_end_module_parses(tmp_path):
    module = tmp_path / "labeler.mjs"
    module.write_text(_ESM)
    result = subprocess.run(["node", "--check", str(module)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_progress_status_notice_and_judge_prelabels(tmp_path, labelers):
    release = threading.Event()

    def slow(prompt):
        release.wait(10)
        return "slow: " + prompt

    lab = pair_labeler(labelers, tmp_path / "l.sqlite", PROMPTS[:3], model=[slow, bad])
    assert lab.item_id == -1 and lab.status == "generating candidates 0/3…" and lab.total == 3
    with pytest.raises(NbalignError, match="There is no item to label"):
        lab.choose("A")
    release.set()
    lab.wait(3)
    lab.notice = "live: round 2 on 8 labels"
    assert lab.message == "live: round 2 on 8 labels"
    # A judge's label already in the store is shown; the person confirms it with a human row of their own.
    item = lab.item_id
    lab.store.label(item, "B", labeller="judge:rules", origin="judge", note={"reason": "shorter"})
    lab._refresh()
    assert lab.prelabel == "B" and lab.prelabel_text == "judge prefers B: shorter"
    seen = []
    lab.on_label(lambda label, it, choice: seen.append((label, it.id, choice, lab.busy)))
    label = lab.choose("B")
    assert lab.store.decisions("ann") == {item: "B"} and lab.prelabel == ""
    assert seen == [(label, item, "B", True)] and not lab.busy  # a round between labels holds the buttons
    # A judge set on the labeller pre-labels the items waiting, in the candidate thread.
    lab.judge = lambda prompt, a, b: ("A" if a.startswith("slow") else "B", "prefers the slow one")
    lab.queue.poke()
    for _ in range(200):
        if len(lab.store.votes("judge")) == 3:
            break
        threading.Event().wait(0.05)
    votes = lab.store.votes("judge")
    assert len(votes) == 3 and lab.prelabel in ("A", "B") and "judge prefers" in lab.prelabel_text
    assert all(r["labeller"].startswith("judge:") for r in lab.store.log() if r["origin"] == "judge")


def test_a_source_with_a_system_message_and_greedy_answers_on_both_sides(tmp_path, tiny_model, labelers):
    """{"model", "system"}: that model answering after a system message; the stored prompt stays the user's.
    With two different sources greedy answers are fine; a source's own "sampling" overrides the labeller's."""
    from nbalign.generation import generate

    brief = {"model": tiny_model, "system": "Answer in one short sentence."}
    lab = pair_labeler(labelers, tmp_path / "l.sqlite", PROMPTS[:2], model=[tiny_model, brief], max_new_tokens=5,
                       sampling={"do_sample": False})
    assert lab.wait(2) == 2
    for item in lab.store.items():
        assert item.prompt in PROMPTS[:2]
        side = {"system" in s: (answer, s) for answer, s in ((item.a, item.source_a), (item.b, item.source_b))}
        (told, told_from), (plain, plain_from) = side[True], side[False]
        assert told_from["system"] == brief["system"] and told_from["model"] == plain_from["model"] == tiny_model
        assert told_from["adapter"] is None and told_from["sampling"]["do_sample"] is False
        assert plain_from["sampling"]["do_sample"] is False
        assert told == generate(tiny_model, [{"role": "system", "content": brief["system"]},
                                             {"role": "user", "content": item.prompt}], max_new_tokens=5)
        assert plain == generate(tiny_model, item.prompt, max_new_tokens=5)
    # A thumbs source with sampling of its own; the labeller's `sampling` does not override it.
    thumbs = ThumbsLabeler(PROMPTS[:1], model={"model": tiny_model, "sampling": {"do_sample": False}},
                           store=tmp_path / "t.sqlite", max_new_tokens=4, sampling={"temperature": 0.7})
    labelers.append(thumbs)
    thumbs.wait(1)
    assert thumbs.item.source_a["sampling"]["do_sample"] is False and "system" not in thumbs.item.source_a
    # The same model with the same system message on both sides, greedy: the same answer twice, refused.
    with pytest.raises(NbalignError, match="greedy decoding writes the same answer twice"):
        PairLabeler(PROMPTS, model=[brief, dict(brief)], store=tmp_path / "x.sqlite", sampling={"do_sample": False})
    with pytest.raises(NbalignError, match="not a model with a system message or sampling of its own"):
        PairLabeler(PROMPTS, model=[tiny_model, {"model": tiny_model, "sytem": "Be brief."}], store=tmp_path / "x.sqlite")


def test_wait_for_more_items_than_ahead(tmp_path, labelers):
    lab = pair_labeler(labelers, tmp_path / "l.sqlite", [f"q{i}" for i in range(10)], ahead=2)
    assert lab.wait(7, timeout=30) >= 7  # the thread writes past `ahead` while someone waits for more
    release = threading.Event()

    def slow(prompt):
        release.wait(10)
        return "slow: " + prompt

    stuck = pair_labeler(labelers, tmp_path / "s.sqlite", PROMPTS[:4], model=[slow, bad], ahead=1)
    with pytest.raises(NbalignError, match=r"Only 0 of the 3 items asked for were ready to label after 0.3 s "
                                           r"\(0 of 4 prompts have their candidates\)"):
        stuck.wait(3, timeout=0.3)
    release.set()
    assert stuck.wait(3, timeout=30) == 3


def test_undo_takes_back_a_label_of_its_own_kind_only(tmp_path, labelers):
    path = tmp_path / "both.sqlite"
    pairs = pair_labeler(labelers, path, PROMPTS[:2])
    thumbs = ThumbsLabeler(PROMPTS[:2], model=good, store=path, labeller="ann")
    labelers.append(thumbs)
    pairs.wait(1)
    thumbs.wait(1)
    pair_item, thumb_item = pairs.item_id, thumbs.item_id
    pairs.choose("A")
    thumbs.choose("up")  # the newest label of ann in this store is a thumbs label ...
    assert pairs.undo() == pair_item  # ... but the pair labeller's undo takes back its own
    assert pairs.item_id == pair_item and pairs.labelled == 0
    assert LabelStore(path).decisions("ann") == {thumb_item: "up"} and thumbs.labelled == 1


def test_a_click_reads_no_whole_table(tmp_path, labelers, monkeypatch):
    """A click costs a few indexed queries, not a read of every label: the same with 10 labels or 10,000."""
    lab = pair_labeler(labelers, tmp_path / "l.sqlite", PROMPTS, ahead=6)
    lab.wait(6)
    lab.store.label(lab.queue.pending()[1].id, "B", labeller="judge:x", origin="judge", note={"reason": "shorter"})

    def whole(*args, **kwargs):
        raise AssertionError("a click read a whole table")

    for name in ("log", "items", "decisions", "votes", "counts"):
        monkeypatch.setattr(lab.store, name, whole)
    lab.choose("A")
    assert lab.prelabel_text == "judge prefers B: shorter"
    lab.undo()
    lab.choose("tie")
    lab.choose("skip")
    lab._refresh()
    assert lab.labelled == 2 and lab.queue.error is None
    # A label taken back outside the widget (store.undo() in another cell) is asked again: wait() looks afresh.
    back = lab.store.undo("ann", kind="pair")
    lab.wait(1)
    assert back in [item.id for item in lab.queue.pending()]


def test_the_model_cache_is_safe_across_threads():
    """A judge in the candidate thread and the kernel's own code share generation.CACHE: one load at a time,
    and each caller gets the model it asked for, never one another thread swapped in meanwhile."""
    import time

    from nbalign.generation import ModelCache

    cache, inside, most, got = ModelCache(), [], [0], []

    def loader(key):
        def load():
            inside.append(key)
            most[0] = max(most[0], len(inside))
            time.sleep(0.01)
            inside.remove(key)
            return key, key + "-tokenizer"
        return load

    def use(key):
        got.extend((key, cache.get(key, loader(key))) for _ in range(5))

    threads = [threading.Thread(target=use, args=(key,)) for key in ("a", "b", "c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert most[0] == 1 and len(got) == 15
    assert all(model == key and tokenizer == key + "-tokenizer" for key, (model, tokenizer) in got)


def test_generator_errors_surface(tmp_path, labelers):
    def flaky(prompt):
        if prompt == PROMPTS[1]:
            raise ValueError("the template has no {colour}")
        return "ok"

    lab = pair_labeler(labelers, tmp_path / "l.sqlite", PROMPTS[:3], model=[flaky, bad])
    with pytest.raises(NbalignError, match=r"Generating candidates stopped on an error: ValueError: the template"):
        lab.wait(3)
    assert "ValueError" in lab.error and lab.status.startswith("generating") is False
    lab.choose("A")  # what was generated before the error can still be labelled
    assert lab.status.startswith("error: ") and lab.item_id == -1
    with pytest.raises(NbalignError, match="stopped on an error"):
        lab.choose("A")
    # Wrong answers from a function, and settings that cannot sample, are named.
    lab2 = pair_labeler(labelers, tmp_path / "l2.sqlite", PROMPTS[:1], model=[lambda p: 3, bad])
    with pytest.raises(NbalignError, match="returned int, not text"):
        lab2.wait()
    with pytest.raises(NbalignError, match="greedy decoding writes the same answer twice"):
        PairLabeler(PROMPTS, model="smollm2-135m", store=tmp_path / "l3.sqlite", sampling={"do_sample": False})
    with pytest.raises(NbalignError, match="does not exist"):
        PairLabeler(PROMPTS, model="./runs/nope", store=tmp_path / "l3.sqlite")
    with pytest.raises(NbalignError, match="takes one source"):
        ThumbsLabeler(PROMPTS, model=[good, bad], store=tmp_path / "l3.sqlite")
    with pytest.raises(NbalignError, match="Prompt 1 is not a question"):
        PairLabeler(["ok", ""], model=[good, bad], store=tmp_path / "l3.sqlite")


def test_close_and_rerun_leave_no_thread_or_model(tmp_path, tiny_model, labelers):
    before = live_models()
    lab = pair_labeler(labelers, tmp_path / "l.sqlite", PROMPTS, model=tiny_model, max_new_tokens=4, ahead=2)
    lab.wait(1)
    one_copy = live_models()  # (a causal LM counts twice: it holds its base model)
    assert len(generator_threads()) == 1 and one_copy > before
    # Re-running the cell (a new labeller on the same store) stops the old one's thread first.
    rerun = pair_labeler(labelers, tmp_path / "l.sqlite", PROMPTS, model=tiny_model, max_new_tokens=4, ahead=3)
    assert not lab.queue.running and len(generator_threads()) <= 1
    rerun.wait(3)  # (the model is loaded only when a candidate is due: resumed items need none)
    assert live_models() == one_copy
    # set_models (what live training does after a round): later candidates are base vs tuned; those made stay.
    made = {i.id for i in rerun.store.items()}
    tuned = tuned_run(tmp_path / "runs" / "tuned", tiny_model)
    rerun.set_models([tiny_model, str(tuned)])
    while rerun.item_id >= 0:
        rerun.choose("A")
        rerun.wait()
    items = rerun.store.items()
    assert len(items) == len(PROMPTS) and len(made) < len(items)
    for i in items:
        adapters = {i.source_a["adapter"], i.source_b["adapter"]}
        assert adapters == ({None} if i.id in made else {None, str(tuned.resolve())}), (i.id, made, adapters)
        assert {i.source_a["model"], i.source_b["model"]} == ({tiny_model} if i.id in made else {tiny_model, str(tuned)})
    rerun.close()
    assert not generator_threads()
    gc.collect()
    assert live_models() == before
    # A queue nobody holds stops its thread by itself.
    queue = CandidateQueue(LabelStore(tmp_path / "q.sqlite"), PROMPTS, model=[good, bad], ahead=1)
    thread = queue._thread
    del queue
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()


# -- a real kernel ------------------------------------------------------------------------------------------
def test_labelling_in_a_real_kernel(tmp_path, kernel_name):
    """A cell makes the labeller, later cells label through the Python API, and a front end's comm message
    (what a click sends) labels too; the store then holds them all, and the widget's state reached the front
    end."""
    import nbclient
    import nbformat

    cells = [
        "from nbalign.labeling.widgets import PairLabeler\n"
        "def good(p): return 'good: ' + p\n"
        "def bad(p): return '<b>bad</b>: ' + p\n"
        f"labels = PairLabeler({PROMPTS[:4]!r}, model=[good, bad], store='labels/k.sqlite', labeller='kim')\n"
        "labels",
        "labels.wait(4); labels.choose('A'); labels.choose('tie')\n"
        "print('COMM', labels.model_id, labels.item_id)",
        "print('AFTER', labels.item_id, labels.labelled, labels.status)\n"
        "labels.close()\n"
        "import json, threading\n"
        "from nbalign.labeling.store import LabelStore\n"
        "s = LabelStore('labels/k.sqlite')\n"
        "print('RESULT', json.dumps({'log': [(r['choice'], r['labeller']) for r in s.log()],"
        " 'threads': [t.name for t in threading.enumerate() if t.name.startswith('nbalign')]}))",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name=kernel_name,
                                     resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        client.execute_cell(nb.cells[0], 0)
        client.execute_cell(nb.cells[1], 1)
        _, comm_id, item = next(o["text"] for o in nb.cells[1].outputs if "COMM" in o.get("text", "")).split()
        # What the front end sends on a click: a custom message on the widget's comm.
        msg = client.kc.session.msg("comm_msg", {"comm_id": comm_id, "data": {
            "method": "custom", "content": {"action": "B", "item": int(item), "t": 12.5}}})
        client.kc.shell_channel.send(msg)
        client.execute_cell(nb.cells[2], 2)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.outputs)
    assert not [o for c in nb.cells for o in c.outputs if o.output_type == "error"], text
    result = json.loads(text.split("RESULT ")[1].splitlines()[0])
    assert result == {"log": [["A", "kim"], ["tie", "kim"], ["B", "kim"]], "threads": []}
    assert "AFTER" in text and " 3 " in text.split("AFTER")[1]
    # The widget was displayed and its state synced to the front end (here nbclient plays it).
    view = [o for o in nb.cells[0].outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert view and view[0]["data"]["text/plain"].startswith("PairLabeler on 'labels/k.sqlite'")
    state = client.widget_state.get(comm_id, {})
    assert state.get("total") == 4 and state.get("_esm", "").count("textContent") >= 6
