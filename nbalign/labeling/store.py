"""The durable label store: one SQLite file in WAL mode, one transaction per click, append-only.

Two tables hold everything. `items` are what a person is asked about: a pair of answers to one prompt (sides
already shuffled, with where each answer came from: model, adapter, sampling settings) or one answer to rate.
`labels` is the log of decisions: a click appends a row (who, when, human or judge); an undo appends a row
that names the one it takes back. Nothing is ever updated or deleted, so every decision keeps its provenance,
several labellers can share one file, and a kernel killed at any moment loses no confirmed label: a label is
confirmed when its transaction has committed (synchronous=FULL), and the widget shows nothing before that.
"""

from __future__ import annotations

import getpass
import json
import sqlite3
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import NbalignError
from .rows import TrainingRows, now

FORMAT = "nbalign-labels"
VERSION = 1
DEFAULT_STORE = Path("labels") / "labels.sqlite"
PAIR_CHOICES = ("A", "B", "tie", "both_bad", "skip")
THUMB_CHOICES = ("up", "down", "skip")
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
"""
# Kept apart from the tables: an older store gets them when it is opened again.
_INDEXES = """
CREATE INDEX IF NOT EXISTS labels_item ON labels(item);
CREATE INDEX IF NOT EXISTS labels_undoes ON labels(undoes);
CREATE INDEX IF NOT EXISTS items_prompt ON items(kind, prompt)
"""
_ITEM_COLUMNS = "i.id, i.kind, i.prompt, i.a, i.b, i.source_a, i.source_b, i.swapped, i.created"
# A label row that stands: not an undo, and not taken back by one.
_STANDS = "l.choice != 'undo' AND NOT EXISTS (SELECT 1 FROM labels u WHERE u.undoes = l.id)"


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


def label_source(data: Any) -> "LabelStore | None":
    """The store behind `data` when it is one: a LabelStore, a labeller (its `.store`), or a store's path."""
    if isinstance(data, LabelStore):
        return data
    if isinstance(getattr(data, "store", None), LabelStore):
        return data.store
    if isinstance(data, (str, Path)) and is_label_store(data):
        return LabelStore(data)
    return None


class LabelStore(TrainingRows):
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
                    for statement in filter(str.strip, (_SCHEMA + ";" + _INDEXES).split(";")):
                        c.execute(statement)
                    c.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?), ('version', ?), ('created', ?)",
                              (FORMAT, str(VERSION), now()))
            else:
                indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
                if not {"labels_item", "labels_undoes", "items_prompt"} <= indexes:
                    with self._write() as c:
                        for statement in filter(str.strip, _INDEXES.split(";")):
                            c.execute(statement)
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
    def add_items(self, items: list[dict], skip_existing: bool = False) -> list[int | None]:
        """Store candidates (dicts with kind, prompt, a, b, source_a, source_b, swapped) in one transaction.
        With skip_existing, a prompt that already has an item of that kind is not added again (its id is None):
        checked inside the same transaction, so two labellers writing candidates for one prompt list at once
        still make one item per prompt."""
        ids: list[int | None] = []
        with self._write() as c:
            for it in items:
                if skip_existing and c.execute("SELECT 1 FROM items WHERE kind = ? AND prompt = ?",
                                               (it.get("kind", "pair"), json.dumps(it["prompt"]))).fetchone():
                    ids.append(None)
                    continue
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

    def undecided(self, kind: str, labeller: str | None = None, start: int = 0) -> list[Item]:
        """Items of `kind` from id `start` on that this labeller has no standing decision on, oldest first: one
        indexed query over the ids from `start` (`+i.kind` keeps SQLite on the id range rather than the
        (kind, prompt) index), so a click costs the same with 10 labels in the store or 10,000."""
        rows = self._connect().execute(
            f"SELECT {_ITEM_COLUMNS} FROM items i WHERE +i.kind = ? AND i.id >= ? AND NOT EXISTS (SELECT 1 FROM "
            f"labels l WHERE l.item = i.id AND l.labeller = ? AND l.origin = 'human' AND {_STANDS}) ORDER BY i.id",
            (kind, start, labeller or self.labeller)).fetchall()
        return [_item(r) for r in rows]

    def judge_label(self, item_id: int) -> tuple[str | None, dict]:
        """The standing judge pre-label of one item and its note, or (None, {}): one indexed query."""
        row = self._connect().execute(
            f"SELECT l.choice, l.note FROM labels l WHERE l.item = ? AND l.origin = 'judge' AND {_STANDS} "
            "ORDER BY l.id DESC LIMIT 1", (item_id,)).fetchone()
        return (None, {}) if row is None else (row[0], json.loads(row[1] or "{}") or {})

    def decided_prompts(self, kind: str, labeller: str | None = None) -> list[str]:
        """The stored prompts (JSON text) of `kind` this labeller has decided."""
        return [r[0] for r in self._connect().execute(
            f"SELECT i.prompt FROM items i WHERE i.kind = ? AND EXISTS (SELECT 1 FROM labels l WHERE l.item = i.id "
            f"AND l.labeller = ? AND l.origin = 'human' AND {_STANDS})", (kind, labeller or self.labeller))]

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

    def undo(self, labeller: str | None = None, kind: str | None = None) -> int | None:
        """Take back this labeller's last decision (on an item of `kind`, if given: a pair labeller's undo never
        takes back a thumbs label), appending an `undo` row; returns its item, or None."""
        who = labeller or self.labeller
        with self._write() as c:
            row = c.execute(
                f"SELECT l.id, l.item FROM labels l JOIN items i ON i.id = l.item WHERE l.labeller = ? AND "
                f"l.origin = 'human' AND {_STANDS}" + (" AND i.kind = ?" if kind else "") +
                " ORDER BY l.id DESC LIMIT 1", (who, kind) if kind else (who,)).fetchone()
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

    def votes(self, origin: str | None = "human", log: list[dict] | None = None) -> dict[int, list[str]]:
        """{item: [each labeller's standing choice]} of `origin`; `log` (from log()) saves reading it again."""
        out: dict[int, list[str]] = {}
        for (item, _), choice in self._current(origin, log).items():
            out.setdefault(item, []).append(choice)
        return out

    def last_label(self) -> int | None:
        """The id of the newest label row (None when there is none): it changes whenever anything is labelled."""
        return self._connect().execute("SELECT MAX(id) FROM labels").fetchone()[0]

    def _current(self, origin: str | None, log: list[dict] | None = None) -> dict[tuple[int, str], str]:
        rows = self.log() if log is None else log
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
        log = self.log()
        human, imported = self._current("human", log), self._current("import", log)
        choices = Counter([*human.values(), *imported.values()])
        given = {item for item, _ in human} | {item for item, _ in imported}
        return {"items": n_items, "labelled": len(given), "judged": len({i for i, _ in self._current("judge", log)}),
                "choices": dict(choices), "labellers": sorted({who for _, who in human})}


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
