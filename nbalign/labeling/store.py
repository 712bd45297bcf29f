"""The durable label store: one SQLite file in WAL mode, one transaction per click, append-only.

Two tables hold everything. `items` are what a person is asked about: a pair of answers to one prompt (sides
already shuffled, with where each answer came from: model, adapter, sampling settings) or one answer to rate.
`labels` is the log of decisions: a click appends a row (who, when, human or judge); an undo appends a row
that names the one it takes back. Nothing is ever updated or deleted, so every decision keeps its provenance,
several labellers can share one file, and a kernel killed at any moment loses no confirmed label: a label is
confirmed when its transaction has committed (synchronous=FULL), and the widget shows nothing before that.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import sqlite3
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NbalignError

FORMAT = "nbalign-labels"
VERSION = 1
DEFAULT_STORE = Path("labels") / "labels.sqlite"
PAIR_CHOICES = ("A", "B", "tie", "both_bad", "skip")
THUMB_CHOICES = ("up", "down", "skip")
TIES = ("drop", "both_ways")
BOTH_BAD = ("drop", "down")
LABELS_FROM = ("human", "judge", "any")
_HEADER = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('pair', 'single')),
    prompt TEXT NOT NULL,          -- JSON: a string or a list of chat messages
    a TEXT NOT NULL,               -- the answer shown as A (or the one answer of a thumbs item)
    b TEXT,                        -- the answer shown as B
    source_a TEXT NOT NULL,        -- JSON: model, adapter, sampling settings that wrote A
    source_b TEXT,
    swapped INTEGER NOT NULL DEFAULT 0,  -- 1: A is the second candidate (sides are shuffled per item)
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY,
    item INTEGER NOT NULL REFERENCES items(id),
    choice TEXT NOT NULL,          -- A | B | tie | both_bad | skip | up | down | undo
    undoes INTEGER REFERENCES labels(id),
    labeller TEXT NOT NULL,
    origin TEXT NOT NULL DEFAULT 'human',   -- human | judge | import
    note TEXT,                     -- JSON: e.g. the judge's reason
    time TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_item ON labels(item);
"""


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def default_labeller() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "labeller"


@dataclass
class Item:
    """One thing to label: a pair (a, b as shown) or a single answer (a)."""

    id: int
    kind: str
    prompt: Any
    a: str
    b: str | None
    source_a: dict
    source_b: dict | None
    swapped: bool
    created: str

    @property
    def prompt_key(self) -> str:
        return json.dumps(self.prompt, sort_keys=True)


class LabelRows(list):
    """Training rows made from a label store, with what was kept and dropped (`summary`) and where they came
    from (`provenance`, recorded in the run's spec.json)."""

    def __init__(self, rows, summary: str, provenance: dict):
        super().__init__(rows)
        self.summary = summary
        self.provenance = provenance


@dataclass
class Tally:
    counts: Counter = field(default_factory=Counter)

    def add(self, what: str, n: int = 1) -> None:
        self.counts[what] += n


def is_label_store(path: Any) -> bool:
    """A path to an SQLite file with nbalign's label tables (or one named .sqlite/.db that does not exist yet:
    it would be created)."""
    if not isinstance(path, (str, Path)):
        return False
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            if f.read(16) != _HEADER:
                return False
    except OSError:
        return False
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()
        return bool(row and row[0] == FORMAT)
    except sqlite3.Error:
        return False


class LabelStore:
    """Labels in one SQLite file. `LabelStore(path)` opens it (creating it, and its folder, when new); a file
    that is not a label store, or is damaged, is refused with the fix."""

    def __init__(self, path: str | Path | None = None, labeller: str | None = None):
        self.path = Path(path if path is not None else DEFAULT_STORE).expanduser()
        self.labeller = labeller or default_labeller()
        self._local = threading.local()
        self._check_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._init()

    # -- the file -------------------------------------------------------------------------------------------
    def _check_file(self) -> None:
        if self.path.is_dir():
            raise NbalignError(f"The label store '{self.path}' is a folder.",
                               "give a file path, e.g. labels/support.sqlite.")
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                head = f.read(16)
            if head != _HEADER:
                raise NbalignError(
                    f"'{self.path}' is not a label store: it is not an SQLite file (it starts with {head[:8]!r}).",
                    "give the path of a store nbalign made (e.g. labels/support.sqlite), or a new file name to "
                    "start one; to bring labelled pairs from a JSONL/CSV/Parquet file use LabelStore(new).import_data(path).",
                )

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.execute("PRAGMA synchronous = FULL")  # a committed label survives the process, and power loss
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
        return conn

    def _init(self) -> None:
        try:
            conn = self._connect()
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "meta" not in tables:
                self._refuse_foreign(tables)
            fmt = conn.execute("SELECT value FROM meta WHERE key='format'").fetchone() if tables else None
            if tables and (fmt is None or fmt[0] != FORMAT):
                self._refuse_foreign(tables)
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            if not tables:
                with self._write() as c:
                    # statement by statement: executescript() would commit in the middle of the transaction
                    for statement in filter(str.strip, _SCHEMA.split(";")):
                        c.execute(statement)
                    c.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?), ('version', ?), ('created', ?)",
                              (FORMAT, str(VERSION), now()))
            version = int(conn.execute("SELECT value FROM meta WHERE key='version'").fetchone()[0])
            if version > VERSION:
                raise NbalignError(
                    f"The label store '{self.path}' was written by a newer nbalign (store format {version}).",
                    "upgrade nbalign (pip install -U nbalign) to read it.",
                )
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
        except sqlite3.DatabaseError as exc:
            self.close()
            raise NbalignError(
                f"The label store '{self.path}' is damaged and cannot be read ({exc}).",
                "move it aside and open a new store; the sqlite3 shell's `.recover` command can save the rows "
                "that are still readable.",
            ) from None

    def _refuse_foreign(self, tables: set[str]) -> None:
        self.close()
        raise NbalignError(
            f"'{self.path}' is an SQLite database of another program (tables: {', '.join(sorted(tables))}), "
            "not an nbalign label store.",
            "give a new file name for the labels, so that this database is left as it is.",
        )

    def _write(self):
        return _Transaction(self._connect())

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def __repr__(self) -> str:
        c = self.counts()
        return (f"LabelStore('{self.path}'): {c['items']} items, {c['labelled']} labelled "
                f"({', '.join(f'{k} {v}' for k, v in c['choices'].items()) or 'none yet'})")

    # -- items ----------------------------------------------------------------------------------------------
    def add_items(self, items: list[dict]) -> list[int]:
        """Store candidates (dicts with kind, prompt, a, b, source_a, source_b, swapped) in one transaction."""
        ids = []
        with self._write() as c:
            for it in items:
                cur = c.execute(
                    "INSERT INTO items (kind, prompt, a, b, source_a, source_b, swapped, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (it.get("kind", "pair"), json.dumps(it["prompt"]), it["a"], it.get("b"),
                     json.dumps(it.get("source_a") or {}), json.dumps(it.get("source_b") or {}) if it.get("b") is not None
                     else None, int(bool(it.get("swapped"))), now()))
                ids.append(cur.lastrowid)
        return ids

    def items(self, kind: str | None = None) -> list[Item]:
        sql = "SELECT id, kind, prompt, a, b, source_a, source_b, swapped, created FROM items"
        rows = self._connect().execute(sql + (" WHERE kind = ?" if kind else "") + " ORDER BY id",
                                       (kind,) if kind else ()).fetchall()
        return [_item(r) for r in rows]

    def item(self, item_id: int) -> Item:
        row = self._connect().execute("SELECT id, kind, prompt, a, b, source_a, source_b, swapped, created "
                                      "FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise NbalignError(f"The label store '{self.path}' has no item {item_id}.", "pick one of store.items().")
        return _item(row)

    # -- labels ---------------------------------------------------------------------------------------------
    def label(self, item_id: int, choice: str, labeller: str | None = None, origin: str = "human",
              note: dict | None = None) -> int:
        """Record one decision in its own transaction; returns the label's id once it is on disk."""
        kind = self.item(item_id).kind
        allowed = PAIR_CHOICES if kind == "pair" else THUMB_CHOICES
        if choice not in allowed:
            raise NbalignError(f"'{choice}' is not a label for a {kind} item.", f"use one of {', '.join(allowed)}.")
        with self._write() as c:
            cur = c.execute("INSERT INTO labels (item, choice, labeller, origin, note, time) VALUES (?, ?, ?, ?, ?, ?)",
                            (item_id, choice, labeller or self.labeller, origin,
                             json.dumps(note) if note else None, now()))
            return cur.lastrowid

    def undo(self, labeller: str | None = None) -> int | None:
        """Take back this labeller's last decision (appending an `undo` row); returns its item, or None."""
        who = labeller or self.labeller
        with self._write() as c:
            row = c.execute(
                "SELECT id, item FROM labels WHERE labeller = ? AND origin = 'human' AND choice != 'undo' AND id NOT IN "
                "(SELECT undoes FROM labels WHERE undoes IS NOT NULL) ORDER BY id DESC LIMIT 1", (who,)).fetchone()
            if row is None:
                return None
            c.execute("INSERT INTO labels (item, choice, undoes, labeller, origin, time) VALUES (?, 'undo', ?, ?, 'human', ?)",
                      (row[1], row[0], who, now()))
            return row[1]

    def log(self) -> list[dict]:
        """Every label row, oldest first (undos included): the audit trail."""
        cur = self._connect().execute("SELECT id, item, choice, undoes, labeller, origin, note, time FROM labels ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def decisions(self, labeller: str | None = None, origin: str | None = "human") -> dict[int, str]:
        """{item: choice} as things stand: each (item, labeller)'s last decision that was not undone. With a
        labeller, that person's; otherwise everyone's of `origin`, as {item: [choices]} via `votes()`."""
        out = {}
        for (item, who), choice in self._current(origin).items():
            if labeller is None or who == labeller:
                out[item] = choice
        return out

    def votes(self, origin: str | None = "human") -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for (item, _), choice in self._current(origin).items():
            out.setdefault(item, []).append(choice)
        return out

    def _current(self, origin: str | None) -> dict[tuple[int, str], str]:
        rows = self.log()
        undone = {r["undoes"] for r in rows if r["undoes"] is not None}
        current = {}
        for r in rows:
            if r["choice"] == "undo" or r["id"] in undone or (origin and r["origin"] != origin):
                continue
            current[(r["item"], r["labeller"])] = r["choice"]
        return current

    def counts(self) -> dict:
        conn = self._connect()
        n_items = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        choices = Counter(self.decisions(origin=None).values()) if n_items else Counter()
        human = self._current("human")
        given = {item for item, _ in human} | {item for item, _ in self._current("import")}
        return {"items": n_items, "labelled": len(given), "judged": len({i for i, _ in self._current("judge")}),
                "choices": dict(choices), "labellers": sorted({who for _, who in human})}

    # -- training data --------------------------------------------------------------------------------------
    def pairs(self, ties: str = "drop", labels_from: str = "human") -> LabelRows:
        """Rows {"prompt", "chosen", "rejected"} (plus provenance columns) for %%dpo and %%reward_model. A tie
        is dropped, or with ties="both_ways" given in both orders (a half win each way, which pulls the
        margin between them to zero); "both bad" and skips never form a pair."""
        _check_option("ties", ties, TIES)
        rows, tally = [], Tally()
        for item, choice, who in self._resolved(labels_from, tally, kind="pair"):
            if choice in ("A", "B", "tie") and item.a.strip() == (item.b or "").strip():
                tally.add("identical answers dropped")  # a pair of two equal answers teaches nothing
            elif choice in ("A", "B"):
                win, lose = (item.a, item.b) if choice == "A" else (item.b, item.a)
                src_w, src_l = (item.source_a, item.source_b) if choice == "A" else (item.source_b, item.source_a)
                rows.append(_pair_row(item, win, lose, src_w, src_l, who))
                tally.add("pairs")
            elif choice == "tie" and ties == "both_ways":
                rows.append(_pair_row(item, item.a, item.b, item.source_a, item.source_b, who))
                rows.append(_pair_row(item, item.b, item.a, item.source_b, item.source_a, who))
                tally.add("ties used both ways")
            else:
                tally.add({"tie": "ties dropped", "both_bad": "'both bad' dropped", "skip": "skipped"}[choice])
        return self._rows(rows, tally, "pairs", {"ties": ties, "labels_from": labels_from})

    def unpaired(self, both_bad: str = "down", labels_from: str = "human") -> LabelRows:
        """Rows {"prompt", "completion", "label"} for %%kto: thumbs as given; a pair's winner up and loser down;
        "both bad" as two thumbs down (or dropped with both_bad="drop"); ties and skips dropped."""
        _check_option("both_bad", both_bad, BOTH_BAD)
        rows, tally = [], Tally()
        for item, choice, who in self._resolved(labels_from, tally):
            if item.kind == "single":
                if choice == "skip":
                    tally.add("skipped")
                    continue
                rows.append(_thumb_row(item, item.a, choice == "up", item.source_a, who))
                tally.add("thumbs up" if choice == "up" else "thumbs down")
            elif choice in ("A", "B"):
                win, lose = (item.a, item.b) if choice == "A" else (item.b, item.a)
                src_w, src_l = (item.source_a, item.source_b) if choice == "A" else (item.source_b, item.source_a)
                rows += [_thumb_row(item, win, True, src_w, who), _thumb_row(item, lose, False, src_l, who)]
                tally.add("pairs split into up + down")
            elif choice == "both_bad" and both_bad == "down":
                rows += [_thumb_row(item, item.a, False, item.source_a, who),
                         _thumb_row(item, item.b, False, item.source_b, who)]
                tally.add("'both bad' as two thumbs down")
            else:
                tally.add({"tie": "ties dropped", "both_bad": "'both bad' dropped", "skip": "skipped"}[choice])
        return self._rows(rows, tally, "thumbs", {"both_bad": both_bad, "labels_from": labels_from})

    def _resolved(self, labels_from: str, tally: Tally, kind: str | None = None):
        """(item, choice, labellers) per decided item: the majority of its labellers' current decisions; an
        even split between different answers is a disagreement, and left out."""
        _check_option("labels_from", labels_from, LABELS_FROM)
        human, judge = self.votes("human"), self.votes("judge")
        imported = self.votes("import")
        for item in self.items(kind):
            if labels_from == "judge":
                votes, who = judge.get(item.id), "judge"
            elif labels_from == "any" and not human.get(item.id) and not imported.get(item.id):
                votes, who = judge.get(item.id), "judge"
            else:
                votes, who = human.get(item.id) or imported.get(item.id), "human" if item.id in human else "import"
            if not votes:
                continue
            ranked = Counter(votes).most_common()
            if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
                tally.add("disagreements dropped")
                continue
            yield item, ranked[0][0], f"{who} x{len(votes)}" if len(votes) > 1 else who

    def _rows(self, rows: list[dict], tally: Tally, what: str, policy: dict) -> LabelRows:
        counts = dict(tally.counts)
        kept = ", ".join(f"{v} {k}" for k, v in counts.items())
        summary = f"labels from '{self.path}': {len(rows)} {what} rows ({kept or 'nothing labelled yet'})"
        provenance = {"label_store": str(self.path), "rows": len(rows), "counts": counts, **policy,
                      "last_label": (self.log() or [{}])[-1].get("id")}
        return LabelRows(rows, summary, provenance)

    def to_dataset(self, kind: str = "pairs", **options):
        """The labels as a Hugging Face Dataset: pairs (prompt, chosen, rejected) or thumbs (prompt, completion,
        label), with provenance columns."""
        from datasets import Dataset

        rows = self.pairs(**options) if kind == "pairs" else self.unpaired(**options)
        return Dataset.from_list([_flat(r) for r in rows])

    def export(self, path: str | Path, kind: str = "pairs", **options) -> Path:
        """Write the labels to .jsonl, .parquet or .csv (by the suffix), with provenance columns."""
        path = Path(path)
        rows = self.pairs(**options) if kind == "pairs" else self.unpaired(**options)
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        elif suffix in (".parquet", ".csv"):
            import pandas as pd

            frame = pd.DataFrame([_flat(r) for r in rows])
            frame.to_parquet(path) if suffix == ".parquet" else frame.to_csv(path, index=False)
        else:
            raise NbalignError(f"Cannot export labels to '{path}': unknown file type '{suffix}'.",
                               "use a .jsonl, .parquet or .csv path.")
        return path

    def import_data(self, data: Any, source: str | None = None) -> int:
        """Bring an existing preference dataset (pairs, or thumbs for KTO) into the store, as items already
        labelled with origin "import"; returns how many items were added. One transaction: all or nothing."""
        from ..data import load_records
        from ..preference_data import to_pairs, to_unpaired

        records = load_records(data, "data to import")
        columns = {k for r in records for k in r}
        name = source or (str(data) if isinstance(data, (str, Path)) else type(data).__name__)
        origin = {"imported_from": name}
        with self._write() as c:
            if {"chosen", "rejected"} <= columns:
                rows = [(r["prompt"], r["chosen"], r["rejected"], "A") for r in to_pairs(records, "data to import")]
                kind = "pair"
            else:
                rows = [(r["prompt"], r["completion"], None, "up" if r["label"] else "down")
                        for r in to_unpaired(records, "data to import")]
                kind = "single"
            stamp = now()
            for prompt, first, second, choice in rows:
                prompt, a, b = _plain_prompt(prompt), _text(first), None if second is None else _text(second)
                cur = c.execute("INSERT INTO items (kind, prompt, a, b, source_a, source_b, swapped, created) "
                                "VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                                (kind, json.dumps(prompt), a, b, json.dumps(origin),
                                 json.dumps(origin) if b is not None else None, stamp))
                c.execute("INSERT INTO labels (item, choice, labeller, origin, time) VALUES (?, ?, ?, 'import', ?)",
                          (cur.lastrowid, choice, name, stamp))
        return len(rows)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT: the write lock is taken up front, so two labellers wait for each other
    (busy_timeout) instead of failing half-way; an exception rolls everything back."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        return False


def _item(row) -> Item:
    return Item(row[0], row[1], json.loads(row[2]), row[3], row[4], json.loads(row[5]),
                json.loads(row[6]) if row[6] else None, bool(row[7]), row[8])


def _pair_row(item: Item, chosen: str, rejected: str, src_c: dict, src_r: dict, who: str) -> dict:
    return {"prompt": item.prompt, "chosen": chosen, "rejected": rejected, "item": item.id,
            "chosen_source": src_c, "rejected_source": src_r, "labelled_by": who}


def _thumb_row(item: Item, completion: str, up: bool, source: dict, who: str) -> dict:
    return {"prompt": item.prompt, "completion": completion, "label": up, "item": item.id,
            "source": source, "labelled_by": who}


def _flat(row: dict) -> dict:
    """Nested provenance as JSON text, so Arrow and CSV take every row alike."""
    return {k: json.dumps(v) if isinstance(v, dict) or (k == "prompt" and not isinstance(v, str)) else v
            for k, v in row.items()}


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(m.get("content", "") for m in value if isinstance(m, dict))
    return str(value)


def _plain_prompt(prompt: Any) -> Any:
    """A one-turn user prompt as its text; longer conversations as they are."""
    if isinstance(prompt, list) and len(prompt) == 1 and prompt[0].get("role") == "user":
        return prompt[0]["content"]
    return prompt


def _check_option(name: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise NbalignError(f"{name}={value!r} is not a way to use labels.", f"use one of {', '.join(allowed)}.")
