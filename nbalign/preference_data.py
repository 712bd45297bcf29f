"""Preference data in TRL's standard formats: pairs (DPO family, reward models), unpaired thumbs (KTO),
and prompts alone (online RL); checked row by row, with errors that name the rows and the fix."""

from __future__ import annotations

from typing import Any

from .data import SYNONYMS, load_records, rows_hint
from .errors import NbalignError
from .text import as_messages, joined, prompt_text


PAIR_FORMAT = "`prompt` + `chosen` + `rejected` (or `chosen`/`rejected` conversations that share their prompt)"
UNPAIRED_FORMAT = "`prompt` + `completion` + `label` (true for thumbs up, false for thumbs down)"
PAIR_SYNONYMS = {
    "question": "prompt", "instruction": "prompt", "query": "prompt",
    "preferred": "chosen", "good": "chosen", "winner": "chosen", "accepted": "chosen", "response_chosen": "chosen",
    "dispreferred": "rejected", "bad": "rejected", "loser": "rejected", "response_rejected": "rejected",
    "response": "completion", "answer": "completion", "output": "completion",
    "thumbs": "label", "thumbs_up": "label", "desirable": "label", "rating": "label", "score": "label",
}
_UP = {"true", "1", "yes", "up", "good", "desirable", "+", "+1", "👍", "thumbs up", "positive"}
_DOWN = {"false", "0", "no", "down", "bad", "undesirable", "-", "-1", "👎", "thumbs down", "negative"}


def _pair_hint(columns: list[str], wanted: str) -> str:
    mapping = {c: PAIR_SYNONYMS[c.lower()] for c in columns if c.lower() in PAIR_SYNONYMS}
    if mapping:
        return f"rename the columns, e.g. df.rename(columns={mapping!r}), or give {wanted}."
    return f"give {wanted}."


def _split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """TRL's implicit-prompt pairs: two conversations whose common leading turns are the prompt."""
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    return chosen[:k], chosen[k:], rejected[k:]


def to_pairs(records: list[dict], what: str = "data") -> list[dict]:
    """Normalise preference pairs to conversational {"prompt": [...], "chosen": [...], "rejected": [...]}.
    Empty or identical chosen/rejected answers are errors that name the rows."""
    columns = sorted({k for r in records for k in r})
    if not ({"chosen", "rejected"} <= set(columns)):
        unpaired = {"completion", "label"} <= set(columns)
        raise NbalignError(
            f"The {what} has columns {columns}, but this method learns from pairs: {PAIR_FORMAT}."
            + (" These look like unpaired thumbs, which %%kto learns from." if unpaired else ""),
            "use %%kto for thumbs data." if unpaired else _pair_hint(columns, PAIR_FORMAT),
        )
    out, empty, same = [], [], []
    for i, row in enumerate(records):
        chosen = as_messages(row.get("chosen"), "assistant", i, what)
        rejected = as_messages(row.get("rejected"), "assistant", i, what)
        if "prompt" in row and row["prompt"] is not None:
            prompt = as_messages(row["prompt"], "user", i, what)
        elif isinstance(row.get("chosen"), list) or isinstance(row.get("chosen"), str) and row["chosen"].startswith("["):
            prompt, chosen, rejected = _split_shared_prompt(chosen, rejected)
            if not prompt:
                raise NbalignError(
                    f"Row {i} of the {what} has no `prompt` column and its chosen and rejected conversations "
                    "share no leading turns, so the prompt cannot be found.",
                    "add a `prompt` column.",
                )
        else:
            raise NbalignError(
                f"Row {i} of the {what} has no `prompt`.", f"give {PAIR_FORMAT}; the prompt is what both answer."
            )
        if not joined(chosen).strip() or not joined(rejected).strip():
            empty.append(i)
        elif joined(chosen).strip() == joined(rejected).strip():
            same.append(i)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if empty:
        raise NbalignError(
            f"Rows {rows_hint(empty)} of the {what} have an empty chosen or rejected answer.",
            "fill them in or drop them; a pair needs two answers to compare.",
        )
    if same:
        raise NbalignError(
            f"Rows {rows_hint(same)} of the {what} have identical chosen and rejected answers, which teach nothing and "
            "only add noise.",
            "drop them, e.g. df[df.chosen != df.rejected].",
        )
    return out


def parse_label(value: Any, i: int, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1, -1):
        return value == 1
    text = str(value).strip().lower()
    if text in _UP:
        return True
    if text in _DOWN:
        return False
    raise NbalignError(
        f"Row {i} of the {what} has label {value!r}, which is neither thumbs up nor thumbs down.",
        "use true/false (or 1/0, up/down).",
    )


def to_unpaired(records: list[dict], what: str = "data", unpair: bool = False) -> list[dict]:
    """Normalise thumbs data to conversational {"prompt", "completion", "label"}. With `unpair`, pairs become
    two rows each: the chosen answer labelled up, the rejected one down."""
    columns = sorted({k for r in records for k in r})
    if {"chosen", "rejected"} <= set(columns):
        if not unpair:
            raise NbalignError(
                f"The {what} holds preference pairs ({PAIR_FORMAT}), but %%kto learns from unpaired thumbs.",
                "pass --unpair to split each pair into a thumbs-up and a thumbs-down row, or use %%dpo for pairs.",
            )
        out = []
        for pair in to_pairs(records, what):
            out.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
            out.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
        return out
    if not {"prompt", "completion", "label"} <= set(columns):
        raise NbalignError(
            f"The {what} has columns {columns}, but %%kto needs {UNPAIRED_FORMAT}.",
            _pair_hint(columns, UNPAIRED_FORMAT),
        )
    out, empty = [], []
    for i, row in enumerate(records):
        prompt = as_messages(row["prompt"], "user", i, what)
        completion = as_messages(row["completion"], "assistant", i, what)
        if not joined(completion).strip():
            empty.append(i)
        out.append({"prompt": prompt, "completion": completion, "label": parse_label(row["label"], i, what)})
    if empty:
        raise NbalignError(f"Rows {rows_hint(empty)} of the {what} have an empty completion.", "fill them in or drop them.")
    return out


def prompt_lengths(rows: list[dict], tokenizer) -> list[int]:
    """Tokens in each row's prompt as the model will see it (chat template and generation prompt)."""
    return [len(tokenizer(prompt_text(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"]) for r in rows]


def check_prompt_lengths(rows: list[dict], tokenizer, max_length: int, what: str, method: str) -> None:
    """Prompts that fill max_length leave no room for the answer the loss is computed on: refuse them."""
    lengths = prompt_lengths(rows, tokenizer)
    long = [i for i, n in enumerate(lengths) if n >= max_length - 1]
    if long:
        raise NbalignError(
            f"{method}: the prompts of rows {rows_hint(long)} of the {what} take {max(lengths[i] for i in long)} tokens, "
            f"which leaves no room for an answer within max_length {max_length}.",
            f"raise --max-length above {max(lengths) + 64}, or shorten or drop those prompts.",
        )


PROMPT_FORMAT = "a list of prompt strings, or rows with a `prompt` column (text or a message list)"


def to_prompts(data: Any, what: str = "prompts") -> list[dict]:
    """Rows {"prompt": [...messages], **other columns}: from a list of strings, or rows with `prompt` (text or
    messages), or `messages` conversations (everything before the last assistant turn is the prompt)."""
    if isinstance(data, (list, tuple)) and data and all(isinstance(x, str) for x in data):
        data = [{"prompt": x} for x in data]
    records = load_records(data, what)
    out = []
    for i, row in enumerate(records):
        if "prompt" in row:
            prompt = as_messages(row["prompt"], "user", i, what)
        elif "messages" in row:
            messages = as_messages(row["messages"], "user", i, what)
            while messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            prompt = messages
        else:
            columns = sorted({k for r in records for k in r})
            renames = {c: "prompt" for c in columns if SYNONYMS.get(c.lower()) == "prompt"}
            raise NbalignError(
                f"The {what} have columns {columns}, but %%rlhf needs {PROMPT_FORMAT}.",
                f"rename the column, e.g. df.rename(columns={renames!r})." if renames else f"give {PROMPT_FORMAT}.",
            )
        if not prompt or not joined(prompt).strip():
            raise NbalignError(f"Row {i} of the {what} has an empty prompt.", "fill it in or drop it.")
        extra = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
        out.append({"prompt": prompt, **extra})
    return out
