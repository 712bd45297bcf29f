"""A label, once confirmed, survives anything: a labelling process killed with SIGKILL at random moments (many
times, on one store that accumulates), and two labellers writing to one store at once (processes and threads,
through the widget's Python API and through the store), who must also be asked about the same items.

The labelling script drives a PairLabeler as the front end's clicks do and prints "confirmed <label id> <item>
<choice>" only after `choose()` returned, so every such line must be found in the store afterwards, and the
store must open cleanly (integrity_check, LabelStore())."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from nbalign.labeling.store import LabelStore

KILLS = 50

# The labelling process: a PairLabeler (the widget's Python API, as a click runs it) on two functions as the
# candidate sources, over prompts of its own, on the store given. It says "ready" (with any heavy module the
# import loaded), waits for "go", then labels (and now and then undoes) until it is killed or reaches `limit`,
# printing each decision once the call that made it has returned.
LABELLER = r'''
import random, sqlite3, sys, time
from nbalign.labeling.widgets import PairLabeler

path, who, seed, limit, pause, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    float(sys.argv[5]), sys.argv[6]
heavy = sorted(m for m in ("torch", "transformers", "datasets", "pandas", "numpy") if m in sys.modules)
rng = random.Random(seed)
labeler = PairLabeler([f"{prompts} q{i}" for i in range(300)], model=[lambda p: "first " + p, lambda p: "second " + p],
                      store=path, labeller=who, seed=seed)
labeler.wait(1)  # the first candidate is there before the clock starts
reader = sqlite3.connect(path)
print("ready", " ".join(heavy), flush=True)
sys.stdin.readline()  # "go": lets two labellers start together
for n in range(limit):
    if pause:
        time.sleep(rng.uniform(0, pause))  # a person between clicks: lets the other labeller's writes in
    if n and rng.random() < 0.15:
        item = labeler.undo()
        if item is not None:
            row = reader.execute("SELECT id, undoes FROM labels WHERE labeller = ? AND choice = 'undo' "
                                 "ORDER BY id DESC LIMIT 1", (who,)).fetchone()
            print("undone", row[0], item, row[1], flush=True)
        continue
    labeler.wait(1)
    item, choice = labeler.item.id, rng.choice(["A", "B", "tie", "both_bad", "skip"])
    label_id = labeler.choose(choice)
    print("confirmed", label_id, item, choice, flush=True)
labeler.close()
print("done", flush=True)
'''


def script(tmp_path: Path) -> Path:
    path = tmp_path / "labeller.py"
    path.write_text(LABELLER)
    return path


def start(tmp_path: Path, store: Path, who: str, seed: int, limit: int = 10**9, pause: float = 0,
          prompts: str | None = None) -> subprocess.Popen:
    """The labelling script on `store` as `who`; its prompts are its own unless `prompts` names a shared set."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, str(script(tmp_path)), str(store), who, str(seed), str(limit), str(pause),
                             prompts or f"{who} {seed}"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def go(proc: subprocess.Popen) -> None:
    ready = proc.stdout.readline()
    assert ready.startswith("ready"), ready + proc.stderr.read()
    assert ready.split()[1:] == [], f"importing the widget loaded {ready.split()[1:]}: it must stay light"
    proc.stdin.write("go\n")
    proc.stdin.flush()


def confirmed(lines: list[str]) -> tuple[list[tuple], list[tuple]]:
    """(label id, item, choice) of each confirmed label, (undo row id, item, undone label id) of each undo.
    A line cut short by the kill is not counted (its label was on disk before the print began anyway)."""
    labels, undos = [], []
    for line in lines:
        if not line.endswith("\n"):
            continue
        word, *rest = line.split()
        if word == "confirmed":
            labels.append((int(rest[0]), int(rest[1]), rest[2]))
        elif word == "undone":
            undos.append((int(rest[0]), int(rest[1]), int(rest[2])))
    return labels, undos


def opens_cleanly(path: Path) -> dict[int, tuple]:
    """integrity_check ok and LabelStore() accepts it; returns the labels {id: (item, choice, undoes)}."""
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    store = LabelStore(path)
    rows = {r["id"]: (r["item"], r["choice"], r["undoes"]) for r in store.log()}
    store.close()
    return rows


def in_store(rows: dict[int, tuple], labels: list[tuple], undos: list[tuple]) -> list[str]:
    missing = [f"label {i} ({item}, {choice})" for i, item, choice in labels if rows.get(i) != (item, choice, None)]
    missing += [f"undo {i} of {undone}" for i, item, undone in undos if rows.get(i) != (item, "undo", undone)]
    return missing


def test_sigkill_at_random_moments_loses_no_confirmed_label(tmp_path):
    store = tmp_path / "labels.sqlite"
    rng = random.Random(1234)
    total, kills, mid_write, labelled, started = 0, 0, 0, 0, time.perf_counter()
    for run in range(KILLS):
        proc = start(tmp_path, store, "ann", run)
        go(proc)
        time.sleep(rng.uniform(0.020, 0.300))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err
        kills += 1
        lines = out.splitlines(keepends=True)
        mid_write += bool(lines) and not lines[-1].endswith("\n")
        labels, undos = confirmed(lines)
        labelled += bool(labels)
        rows = opens_cleanly(store)
        assert not in_store(rows, labels, undos), f"run {run} lost: {in_store(rows, labels, undos)[:5]}"
        total += len(labels) + len(undos)
    took = time.perf_counter() - started
    print(f"\n{kills} SIGKILLs, {total} confirmed labels and undos all found, {mid_write} kills cut a line, "
          f"{kills - labelled} came before the first label; {took:.1f} s")
    assert kills >= 50 and labelled >= kills // 2


def replayed(labels: list[tuple], undos: list[tuple]) -> dict[int, str]:
    """One labeller's decisions {item: choice}, replayed from what they confirmed: an undo takes back their latest
    label still standing (a stack), and must have taken back exactly that one."""
    stack, by_id = [], {i: (item, c) for i, item, c in labels}
    for event in sorted([(i, "label", None) for i, _, _ in labels] + [(i, "undo", u) for i, _, u in undos]):
        if event[1] == "label":
            stack.append(event[0])
        else:
            assert stack.pop() == event[2], f"undo {event[0]} took back another label than the latest"
    return {by_id[i][0]: by_id[i][1] for i in stack}


def interleaved(store: LabelStore) -> int:
    """How often the labeller changes from one row of the log to the next: the writers really overlapped."""
    order = [r["labeller"] for r in store.log() if r["origin"] == "human"]
    return sum(a != b for a, b in zip(order, order[1:]))


def test_two_labelling_processes_at_once_lose_nothing(tmp_path):
    store_path, steps = tmp_path / "shared.sqlite", 150
    LabelStore(store_path).close()  # created once, so the two do not race to create the tables
    # Both label the same prompts: the two candidate threads also race to create their items.
    procs = {who: start(tmp_path, store_path, who, seed, limit=steps, pause=0.002, prompts="shared")
             for seed, who in enumerate(["ann", "bob"])}
    for proc in procs.values():
        go(proc)
    results = {who: proc.communicate(timeout=120) for who, proc in procs.items()}
    rows = opens_cleanly(store_path)
    store = LabelStore(store_path)
    for who, (out, err) in results.items():
        assert procs[who].returncode == 0, err
        lines = out.splitlines(keepends=True)
        assert lines[-1] == "done\n"
        labels, undos = confirmed(lines)
        assert len(labels) + len(undos) == steps
        assert not in_store(rows, labels, undos), in_store(rows, labels, undos)[:5]
        assert store.decisions(labeller=who) == replayed(labels, undos)
    assert interleaved(store) > 3, "the two did not write at the same time"


def _label_at_random(path: Path, who: str, seed: int, label, undo, n: int = 120) -> tuple[list, list]:
    """n steps of labelling (label() -> (label id, item, choice)) and undoing (undo() -> item or None), at a
    person's pace; returns what was confirmed, as the labelling script prints it."""
    rng, labels, undos = random.Random(seed), [], []
    reader = sqlite3.connect(path)
    try:
        for _ in range(n):
            time.sleep(rng.uniform(0, 0.002))  # between clicks: lets the other labellers' writes in
            if labels and rng.random() < 0.2:
                item = undo()
                if item is not None:
                    row = reader.execute("SELECT id, undoes FROM labels WHERE labeller = ? AND choice = 'undo' "
                                         "ORDER BY id DESC LIMIT 1", (who,)).fetchone()
                    undos.append((row[0], item, row[1]))
                continue
            labels.append(label(rng.choice(["A", "B", "tie", "both_bad", "skip"]), rng))
    finally:
        reader.close()
    return labels, undos


def _in_threads(work: dict, path: Path) -> dict:
    """Run work[who]() in one thread per labeller, all started together; returns their results."""
    barrier, results, errors = threading.Barrier(len(work)), {}, []

    def run(who):
        barrier.wait()
        try:
            results[who] = work[who]()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append((who, exc))

    threads = [threading.Thread(target=run, args=(who,)) for who in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


def test_two_labelling_threads_at_once_lose_nothing_store(tmp_path):
    path = tmp_path / "threads.sqlite"
    shared = LabelStore(path)
    items = shared.add_items([{"kind": "pair", "prompt": f"q{i}", "a": f"a{i}", "b": f"b{i}"} for i in range(10)])
    # ann and bob share one LabelStore object (a connection per thread); cy has her own on the same file.
    stores = {"ann": shared, "bob": shared, "cy": LabelStore(path)}

    def labelling(who, seed):
        store = stores[who]

        def label(choice, rng):
            item = rng.choice(items)
            return store.label(item, choice, labeller=who), item, choice

        return lambda: _label_at_random(path, who, seed, label, lambda: store.undo(labeller=who))

    results = _in_threads({who: labelling(who, seed) for seed, who in enumerate(stores)}, path)
    nothing_lost(path, results, shared)


def nothing_lost(path, results: dict, store: LabelStore | None = None) -> None:
    """After labellers wrote at once: the store opens cleanly, holds every label each confirmed, each one's
    decisions are the replay of what they did, and their writes really interleaved."""
    rows = opens_cleanly(path)
    store = store or LabelStore(path)
    for who, (labels, undos) in results.items():
        assert labels and not in_store(rows, labels, undos), who
        assert store.decisions(labeller=who) == replayed(labels, undos), who
    assert interleaved(store) > 3, "the threads did not write at the same time"


def test_two_labelling_threads_at_once_lose_nothing_widget(tmp_path):
    from nbalign.labeling.widgets import PairLabeler

    path = tmp_path / "widgets.sqlite"
    prompts = [f"q{i}" for i in range(400)]
    labelers = {who: PairLabeler(prompts, model=[lambda p: "first " + p, lambda p: "second " + p], store=path,
                                 labeller=who, seed=seed) for seed, who in enumerate(["ann", "bob"])}

    def labelling(who, seed):
        labeler = labelers[who]

        def label(choice, rng):
            labeler.wait(1)
            item = labeler.item.id
            return labeler.choose(choice), item, choice

        return lambda: _label_at_random(path, who, seed, label, labeler.undo, n=80)

    try:
        results = _in_threads({who: labelling(who, seed) for seed, who in enumerate(labelers)}, path)
    finally:
        for labeler in labelers.values():
            labeler.close()
    nothing_lost(path, results)


def test_two_labellers_of_one_prompt_list_are_asked_about_the_same_items(tmp_path):
    """Two people labelling the same prompts into one store must get one item per prompt (so their votes meet
    in one majority), however their candidate threads race to create it."""
    from nbalign.labeling.widgets import PairLabeler

    path = tmp_path / "race.sqlite"
    LabelStore(path).close()
    prompts = [f"q{i}" for i in range(40)]
    labelers = [PairLabeler(prompts, model=[lambda p: "first " + p, lambda p: "second " + p], store=path,
                            labeller=who, ahead=100) for who in ("ann", "bob")]
    try:
        deadline = time.monotonic() + 20
        while not all(labeler.queue.finished for labeler in labelers) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for labeler in labelers:
            labeler.close()
    made = [item.prompt for item in LabelStore(path).items()]
    twice = sorted({p for p in made if made.count(p) > 1})
    assert not twice and sorted(made) == sorted(prompts), f"{len(made)} items for {len(prompts)} prompts: {twice}"
