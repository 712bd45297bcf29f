"""Accept data the way notebook users hold it, check it, and emit what the trainers need.

Inputs: a list of dicts, a pandas DataFrame, a Hugging Face Dataset, or a path (JSONL, JSON, CSV,
Parquet, or a folder written by `Dataset.save_to_disk`). Formats are TRL's standard ones:
`messages`; `prompt` + `completion` (strings or message lists); Alpaca `instruction`/`input`/`output`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import NbalignError

SFT_FORMATS = "`messages`, `prompt` + `completion`, or Alpaca `instruction` (+ `input`) + `output`"

# Common column names people use, and the standard name they mean.
SYNONYMS = {
    "question": "prompt", "query": "prompt", "input_text": "prompt", "instruction": "prompt",
    "answer": "completion", "response": "completion", "output": "completion", "target": "completion",
    "reply": "completion", "conversations": "messages", "conversation": "messages", "chat": "messages",
}


def load_records(data: Any, what: str = "data") -> list[dict]:
    """Rows as plain dicts, from any supported container or file; errors name the fix."""
    if data is None:
        raise NbalignError(f"No {what} was given.", "pass a list of dicts, a DataFrame, a Dataset or a file path.")
    if isinstance(data, (str, Path)):
        records = _read_path(Path(data).expanduser(), what)
    elif hasattr(data, "to_dict") and hasattr(data, "columns"):  # pandas.DataFrame
        records = data.to_dict(orient="records")
    elif hasattr(data, "column_names") and hasattr(data, "to_list"):  # datasets.Dataset
        records = data.to_list()
    elif isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        keys = list(data)
        records = [dict(zip(keys, row)) for row in zip(*data.values())]
    elif isinstance(data, (list, tuple)):
        records = list(data)
    else:
        raise NbalignError(
            f"The {what} is a {type(data).__name__}, which nbalign cannot read.",
            "pass a list of dicts, a pandas DataFrame, a datasets.Dataset, or a .jsonl/.csv/.parquet path.",
        )
    if not records:
        raise NbalignError(f"The {what} is empty: there is nothing to train on.", "give it at least one example.")
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise NbalignError(
            f"Row {bad} of the {what} is a {type(records[bad]).__name__}, not a mapping of column to value.",
            'give rows like {"prompt": "...", "completion": "..."}.',
        )
    return records


def _read_path(path: Path, what: str) -> list[dict]:
    if not path.exists():
        raise NbalignError(
            f"The {what} '{path}' is neither a notebook variable nor an existing file.",
            "check the name or the path (relative paths start from the notebook's folder).",
        )
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            from datasets import load_from_disk

            return load_from_disk(str(path)).to_list()
        if suffix in (".jsonl", ".ndjson"):
            with path.open(encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if suffix == ".json":
            loaded = json.loads(path.read_text(encoding="utf-8"))
            return loaded if isinstance(loaded, list) else load_records(loaded, what)
        import pandas as pd

        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False).to_dict("records")
        if suffix == ".parquet":
            return pd.read_parquet(path).to_dict("records")
    except (ValueError, OSError) as exc:
        raise NbalignError(f"Could not read the {what} file '{path}': {exc}.", "check that the file is valid.") from None
    raise NbalignError(
        f"The {what} file '{path}' has an unknown type '{suffix}'.",
        "use .jsonl, .json, .csv, .parquet, or a folder saved with Dataset.save_to_disk.",
    )


def _rename_hint(columns: list[str], wanted: str) -> str:
    mapping = {c: SYNONYMS[c.lower()] for c in columns if c.lower() in SYNONYMS}
    if mapping:
        return f"rename the columns, e.g. df.rename(columns={mapping!r}), or give {wanted}."
    return f"give {wanted}."


def to_conversations(records: list[dict], what: str = "data") -> list[dict]:
    """Normalise SFT rows to {"prompt": [...messages], "completion": [...messages]} or {"messages": [...]}
    with every message checked. Plain strings become a user turn and an assistant turn."""
    columns = sorted({k for r in records for k in r})
    out = []
    for i, row in enumerate(records):
        if "messages" in row:
            messages = _check_messages(row["messages"], i, what)
            if not any(m["role"] == "assistant" for m in messages):
                raise NbalignError(
                    f"Row {i} of the {what} has no assistant message, so there is nothing to learn from it.",
                    "every conversation needs at least one {'role': 'assistant', ...} turn.",
                )
            out.append({"messages": messages})
        elif "prompt" in row and "completion" in row:
            prompt = _as_messages(row["prompt"], "user", i, what)
            completion = _as_messages(row["completion"], "assistant", i, what)
            if not "".join(m["content"] for m in completion).strip():
                raise NbalignError(f"Row {i} of the {what} has an empty completion.", "remove it or fill it in.")
            out.append({"prompt": prompt, "completion": completion})
        elif "instruction" in row and "output" in row:
            text = str(row["instruction"] or "")
            if row.get("input"):
                text = f"{text}\n\n{row['input']}"
            out.append(
                {
                    "prompt": _as_messages(text, "user", i, what),
                    "completion": _as_messages(row["output"], "assistant", i, what),
                }
            )
        else:
            raise NbalignError(
                f"The {what} has columns {columns}, but %%sft needs {SFT_FORMATS}.",
                _rename_hint(columns, SFT_FORMATS),
            )
    return out


def _as_messages(value: Any, role: str, i: int, what: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return _check_messages(value, i, what)
    if value is None:
        raise NbalignError(f"Row {i} of the {what} has an empty {role} text.", "remove the row or fill it in.")
    return [{"role": role, "content": str(value)}]


def _check_messages(messages: Any, i: int, what: str) -> list[dict]:
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)  # CSV/Parquet round-trips store lists as JSON text
        except ValueError:
            pass
    if not isinstance(messages, list) or not messages:
        raise NbalignError(
            f"Row {i} of the {what}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts.",
            'write e.g. [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}].',
        )
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise NbalignError(
                f"Row {i} of the {what} has a message without 'role' and 'content': {str(m)[:80]}.",
                "give each message as {'role': 'user'|'assistant'|'system', 'content': '...'}.",
            )
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise NbalignError(
                f"Row {i} of the {what} has a message with role {m['role']!r}.",
                "use the roles system, user, assistant (or tool).",
            )
        out.append({"role": m["role"], "content": "" if m["content"] is None else str(m["content"])})
    return out


def tokenize_sft(rows: list[dict], tokenizer, completion_only: bool = True) -> dict[str, list]:
    """Token ids plus a `completion_mask` that is 1 on what the model should learn to write: every
    assistant turn's content and the end-of-turn token after it (so the model learns to stop).

    Masks come from character spans of the rendered chat, which works for any chat template that
    writes message contents verbatim, multi-turn included, without template `generation` tags.
    """
    ids_column, mask_column = [], []
    for row in rows:
        if "messages" in row:
            messages = row["messages"]
            learn = [m["role"] == "assistant" for m in messages]
        else:  # few-shot assistant turns inside a prompt are context, not targets
            messages = row["prompt"] + row["completion"]
            learn = [False] * len(row["prompt"]) + [m["role"] == "assistant" for m in row["completion"]]
        text, spans = render_with_spans(tokenizer, messages, learn)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [int(any(s < end and e > start for s, e in spans)) for start, end in enc["offset_mapping"]]
        ids_column.append(enc["input_ids"])
        mask_column.append(mask if completion_only else [1] * len(mask))
    return {"input_ids": ids_column, "completion_mask": mask_column}


def render_with_spans(tokenizer, messages: list[dict], learn: list[bool]):
    """The chat rendered with the model's template, and the character spans of the messages marked in
    `learn`, each extended over the end-of-turn token that follows it."""
    eos = tokenizer.eos_token or ""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    else:
        # No template (a base model): plain turns, each assistant turn closed by EOS.
        text = "".join(
            (m["content"] + eos) if m["role"] == "assistant" else (m["content"] + "\n") for m in messages
        )
    spans, cursor = [], 0
    for m, learned in zip(messages, learn):
        content = m["content"]
        start = text.find(content, cursor) if content else cursor
        if start < 0:
            raise NbalignError(
                "The model's chat template changes message text, so nbalign cannot tell which tokens the "
                "assistant wrote.",
                "use a model whose template copies messages verbatim, or set `completion_only_loss: false`.",
            )
        end = start + len(content)
        cursor = end
        if not learned:
            continue
        # Learn the end-of-turn token too: a model that never sees it never stops.
        rest = text[end:]
        stripped = rest.lstrip(" \t")
        if eos and stripped.startswith(eos):
            end += len(rest) - len(stripped) + len(eos)
            cursor = end
        spans.append((start, end))
    return text, spans


# ----------------------------------------------------------------------------------------------------
# Preference data: pairs (DPO family, reward models) and unpaired thumbs (KTO).

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


def _text(messages: list[dict]) -> str:
    return "".join(m["content"] for m in messages).strip()


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
        chosen = _as_messages(row.get("chosen"), "assistant", i, what)
        rejected = _as_messages(row.get("rejected"), "assistant", i, what)
        if "prompt" in row and row["prompt"] is not None:
            prompt = _as_messages(row["prompt"], "user", i, what)
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
        if not _text(chosen) or not _text(rejected):
            empty.append(i)
        elif _text(chosen) == _text(rejected):
            same.append(i)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if empty:
        raise NbalignError(
            f"Rows {_rows(empty)} of the {what} have an empty chosen or rejected answer.",
            "fill them in or drop them; a pair needs two answers to compare.",
        )
    if same:
        raise NbalignError(
            f"Rows {_rows(same)} of the {what} have identical chosen and rejected answers, which teach nothing and "
            "only add noise.",
            "drop them, e.g. df[df.chosen != df.rejected].",
        )
    return out


def _rows(indices: list[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:8])
    return shown + (f" and {len(indices) - 8} more" if len(indices) > 8 else "")


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
        prompt = _as_messages(row["prompt"], "user", i, what)
        completion = _as_messages(row["completion"], "assistant", i, what)
        if not _text(completion):
            empty.append(i)
        out.append({"prompt": prompt, "completion": completion, "label": parse_label(row["label"], i, what)})
    if empty:
        raise NbalignError(f"Rows {_rows(empty)} of the {what} have an empty completion.", "fill them in or drop them.")
    return out


def prompt_lengths(rows: list[dict], tokenizer) -> list[int]:
    """Tokens in each row's prompt as the model will see it (chat template and generation prompt)."""
    return [len(tokenizer(prompt_text(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"]) for r in rows]


def prompt_text(tokenizer, messages: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(m["content"] + "\n" for m in messages)


def check_prompt_lengths(rows: list[dict], tokenizer, max_length: int, what: str, method: str) -> None:
    """Prompts that fill max_length leave no room for the answer the loss is computed on: refuse them."""
    lengths = prompt_lengths(rows, tokenizer)
    long = [i for i, n in enumerate(lengths) if n >= max_length - 1]
    if long:
        raise NbalignError(
            f"{method}: the prompts of rows {_rows(long)} of the {what} take {max(lengths[i] for i in long)} tokens, "
            f"which leaves no room for an answer within max_length {max_length}.",
            f"raise --max-length above {max(lengths) + 64}, or shorten or drop those prompts.",
        )
