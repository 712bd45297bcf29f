"""Ragged-length chat data for the benchmarks: short and long conversations mixed, where padding wastes most.

Built deterministically from nbalign's example sets (questions with JSON answers, terse and rambling answers):
about half the rows are one question and its answer, a quarter two to four turns, a fifth ten to thirteen turns
(300-600 tokens). A padded batch of eight then computes about 2.7 times the tokens it holds. `long` rows
are all of the long kind: the sequence length (about 500) where model-FLOPs utilisation is quoted; `short`
rows (one or two turns) serve the quick smoke check.

    chats(n, kind)   SFT rows {"messages": [...]}
    pairs(n, kind)   DPO / reward rows {"prompt": [...], "chosen": [...], "rejected": [...]}: the earlier turns
                     of a conversation, then a question with a terse (chosen) and a rambling (rejected) answer
    thumbs(n, kind)  KTO rows {"prompt": [...], "completion": [...], "label": bool}
"""

from __future__ import annotations

import random

KINDS = ("ragged", "long", "short")


def _turns() -> list[tuple[str, str]]:
    """(question, answer) pairs to build conversations from: JSON answers, terse and rambling answers."""
    from nbalign.examples import json_answers, style_pairs

    out = []
    for row in json_answers("train") + json_answers("heldout"):
        msgs = row["messages"]
        out.append((msgs[0]["content"], msgs[1]["content"]))
    for row in style_pairs("train"):
        out.append((row["prompt"], row["rejected"]))
        out.append((row["prompt"], row["chosen"]))
    return out


def _n_turns(rng: random.Random, kind: str) -> int:
    if kind == "long":
        return rng.randint(11, 13)
    if kind == "short":  # --quick: a smoke check of the harness, where lengths do not matter
        return rng.randint(1, 2)
    x = rng.random()
    return 1 if x < 0.55 else rng.randint(2, 4) if x < 0.8 else rng.randint(10, 13)


def _history(rng: random.Random, turns: list, n: int) -> list[dict]:
    msgs = []
    for question, answer in rng.sample(turns, n):
        msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return msgs


def chats(n: int = 48, kind: str = "ragged", seed: int = 0) -> list[dict]:
    rng, turns = random.Random(seed), _turns()
    return [{"messages": _history(rng, turns, _n_turns(rng, kind))} for _ in range(n)]


def pairs(n: int = 48, kind: str = "ragged", seed: int = 0) -> list[dict]:
    from nbalign.examples import style_pairs

    rng, turns, style = random.Random(seed), _turns(), style_pairs("train")
    rows = []
    for i in range(n):
        last = style[i % len(style)]
        history = _history(rng, turns, _n_turns(rng, kind) - 1)
        rows.append({"prompt": history + [{"role": "user", "content": last["prompt"]}],
                     "chosen": [{"role": "assistant", "content": last["chosen"]}],
                     "rejected": [{"role": "assistant", "content": last["rejected"]}]})
    return rows


def thumbs(n: int = 48, kind: str = "ragged", seed: int = 0) -> list[dict]:
    """Every pair's prompt once, with its terse answer (thumbs up) or its rambling one (thumbs down), alternating."""
    return [{"prompt": p["prompt"], "completion": p["chosen"] if i % 2 == 0 else p["rejected"], "label": i % 2 == 0}
            for i, p in enumerate(pairs(n, kind, seed))]


def data(method: str, n: int, kind: str) -> list[dict]:
    return chats(n, kind) if method == "sft" else thumbs(n, kind) if method == "kto" else pairs(n, kind)
