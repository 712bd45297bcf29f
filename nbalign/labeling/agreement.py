"""Whether an AI judge adds anything: its agreement with people on the pairs both labelled, beside the trivial
rules "prefer the longer answer" and "prefer the shorter answer" on the same pairs, with intervals and a sign
test, so a small sample is called small."""

from __future__ import annotations

import html
import math
from collections import Counter
from typing import Any

from .store import LabelStore

LONGER, SHORTER = "prefer the longer answer", "prefer the shorter answer"


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (95% by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: how likely a split this uneven is between two equally good raters."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _credit(pick: str, human: str) -> float:
    return 0.5 if pick == "tie" else float(pick == human)  # a rule that cannot choose scores chance


class Agreement:
    """Judge-vs-human agreement beside the longer/shorter rules. `table` (a DataFrame), `verdicts` (one line
    per judge), `excluded` (what was left out, and why); shown as HTML in a notebook."""

    def __init__(self, rows: list[dict], verdicts: list[str], excluded: dict):
        import pandas as pd

        self.rows, self.verdicts, self.excluded = rows, verdicts, excluded
        self.table = pd.DataFrame(rows, columns=["judge", "rule", "n", "agree", "rate", "low", "high", "ties"])

    def to_dict(self) -> dict:
        return {"rows": self.rows, "verdicts": self.verdicts, "excluded": self.excluded}

    def _notes(self) -> list[str]:
        left = ", ".join(f"{v} {k}" for k, v in self.excluded.items() if v)
        return [*self.verdicts, "Agreement counts a tie as half; low-high is a 95% Wilson interval; length is in "
                "characters." + (f" Left out: {left}." if left else "")]

    def __repr__(self) -> str:
        if not self.rows:
            return "Agreement: no pair has both a human A/B decision and a judge label yet.\n" + self._notes()[-1]
        return self.table.to_string(index=False, float_format=lambda v: f"{v:.2f}") + "\n" + "\n".join(self._notes())

    def _repr_html_(self) -> str:
        notes = "".join(f"<p>{html.escape(n)}</p>" for n in self._notes())
        table = self.table.to_html(index=False, float_format=lambda v: f"{v:.2f}", escape=True) if self.rows else (
            "<p>No pair has both a human A/B decision and a judge label yet.</p>")
        return f"<div><b>Judge vs human agreement</b>{table}{notes}</div>"


def agreement(store: Any) -> Agreement:
    """On pairs that a person (A or B; ties, "both bad" and skips left out) and a judge both labelled: how often
    each judge agrees with the person, beside "prefer the longer answer" and "prefer the shorter answer" on
    the same pairs, so you see whether the judge adds anything. Several human labellers: their majority."""
    store = store if isinstance(store, LabelStore) else LabelStore(store)
    excluded: Counter = Counter()
    human = {}
    imported = store.votes("import")
    for item_id, votes in {**imported, **store.votes("human")}.items():
        ranked = Counter(votes).most_common()
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            excluded["human disagreements"] += 1
        elif ranked[0][0] in ("A", "B"):
            human[item_id] = ranked[0][0]
        else:
            excluded[f"human {ranked[0][0]}"] += 1
    items = {it.id: it for it in store.items("pair")}
    names = sorted({r["labeller"] for r in store.log() if r["origin"] == "judge"})
    judges = {who: {i: c for i, c in store.decisions(labeller=who, origin="judge").items() if i in items}
              for who in names}
    excluded["human decisions no judge labelled"] = len(set(human) - {i for d in judges.values() for i in d})
    rows, verdicts = [], []
    for who, picks in sorted(judges.items()):
        shared = [i for i in picks if i in human and items[i].a.strip() != (items[i].b or "").strip()]
        if not shared:
            continue
        credits = {who: [_credit(picks[i], human[i]) for i in shared]}
        for rule, sign in ((LONGER, 1), (SHORTER, -1)):
            credits[rule] = [_credit(_longer(items[i], sign), human[i])
                             for i in shared]
        ties = {who: sum(picks[i] == "tie" for i in shared)}
        ties.update({r: sum(c == 0.5 for c in credits[r]) for r in (LONGER, SHORTER)})
        for rule, c in credits.items():
            low, high = wilson(sum(c), len(c))
            rows.append({"judge": who, "rule": "judge" if rule == who else rule, "n": len(c), "agree": sum(c),
                         "rate": sum(c) / len(c), "low": low, "high": high, "ties": ties[rule]})
        verdicts.append(_verdict_line(who, credits))
    return Agreement(rows, verdicts, dict(excluded))


def _verdict_line(who: str, credits: dict[str, list[float]]) -> str:
    judge = credits[who]
    n, rate = len(judge), sum(judge) / len(judge)
    best = max((LONGER, SHORTER), key=lambda r: sum(credits[r]))
    other = credits[best]
    wins = sum(j > o for j, o in zip(judge, other))
    losses = sum(j < o for j, o in zip(judge, other))
    p = sign_test(wins, losses)
    head = f"{who} agrees with people on {rate:.0%} of {n} pairs; '{best}' on {sum(other) / n:.0%}."
    if p < 0.05:
        return head + (f" The judge does better than that rule (sign test p = {p:.3f})." if wins > losses else
                       f" The judge does worse than that rule (sign test p = {p:.3f}).")
    return head + (f" With n = {n} that difference could be chance (sign test p = {p:.2f}): label more pairs "
                   "before trusting the judge to add anything.")


def _longer(item, sign: int) -> str:
    """The side with more characters ("tie" when equal); sign -1 picks the shorter."""
    d = sign * (len(item.a) - len(item.b or ""))
    return "tie" if d == 0 else "A" if d > 0 else "B"
