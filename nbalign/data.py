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
from .text import as_messages, check_messages, has_template

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
            messages = check_messages(row["messages"], i, what)
            if not any(m["role"] == "assistant" for m in messages):
                raise NbalignError(
                    f"Row {i} of the {what} has no assistant message, so there is nothing to learn from it.",
                    "every conversation needs at least one {'role': 'assistant', ...} turn.",
                )
            out.append({"messages": messages})
        elif "prompt" in row and "completion" in row:
            prompt = as_messages(row["prompt"], "user", i, what)
            completion = as_messages(row["completion"], "assistant", i, what)
            if not "".join(m["content"] for m in completion).strip():
                raise NbalignError(f"Row {i} of the {what} has an empty completion.", "remove it or fill it in.")
            out.append({"prompt": prompt, "completion": completion})
        elif "instruction" in row and "output" in row:
            text = str(row["instruction"] or "")
            if row.get("input"):
                text = f"{text}\n\n{row['input']}"
            out.append(
                {
                    "prompt": as_messages(text, "user", i, what),
                    "completion": as_messages(row["output"], "assistant", i, what),
                }
            )
        else:
            raise NbalignError(
                f"The {what} has columns {columns}, but %%sft needs {SFT_FORMATS}.",
                _rename_hint(columns, SFT_FORMATS),
            )
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
    if has_template(tokenizer):
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


def rows_hint(indices: list[int]) -> str:
    """Row numbers for a message: the first eight, and how many more."""
    shown = ", ".join(str(i) for i in indices[:8])
    return shown + (f" and {len(indices) - 8} more" if len(indices) > 8 else "")


def check_sft_lengths(tokens: dict[str, list], max_length: int, what: str) -> None:
    """Rows whose answer starts at or after max_length would be cut to their prompt and teach nothing (TRL then
    fails deep in training): refuse them by name, as the preference methods do."""
    starts = [next((i for i, m in enumerate(mask) if m), len(mask)) for mask in tokens["completion_mask"]]
    long = [i for i, (start, mask) in enumerate(zip(starts, tokens["completion_mask"]))
            if any(mask) and start >= max_length - 1]
    if long:
        worst = max(starts[i] for i in long)
        raise NbalignError(
            f"%%sft: the prompts of rows {rows_hint(long)} of the {what} take up to {worst} tokens, which leaves no "
            f"room for the answer within max_length {max_length}, so those rows would teach nothing.",
            f"raise --max-length above {worst + 64}, or shorten or drop those rows.",
        )
