"""The constitution: written principles (a list of plain sentences) that steer an AI judge, and the
constitutional revise step (Bai et al. 2022): the model answers, critiques its answer against a principle,
and rewrites it; each (original, revision) becomes a pair in the label store, labelled by the constitution
for a person to confirm or overturn."""

from __future__ import annotations

import html
import random
import re
from collections import Counter
from typing import Any

from ..errors import NbalignError
from .store import LabelStore, label_source

DEFAULT_CONSTITUTION = (
    "The answer is helpful: it does what the user asked.",
    "The answer is honest: it states only what is true, and says so when it is unsure.",
    "The answer is harmless: it gives no help with anything dangerous, illegal or hateful.",
    "The answer is concise: no padding and no repetition.",
)


def principles_of(principles: Any) -> tuple[str, ...]:
    """The principles as a tuple of sentences: None gives DEFAULT_CONSTITUTION; a string, one per line."""
    if principles is None:
        return DEFAULT_CONSTITUTION
    if isinstance(principles, str):
        principles = principles.splitlines()
    out = tuple(str(p).strip() for p in principles if str(p).strip())
    if not out:
        raise NbalignError("The principles are empty.", "give a list of sentences, e.g. ['The answer is correct.'].")
    return out


def open_store(store: Any) -> LabelStore:
    """A LabelStore from a store, a labeller (its `.store`) or a path."""
    return label_source(store) or LabelStore(store)


CRITIQUE = "Critique your answer above against this principle: {principle} Say briefly where it falls short."
REWRITE = ("Rewrite your answer so that it follows the principle: {principle} Reply with the rewritten answer "
           "only.")
_LEAD_IN = re.compile(r"^\s*(here is |here's )?(the |my )?(revised|rewritten|improved|new)\s+(answer|response|version)"
                      r"\s*[:\-]\s*", re.IGNORECASE)


class Revisions(list):
    """Rows {"prompt", "original", "critique", "revision", "principle", "item"}; `dropped` counts revisions
    left out, by why (empty, identical to the original, or an echo of the critique or the principle)."""

    def __init__(self, rows, dropped: dict):
        super().__init__(rows)
        self.dropped = dropped

    def __repr__(self) -> str:
        return f"Revisions({len(self)} pairs, dropped: {self.dropped})"

    def _repr_html_(self) -> str:
        e = html.escape
        body = "".join(f"<tr><td>{e(str(r['prompt']))}</td><td>{e(r['original'])}</td><td>{e(r['critique'])}</td>"
                       f"<td>{e(r['revision'])}</td></tr>" for r in self)
        return (f"<table><tr><th>prompt</th><th>original</th><th>critique</th><th>revision</th></tr>{body}"
                f"</table><p>{e(repr(self))}</p>")


def revise(prompts: list, model: Any = None, principles: Any = None, store: Any = None, max_new_tokens: int = 128,
           answers: list[str] | None = None, seed: int = 0, batch_size: int = 8, **generate_kwargs) -> Revisions:
    """Constitutional revision: the model answers each prompt (or takes `answers`), critiques its answer
    against a principle (one drawn per prompt), then rewrites it. Each (original, revision) where the revision
    is a new answer (not empty, not the original again, not an echo of the critique or principle) becomes a pair item in `store` (sides shuffled), with a judge-origin label preferring the revision
    (labeller "constitution"), for a person to confirm or overturn; store.pairs(labels_from="any") trains
    on them. Greedy unless generate_kwargs say otherwise (do_sample=True, temperature=...). The built-in 135M
    model mostly echoes the principle or its critique instead of rewriting (those are dropped, and counted
    in `dropped`); a stronger instruct model gives real revisions."""
    from ..generation import CACHE, cache_key, generate_with, load_for_inference
    from ..specs import BUILTIN_MODEL
    from ..text import to_messages

    rules, rng = principles_of(principles), random.Random(seed)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if answers is not None and len(answers) != len(prompts):
        raise NbalignError(f"revise() got {len(prompts)} prompts and {len(answers)} answers.", "give one per prompt.")
    if isinstance(model, tuple):
        (loaded, tokenizer), name = model, getattr(model[0], "name_or_path", "model")
    else:
        name = str(BUILTIN_MODEL if model is None else model)
        loaded, tokenizer = CACHE.get(cache_key(name), lambda: load_for_inference(name))

    def ask(conversations):
        return generate_with(loaded, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             **generate_kwargs)

    chosen = [rng.choice(rules) for _ in prompts]
    originals = list(answers) if answers is not None else ask(prompts)
    talks = [to_messages(p) + [{"role": "assistant", "content": o},
                               {"role": "user", "content": CRITIQUE.format(principle=r)}]
             for p, o, r in zip(prompts, originals, chosen)]
    critiques = ask(talks)
    talks = [t + [{"role": "assistant", "content": c}, {"role": "user", "content": REWRITE.format(principle=r)}]
             for t, c, r in zip(talks, critiques, chosen)]
    revisions = [_LEAD_IN.sub("", r).strip() for r in ask(talks)]
    rows, dropped = [], Counter()
    for prompt, original, critique, revision, rule in zip(prompts, originals, critiques, revisions, chosen):
        why = _not_a_revision(original, critique, revision, rule)
        if why:
            dropped[why] += 1
        else:
            rows.append({"prompt": prompt, "original": original, "critique": critique, "revision": revision,
                         "principle": rule, "item": None})
    if store is not None and rows:
        _store_revisions(open_store(store), rows, name, max_new_tokens, generate_kwargs, rng, answers is not None)
    return Revisions(rows, dict(dropped))


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _not_a_revision(original: str, critique: str, revision: str, principle: str) -> str | None:
    """Why a revision teaches nothing, or None. Small models often echo the instruction or the critique back
    instead of rewriting (the built-in model did so on most prompts tried)."""
    said = _words(revision)
    if not said:
        return "empty"
    if said == _words(original):
        return "identical to the original"
    if said == _words(critique):
        return "repeats the critique"
    asked = _words(REWRITE.format(principle=principle) + " " + CRITIQUE.format(principle=principle))
    if _words(principle) in said or said in asked:
        return "repeats the principle"
    return None


def _store_revisions(store: LabelStore, rows: list[dict], model: str, max_new_tokens: int, settings: dict, rng,
                     given: bool):
    common = {"model": model, "method": "constitutional revision", "max_new_tokens": max_new_tokens,
              **{k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool))}}
    items, sides = [], []
    for r in rows:
        original = {**common, "role": "original", "answered_by": "given" if given else model}
        revised = {**common, "role": "revision", "principle": r["principle"], "critique": r["critique"]}
        revision_on_a = rng.random() < 0.5  # candidates are (original, revision); "swapped": A is the revision
        a, b = (r["revision"], r["original"]) if revision_on_a else (r["original"], r["revision"])
        src_a, src_b = (revised, original) if revision_on_a else (original, revised)
        items.append({"kind": "pair", "prompt": r["prompt"], "a": a, "b": b, "source_a": src_a, "source_b": src_b,
                      "swapped": revision_on_a})
        sides.append("A" if revision_on_a else "B")
    for r, item_id, side in zip(rows, store.add_items(items), sides):
        r["item"] = item_id
        store.label(item_id, side, labeller="constitution", origin="judge",
                    note={"reason": f"revised against: {r['principle']}", "score": 1.0 if side == "A" else -1.0,
                          "principles": [r["principle"]], "critique": r["critique"]})
