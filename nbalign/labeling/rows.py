"""How a label store's decisions become training rows: pairs for %%dpo and %%reward_model, thumbs for %%kto
(ties, 'both bad', skips and disagreements counted and said), export to a Dataset, JSONL, Parquet or CSV,
and import of an existing preference dataset. A mixin of LabelStore: it uses only the store's own methods."""

from __future__ import annotations

import datetime as _dt
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NbalignError
from ..preference_specs import BOTH_BAD, LABELS_FROM, TIES
from ..text import plain_prompt


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


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


class TrainingRows:
    """LabelStore's training-data half."""

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
        log = self.log()  # read once for the three origins
        human, judge, imported = self.votes("human", log), self.votes("judge", log), self.votes("import", log)
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
                      "last_label": self.last_label()}
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
                prompt, a, b = plain_prompt(prompt), _text(first), None if second is None else _text(second)
                cur = c.execute("INSERT INTO items (kind, prompt, a, b, source_a, source_b, swapped, created) "
                                "VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                                (kind, json.dumps(prompt), a, b, json.dumps(origin),
                                 json.dumps(origin) if b is not None else None, stamp))
                c.execute("INSERT INTO labels (item, choice, labeller, origin, time) VALUES (?, ?, ?, 'import', ?)",
                          (cur.lastrowid, choice, name, stamp))
        return len(rows)


def _pair_row(item, chosen: str, rejected: str, src_c: dict, src_r: dict, who: str) -> dict:
    return {"prompt": item.prompt, "chosen": chosen, "rejected": rejected, "item": item.id,
            "chosen_source": src_c, "rejected_source": src_r, "labelled_by": who}


def _thumb_row(item, completion: str, up: bool, source: dict, who: str) -> dict:
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


def _check_option(name: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise NbalignError(f"{name}={value!r} is not a way to use labels.", f"use one of {', '.join(allowed)}.")
