"""Reading an answer against a reference: is it in the reference's *form*, does it carry the reference's
*content*, is it a refusal, is it degenerate. Plain text functions (no model); the evaluation applies them to
greedy answers before and after training.

- Form is the answer's shape: one JSON object with the same keys; or text with the same leading label
  ("Answer:") and the same length class (one short line, a paragraph, longer).
- Content is what the reference says. A structured reference (a JSON object) is compared field by field on the
  fields that carry the answer: those whose values differ from row to row (the answer), not those a few values
  repeat across many rows (a category label). When the answer is structured too, each such field's key words
  must be in the answer's field of that name; when it is prose, they must be in the prose. A text reference's
  key words are its words minus stop words, minus words of the prompt, minus words most references share (form
  words such as "Answer"). A refusal reference's content is refusing.
- The knowledge probe's questions carry their accepted key words; an answer is right when it holds them,
  whatever its form.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_STOP = set(
    "a an the is are was were be been being am of to in on at by for with from as and or but not no so that this "
    "these those it its it's there their they them he she his her we our you your i me my what which who whom how "
    "why when where does do did done has have had will would can could should may might must shall than then "
    "also just very about into over under out up down more most some any each other such only own same too "
    "s t called known answer".split()
)
_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i > 1}
_WORD = re.compile(r"[a-z0-9]+(?:[.'][a-z0-9]+)*")
_LABEL = re.compile(r"^\s*([A-Za-z][A-Za-z ]{0,24}):")
_REFUSAL = re.compile(
    r"\b(i\s*(?:'m| am)\s*(?:not able|unable)|i\s*(?:can\s*'?\s*not|can't|cannot|won't|will not|must decline)"
    r"|(?:can't|cannot|won't) (?:help|assist|provide|share|give|explain|tell)|i'm sorry, but|sorry, (?:but )?i"
    r"|not (?:something|able) (?:i|to) (?:can )?(?:help|assist)|i (?:do not|don't) (?:help|assist|provide))",
    re.IGNORECASE,
)


def words(text: str) -> list[str]:
    """Lower-case word tokens, with number words as digits ("twenty-three" -> "23")."""
    tokens = _WORD.findall(str(text).lower().replace("’", "'").replace("-", " "))
    out: list[str] = []
    for tok in tokens:
        if tok in _NUMBERS and out and out[-1].isdigit() and int(out[-1]) in _TENS.values() and int(
                _NUMBERS[tok]) < 10:
            out[-1] = str(int(out[-1]) + int(_NUMBERS[tok]))
        elif tok in _TENS:
            out.append(str(_TENS[tok]))
        else:
            out.append(_NUMBERS.get(tok, tok.rstrip(".")))
    return out


def key_words(text: str) -> list[str]:
    return [w for w in dict.fromkeys(words(text)) if w not in _STOP]


def parsed(text: str) -> Any:
    """The JSON value `text` is exactly (after stripping), or None."""
    text = str(text).strip()
    if not text or text[0] not in "{[":
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def shape(text: str) -> tuple:
    """The form of an answer: ("json", its keys) or ("text", leading label, length class)."""
    value = parsed(text)
    if isinstance(value, dict):
        return ("json", tuple(sorted(value)))
    if value is not None:
        return ("json", type(value).__name__)
    text = str(text).strip()
    label = _LABEL.match(text)
    size = "short" if len(text) <= 80 and "\n" not in text else "paragraph" if len(text) <= 400 else "long"
    return ("text", label.group(1).strip().lower() if label else "", size)


def describe_shape(form: tuple) -> str:
    if form[0] == "json":
        return f"a JSON object with keys {', '.join(form[1])}" if isinstance(form[1], tuple) else f"JSON {form[1]}"
    return (f"'{form[1]}:' + " if form[1] else "") + {"short": "one short line", "paragraph": "a paragraph",
                                                       "long": "several paragraphs"}[form[2]]


def is_refusal(text: str) -> bool:
    """Declines to answer: "I can't help with that", "I'm sorry, but I won't ..." (in its first 200 characters)."""
    return bool(_REFUSAL.search(str(text)[:200]))


def is_degenerate(text: str) -> bool:
    """Empty, or mostly one phrase repeated ("the the the", "Sure! Sure! Sure!")."""
    tokens = str(text).split()
    if not tokens:
        return True
    if len(tokens) >= 8 and len(set(tokens)) / len(tokens) < 0.3:
        return True
    for n in (1, 2, 3, 4):
        grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        if grams and len(tokens) >= 6 * n:
            gram, count = grams.most_common(1)[0]
            if count >= 4 and count * n >= 0.5 * len(tokens):
                return True
    return bool(re.search(r"(.)\1{15,}", str(text)))


@dataclass
class Reference:
    """What a right answer to one prompt looks like."""

    text: str
    form: tuple
    keys: dict = field(default_factory=dict)  # field name (or "" for the whole text) -> key words
    refusal: bool = False

    def in_form(self, answer: str) -> bool:
        return shape(answer) == self.form

    def right(self, answer: str) -> bool:
        """The answer carries this reference's content (whatever its form, for prose references)."""
        if self.refusal:
            return is_refusal(answer)
        if not self.keys:
            return not is_degenerate(answer)
        value = parsed(answer)
        for name, keys in self.keys.items():
            where = value.get(name) if name and isinstance(value, dict) else answer
            if where is None:
                where = answer if not isinstance(value, dict) else ""
            have = set(words(json.dumps(where) if not isinstance(where, str) else where))
            needed = len(keys) if len(keys) <= 3 else -(-len(keys) * 6 // 10)
            if sum(k in have for k in keys) < needed:
                return False
        return True


def references(texts: list[str], prompts: list[str]) -> list[Reference]:
    """The Reference of each answer text, read against the others (what varies from row to row is content,
    what most rows share is form) and against its prompt (words the question already holds prove nothing)."""
    values = [parsed(t) for t in texts]
    dicts = [v for v in values if isinstance(v, dict)]
    answer_fields = _answer_fields(dicts)
    common = Counter(w for t in texts for w in set(key_words(t)))
    many = len(texts) >= 4
    out = []
    for text, value, prompt in zip(texts, values, prompts):
        asked = set(words(prompt))
        if is_refusal(text):
            out.append(Reference(text, shape(text), refusal=True))
            continue
        if isinstance(value, dict):
            keys = {}
            for name in [n for n in answer_fields if n in value] or list(value):
                own = key_words(value[name] if isinstance(value[name], str) else json.dumps(value[name]))
                keys[name] = [w for w in own if w not in asked] or own
            out.append(Reference(text, shape(text), {k: v for k, v in keys.items() if v}))
            continue
        own = key_words(text)
        kept = [w for w in own if w not in asked and not (many and common[w] > len(texts) / 2)]
        out.append(Reference(text, shape(text), {"": kept or [w for w in own if w not in asked] or own}))
    return out


def _answer_fields(rows: list[dict]) -> list[str]:
    """Fields of structured references whose values differ in more than half the rows: the answer, not a label."""
    if len(rows) < 4:
        return sorted({k for r in rows for k in r})
    names = Counter(k for r in rows for k in r)
    varied = []
    for name, n in names.items():
        distinct = {json.dumps(r[name], sort_keys=True) for r in rows if name in r}
        if len(distinct) > n / 2:
            varied.append(name)
    return varied or list(names)


# ----------------------------------------------------------------------------------------------------
# Scores over a set of answers


def scores(answers: list[str], refs: list[Reference]) -> dict:
    """Counts and shares: in the reference's form, carrying its content, refusals where the reference
    refuses and where it answers (over-refusal), degenerate answers."""
    n = len(answers)
    out: dict[str, Any] = {"n": n}
    if not n:
        return out
    form = [r.in_form(a) for a, r in zip(answers, refs)]
    right = [r.right(a) for a, r in zip(answers, refs)]
    out.update(form_n=sum(form), content_n=sum(right), form=sum(form) / n, content=sum(right) / n,
               right=[int(x) for x in right], in_form=[int(x) for x in form])
    out["degenerate"] = sum(map(is_degenerate, answers)) / n
    refuse = [a for a, r in zip(answers, refs) if r.refusal]
    answer = [a for a, r in zip(answers, refs) if not r.refusal]
    if refuse and answer:  # a refusal task: how many it refuses that it should, and how many it should not
        out["refused"] = sum(map(is_refusal, refuse)) / len(refuse)
        out["over_refused"] = sum(map(is_refusal, answer)) / len(answer)
        out["refuse_n"], out["answer_n"] = len(refuse), len(answer)
    return out


def probe_score(answers: list[str], probe: list[tuple[str, list[str]]]) -> dict:
    """Knowledge probe: an answer is right when it holds every accepted key word of one of its alternatives
    ("|" separates alternatives in a key), whatever its form."""
    right = []
    for answer, (_, keys) in zip(answers, probe):
        have = set(words(answer))
        right.append(int(all(any(set(words(alt)) <= have for alt in k.split("|")) for k in keys)))
    return {"probe": sum(right) / max(len(right), 1), "probe_n": sum(right), "probe_right": right}
