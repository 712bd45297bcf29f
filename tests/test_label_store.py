"""The label store on its own (nbalign/labeling/store.py): an append-only log with provenance, majority of
labellers, the policies that turn labels into training rows, export and import, refusal of files that are
not stores, and resuming after a reopen. Fast: no model, no kernel."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from nbalign.errors import NbalignError
from nbalign.labeling.store import LabelStore, is_label_store

SRC_A = {"model": "smollm2-135m", "temperature": 0.7, "seed": 1}
SRC_B = {"model": "runs/sft1", "adapter": "runs/sft1/adapter", "temperature": 0.7, "seed": 2}


def pair(i: int, a: str | None = None, b: str | None = None, swapped: bool = False) -> dict:
    return {"kind": "pair", "prompt": f"question {i}?", "a": a or f"answer a{i}", "b": b or f"answer b{i}",
            "source_a": SRC_A, "source_b": SRC_B, "swapped": swapped}


def single(i: int) -> dict:
    return {"kind": "single", "prompt": f"question {i}?", "a": f"answer {i}", "source_a": SRC_A}


def store_with(tmp_path, n: int = 4, labeller: str = "ann", **kw) -> tuple[LabelStore, list[int]]:
    store = LabelStore(tmp_path / "labels.sqlite", labeller=labeller)
    return store, store.add_items([pair(i, **kw) for i in range(n)])


def raw(store: LabelStore, sql: str, *args):
    """Read the file as another program would: a fresh connection, not the store's."""
    with sqlite3.connect(store.path) as conn:
        return conn.execute(sql, args).fetchall()


def one_paragraph(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Fix:" in text, text
    return text


# -- the log -------------------------------------------------------------------------------------------------
def test_the_log_is_append_only_undo_is_a_row(tmp_path):
    store, ids = store_with(tmp_path)
    # Any UPDATE or DELETE on the two tables would abort from here on.
    with sqlite3.connect(store.path) as conn:
        for table in ("items", "labels"):
            for op in ("UPDATE", "DELETE"):
                conn.execute(f"CREATE TRIGGER no_{op}_{table} BEFORE {op} ON {table} "
                             f"BEGIN SELECT RAISE(ABORT, '{op} on {table}'); END")
    store.label(ids[0], "A")
    second = store.label(ids[1], "B")
    before = store.log()
    undone_item = store.undo()
    assert undone_item == ids[1]
    store.label(ids[1], "tie")
    store.label(ids[0], "B")  # a change of mind is a new row, not an edit
    store.pairs(), store.unpaired(), store.counts(), store.export(tmp_path / "x.jsonl")
    log = store.log()
    assert log[:2] == before  # earlier rows are exactly as they were
    assert [(r["item"], r["choice"], r["undoes"]) for r in log] == [
        (ids[0], "A", None), (ids[1], "B", None), (ids[1], "undo", second), (ids[1], "tie", None),
        (ids[0], "B", None)]
    assert store.decisions(labeller="ann") == {ids[0]: "B", ids[1]: "tie"}
    assert raw(store, "SELECT COUNT(*) FROM labels") == [(5,)]


def test_undo_takes_back_one_decision_at_a_time_per_labeller(tmp_path):
    store, ids = store_with(tmp_path)
    assert store.undo() is None  # nothing to take back
    store.label(ids[0], "A")
    store.label(ids[1], "A", labeller="bob")
    store.label(ids[2], "B")
    assert store.undo() == ids[2]
    assert store.undo() == ids[0]  # the one before, not bob's
    assert store.undo() is None
    assert store.decisions() == {ids[1]: "A"}
    store.label(ids[3], "A", origin="judge", labeller="judge")
    assert store.undo(labeller="judge") is None  # a person's undo never takes back a judge's pre-label
    assert store.undo(labeller="bob") == ids[1]
    assert store.decisions() == {} and store.decisions(origin="judge") == {ids[3]: "A"}


def test_each_label_keeps_its_provenance(tmp_path):
    store, ids = store_with(tmp_path, n=2, swapped=True)
    label_id = store.label(ids[0], "B", note={"why": "shorter"})
    row = store.log()[0]
    assert row["id"] == label_id and row["labeller"] == "ann" and row["origin"] == "human"
    assert json.loads(row["note"]) == {"why": "shorter"}
    assert row["time"].endswith("+00:00") and row["time"][:4].isdigit()  # UTC, ISO 8601
    item = store.item(ids[0])
    assert (item.kind, item.prompt, item.swapped) == ("pair", "question 0?", True)
    assert item.source_a == SRC_A and item.source_b == SRC_B and item.created.endswith("+00:00")
    (row,) = store.pairs()
    assert row["chosen"] == "answer b0" and row["rejected"] == "answer a0"
    assert row["chosen_source"] == SRC_B and row["rejected_source"] == SRC_A
    assert row["item"] == ids[0] and row["labelled_by"] == "human"
    assert store.pairs().provenance["last_label"] == label_id
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    (chat_id,) = store.add_items([{"kind": "pair", "prompt": chat, "a": "x", "b": "y"}])
    assert store.item(chat_id).prompt == chat  # a conversation prompt comes back as messages


def test_wrong_choices_and_items_are_refused(tmp_path):
    store, ids = store_with(tmp_path, n=1)
    (thumb,) = store.add_items([single(9)])
    with pytest.raises(NbalignError, match="'up' is not a label for a pair item"):
        store.label(ids[0], "up")
    with pytest.raises(NbalignError, match="'A' is not a label for a single item"):
        store.label(thumb, "A")
    with pytest.raises(NbalignError, match="no item 999"):
        store.label(999, "A")
    for call, match in ((lambda: store.pairs(ties="half"), "ties='half'"),
                        (lambda: store.unpaired(both_bad="up"), "both_bad='up'"),
                        (lambda: store.pairs(labels_from="ai"), "labels_from='ai'")):
        with pytest.raises(NbalignError, match=match) as err:
            call()
        one_paragraph(err)
    assert store.log() == []


# -- from labels to training rows ----------------------------------------------------------------------------
def test_majority_of_labellers_and_disagreements_dropped(tmp_path):
    store, ids = store_with(tmp_path, n=3)
    for who, choices in {"ann": "AAB", "bob": "ABA", "cy": "A B"}.items():
        for item, choice in zip(ids, choices):
            if choice != " ":
                store.label(item, choice, labeller=who)
    assert store.votes() == {ids[0]: ["A", "A", "A"], ids[1]: ["A", "B"], ids[2]: ["B", "A", "B"]}
    rows = store.pairs()
    assert [(r["item"], r["chosen"], r["labelled_by"]) for r in rows] == [
        (ids[0], "answer a0", "human x3"), (ids[2], "answer b2", "human x3")]
    assert rows.provenance["counts"] == {"pairs": 2, "disagreements dropped": 1}
    assert "1 disagreements dropped" in rows.summary
    store.undo(labeller="ann")  # ann takes back her B on item 2: now 1 B vs 1 A there, a disagreement
    assert [r["item"] for r in store.pairs()] == [ids[0]]
    assert store.counts()["labellers"] == ["ann", "bob", "cy"]


def test_ties_drop_or_both_ways_and_both_bad_drop_or_down(tmp_path):
    store, ids = store_with(tmp_path, n=5)
    store.add_items([pair(5, a="same", b=" same ")])
    for item, choice in zip(ids + [ids[-1] + 1], ["A", "tie", "both_bad", "skip", "B", "A"]):
        store.label(item, choice)
    dropped = store.pairs()
    assert [(r["chosen"], r["rejected"]) for r in dropped] == [("answer a0", "answer b0"), ("answer b4", "answer a4")]
    assert dropped.provenance["counts"] == {"pairs": 2, "ties dropped": 1, "'both bad' dropped": 1, "skipped": 1,
                                            "identical answers dropped": 1}
    both = store.pairs(ties="both_ways")
    assert [(r["chosen"], r["rejected"]) for r in both if r["item"] == ids[1]] == [
        ("answer a1", "answer b1"), ("answer b1", "answer a1")]
    assert len(both) == 4 and both.provenance["ties"] == "both_ways"

    down = store.unpaired()  # both_bad="down" by default
    assert [(r["completion"], r["label"]) for r in down if r["item"] == ids[2]] == [
        ("answer a2", False), ("answer b2", False)]
    assert [(r["completion"], r["label"]) for r in down if r["item"] == ids[0]] == [
        ("answer a0", True), ("answer b0", False)]
    assert not [r for r in down if r["item"] in (ids[1], ids[3])]  # tie and skip give no thumbs
    drop = store.unpaired(both_bad="drop")
    assert not [r for r in drop if r["item"] == ids[2]] and len(drop) == len(down) - 2
    assert drop.provenance["counts"]["'both bad' dropped"] == 1


def test_thumbs_and_judge_labels(tmp_path):
    store = LabelStore(tmp_path / "t.sqlite", labeller="ann")
    ids = store.add_items([single(i) for i in range(3)])
    store.label(ids[0], "up")
    store.label(ids[1], "down")
    store.label(ids[2], "skip")
    assert store.counts() == {"items": 3, "labelled": 3, "judged": 0,
                              "choices": {"up": 1, "down": 1, "skip": 1}, "labellers": ["ann"]}
    store.label(ids[2], "up", labeller="judge", origin="judge", note={"reason": "polite"})
    rows = store.unpaired()
    assert [(r["completion"], r["label"], r["source"]) for r in rows] == [
        ("answer 0", True, SRC_A), ("answer 1", False, SRC_A)]
    assert [r["item"] for r in store.unpaired(labels_from="judge")] == [ids[2]]
    # "any": a person's decision wins over the judge's; the judge fills in what nobody labelled
    store.label(ids[0], "down", labeller="judge", origin="judge")
    assert {r["item"]: r["label"] for r in store.unpaired(labels_from="any")} == {ids[0]: True, ids[1]: False}
    assert store.counts()["judged"] == 2 and store.counts()["labelled"] == 3


# -- export and import ---------------------------------------------------------------------------------------
def test_export_jsonl_parquet_csv_and_dataset(tmp_path):
    import pandas as pd

    store, ids = store_with(tmp_path, n=3)
    store.label(ids[0], "A")
    store.label(ids[1], "B")
    jsonl = [json.loads(line) for line in store.export(tmp_path / "out" / "p.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in jsonl] == [
        ("question 0?", "answer a0", "answer b0"), ("question 1?", "answer b1", "answer a1")]
    assert jsonl[0]["chosen_source"] == SRC_A and jsonl[0]["labelled_by"] == "human"
    frame = pd.read_parquet(store.export(tmp_path / "p.parquet"))
    assert list(frame["chosen"]) == ["answer a0", "answer b1"]
    assert json.loads(frame["rejected_source"][1]) == SRC_A  # nested provenance travels as JSON text
    assert list(pd.read_csv(store.export(tmp_path / "p.csv"))["rejected"]) == ["answer b0", "answer a1"]
    thumbs = [json.loads(x) for x in store.export(tmp_path / "u.jsonl", kind="thumbs").read_text().splitlines()]
    assert [(r["completion"], r["label"]) for r in thumbs] == [
        ("answer a0", True), ("answer b0", False), ("answer b1", True), ("answer a1", False)]
    ds = store.to_dataset()
    assert ds.column_names[:3] == ["prompt", "chosen", "rejected"] and ds["chosen"] == ["answer a0", "answer b1"]
    assert store.to_dataset("thumbs")["label"] == [True, False, True, False]
    with pytest.raises(NbalignError, match="unknown file type '.txt'") as err:
        store.export(tmp_path / "p.txt")
    one_paragraph(err)


def test_import_a_preference_dataset_pairs_and_thumbs(tmp_path):
    from datasets import Dataset

    pairs = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
             {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
              "rejected": [{"role": "assistant", "content": "go away"}]}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    store = LabelStore(tmp_path / "imported.sqlite")
    assert store.import_data(tmp_path / "pairs.jsonl") == 2
    rows = store.pairs()
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [("2+2?", "4", "5"), ("hi", "hello", "go away")]
    assert {r["origin"] for r in store.log()} == {"import"}
    assert rows[0]["chosen_source"] == {"imported_from": str(tmp_path / "pairs.jsonl")}
    assert store.counts()["labelled"] == 2 and store.undo() is None  # an import is not a click to take back

    thumbs = Dataset.from_list([{"prompt": "2+2?", "completion": "4", "label": True},
                                {"prompt": "2+2?", "completion": "5", "label": False}])
    kto = LabelStore(tmp_path / "thumbs.sqlite")
    assert kto.import_data(thumbs, source="my-thumbs") == 2
    assert [(i.kind, i.a) for i in kto.items()] == [("single", "4"), ("single", "5")]
    assert [(r["completion"], r["label"]) for r in kto.unpaired()] == [("4", True), ("5", False)]

    # A store's own export imports back into another store as the same pairs.
    back = LabelStore(tmp_path / "back.sqlite")
    back.import_data(store.export(tmp_path / "again.jsonl"))
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in back.pairs()] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in rows]


def test_import_is_all_or_nothing(tmp_path):
    store = LabelStore(tmp_path / "s.sqlite")
    bad = [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b", "chosen": "same", "rejected": "same"}]
    with pytest.raises(NbalignError) as err:
        store.import_data(bad)
    one_paragraph(err)
    assert store.items() == [] and store.log() == []


# -- files that are not (good) stores ------------------------------------------------------------------------
def test_a_foreign_file_is_refused_and_left_alone(tmp_path):
    notes = tmp_path / "notes.sqlite"
    notes.write_text('{"prompt": "not a database"}\n')
    with pytest.raises(NbalignError, match="is not a label store: it is not an SQLite file") as err:
        LabelStore(notes)
    assert "import_data" in one_paragraph(err)  # names the way to bring such a file in
    assert notes.read_text() == '{"prompt": "not a database"}\n'
    with pytest.raises(NbalignError, match="is a folder"):
        LabelStore(tmp_path)
    assert not is_label_store(notes) and not is_label_store(tmp_path / "absent.sqlite")


def test_a_foreign_sqlite_database_is_refused_and_left_alone(tmp_path):
    other = tmp_path / "app.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.execute("INSERT INTO users VALUES ('ann')")
    before = other.read_bytes()
    with pytest.raises(NbalignError, match=r"SQLite database of another program \(tables: users\)") as err:
        LabelStore(other)
    assert "new file name" in one_paragraph(err)
    assert other.read_bytes() == before  # not switched to WAL, no tables added
    with sqlite3.connect(other) as conn:  # one with a `meta` table of its own is still not ours
        conn.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    with pytest.raises(NbalignError, match="another program"):
        LabelStore(other)
    assert not is_label_store(other)


def test_a_damaged_store_is_refused_with_the_fix(tmp_path):
    store, ids = store_with(tmp_path, n=100, a="a" * 300, b="b" * 300)
    for i in ids[:50]:
        store.label(i, "A")
    store.close()  # checkpoints the WAL into the main file
    good = store.path.read_bytes()
    assert len(good) > 6 * 4096
    damaged = {"pages": bytearray(good), "header": bytearray(good), "truncated": good[:3000]}
    damaged["pages"][3 * 4096:6 * 4096] = b"\x5a" * (3 * 4096)
    damaged["header"][16:100] = b"\xff" * 84
    for name, data in damaged.items():
        path = tmp_path / f"{name}.sqlite"
        path.write_bytes(bytes(data))
        with pytest.raises(NbalignError, match="is damaged and cannot be read") as err:
            LabelStore(path)
        assert ".recover" in one_paragraph(err), name


def test_a_store_from_a_newer_nbalign_is_refused(tmp_path):
    store, _ = store_with(tmp_path, n=1)
    store.close()
    with sqlite3.connect(store.path) as conn:
        conn.execute("INSERT INTO meta VALUES ('version', '99') ON CONFLICT(key) DO UPDATE SET value='99'")
    with pytest.raises(NbalignError, match="newer nbalign") as err:
        LabelStore(store.path)
    assert "pip install -U nbalign" in one_paragraph(err)


# -- durability ----------------------------------------------------------------------------------------------
def test_reopen_resumes_where_labelling_stopped(tmp_path):
    store, ids = store_with(tmp_path, n=3)
    store.label(ids[0], "A")
    last = store.label(ids[1], "B")
    store.close()
    again = LabelStore(tmp_path / "labels.sqlite", labeller="ann")
    assert is_label_store(again.path)
    assert again.decisions(labeller="ann") == {ids[0]: "A", ids[1]: "B"}
    assert len(again.items()) == 3  # opening does not add or repeat items
    assert again.undo() == ids[1]  # undo reaches back past the reopen
    assert again.label(ids[2], "tie") > last
    # Another process sees everything the first one committed.
    out = subprocess.run([sys.executable, "-c", "import sys; from nbalign.labeling.store import LabelStore; "
                          "print(sorted(LabelStore(sys.argv[1]).decisions().items()))", str(again.path)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(sorted({ids[0]: "A", ids[2]: "tie"}.items()))


def test_wal_mode_and_full_sync(tmp_path):
    store, ids = store_with(tmp_path, n=1)
    store.label(ids[0], "A")
    assert raw(store, "PRAGMA journal_mode") == [("wal",)]  # persistent: any new connection sees WAL
    assert (tmp_path / "labels.sqlite-wal").exists()
    assert store._connect().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert raw(store, "SELECT key, value FROM meta WHERE key IN ('format', 'version') ORDER BY key") == [
        ("format", "nbalign-labels"), ("version", "1")]
    assert raw(store, "PRAGMA integrity_check") == [("ok",)]


def test_importing_the_store_is_light():
    code = ("import sys, nbalign.labeling.store; "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'pandas', 'trl', 'numpy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
