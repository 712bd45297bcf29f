"""Accept data the way notebook users hold it, check it, and emit what the trainers need.

Inputs: a list of dicts, a pandas DataFrame, a Hugging Face Dataset, or a path (JSONL, JSON, CSV,
Parquet, or a folder written by `Dataset.save_to_disk`). Formats are TRL's standard ones:
`messages`; `prompt` + `completion` (strings or message lists); and, mapped onto those, the forms data is
published in: Alpaca `instruction`/`input`/`output`, Dolly `instruction`/`context`/`response`, ShareGPT
`conversations` (`from`/`value`), and HH-RLHF `chosen`/`rejected` transcripts.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from .errors import NbalignError
from .text import (RowProblem, after_prompt, as_messages, check_messages, each_row, hh_messages,
                   is_missing, is_sharegpt, missing_cell, n_rows, sharegpt_messages)

SFT_FORMATS = ("`messages`, `prompt` + `completion`, Alpaca `instruction` (+ `input`) + `output`, Dolly "
               "`instruction` (+ `context`) + `response`, or ShareGPT `conversations`")

# Common column names people use, and the standard name they mean.
SYNONYMS = {
    "question": "prompt", "query": "prompt", "input_text": "prompt", "instruction": "prompt",
    "answer": "completion", "response": "completion", "output": "completion", "target": "completion",
    "reply": "completion", "conversations": "messages", "conversation": "messages", "chat": "messages",
}
_UP = {"true", "1", "yes", "up", "good", "desirable", "+", "+1", "👍", "thumbs up", "positive"}
_DOWN = {"false", "0", "no", "down", "bad", "undesirable", "-", "-1", "👎", "thumbs down", "negative"}


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
        records = _columns_to_rows(data, what)
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


def _columns_to_rows(columns: dict[str, list], what: str) -> list[dict]:
    """A dict of equal-length columns as rows; zip would silently cut every column to the shortest."""
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"`{name}` has {n}" for name, n in lengths.items())
        raise NbalignError(
            f"The {what} is a dict of columns of different lengths ({shown} values), so rows cannot be formed "
            "from them without losing or misaligning some.",
            "give every column one value per row, the same number in each (check the list that is short).",
        )
    return [dict(zip(columns, row)) for row in zip(*columns.values())]


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
            return _read_jsonl(path, what)
        if suffix == ".json":
            text = path.read_text(encoding="utf-8")
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as exc:
                line = text.splitlines()[exc.lineno - 1] if text.strip() else ""
                raise _json_error(path, what, exc, exc.lineno, line, lines=False) from None
            return loaded if isinstance(loaded, list) else load_records(loaded, what)
        import pandas as pd

        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False).to_dict("records")
        if suffix == ".parquet":
            return pd.read_parquet(path).to_dict("records")
    except UnicodeDecodeError:
        raise _not_utf8(path, what) from None
    except (ValueError, OSError) as exc:
        reason = str(exc).strip().rstrip(".")
        raise NbalignError(f"Could not read the {what} file '{path}': {reason}.",
                           "check that the file is valid.") from None
    if suffix in (".sqlite", ".sqlite3", ".db"):
        raise NbalignError(
            f"The {what} '{path}' is an SQLite file: nbalign reads label stores as preference pairs or thumbs, "
            "which this method does not train on.",
            "pass the store to --data of %%dpo, %%reward_model or %%kto, or export it (LabelStore(path).export(...)).",
        )
    raise NbalignError(
        f"The {what} file '{path}' has an unknown type '{suffix}'.",
        "use .jsonl, .json, .csv, .parquet, or a folder saved with Dataset.save_to_disk.",
    )


def _not_utf8(path: Path, what: str) -> NbalignError:
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
        where = ""
    except UnicodeDecodeError as exc:  # decoded whole, its position is the file's, not a read buffer's
        line = raw.count(b"\n", 0, exc.start) + 1
        where = f" (byte {raw[exc.start]:#04x} on line {line})"
    return NbalignError(
        f"The {what} file '{path}' is not UTF-8 text{where}.",
        "save it again as UTF-8 (most editors and pandas' to_json/to_csv write UTF-8).",
    )


def _read_jsonl(path: Path, what: str) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:  # its line number counts within the one line it was given
                    raise _json_error(path, what, exc, number, line, lines=True) from None
    return rows


# json's messages, in the words of someone who has to fix the file.
_JSON_WORDS = {
    "Expecting value": "a value is missing or is not JSON (a stray comma, a single-quoted string, a bare word)",
    "Expecting property name": "a key is not in double quotes, or a comma trails the last item",
    "Expecting ',' delimiter": "a comma is missing between two items, or a quote in a string is not escaped as \\\"",
    "Expecting ':' delimiter": "a key is not followed by a colon",
    "Unterminated string": "a string has no closing double quote",
    "Invalid control character": "a string holds a raw line break or tab (write it as \\n or \\t)",
    "Invalid \\escape": "a backslash starts an unknown escape (write \\\\ for a backslash)",
}


def _json_error(path: Path, what: str, exc: json.JSONDecodeError, number: int, line: str, lines: bool) -> NbalignError:
    where = f"Line {number} of the {what} file '{path}'"
    column = exc.colno if lines is False else exc.pos + 1
    if exc.msg.startswith("Extra data"):
        if lines:
            return NbalignError(f"{where} holds more than one JSON value.", "put each row on a line of its own.")
        return NbalignError(
            f"The {what} file '{path}' holds more than one JSON value (the next starts on line {number}): it looks "
            "like JSON Lines, one row per line.",
            "rename it to .jsonl, or make it one JSON list: [ {...}, {...} ].",
        )
    if lines and exc.pos >= len(line.rstrip()):
        return NbalignError(
            f"{where} ends before its JSON value does: JSON Lines holds one whole row per line.",
            "write each row on one line, e.g. df.to_json(path, orient='records', lines=True); a file that is one "
            "JSON list or one pretty-printed value should be named .json.",
        )
    words = next((w for key, w in _JSON_WORDS.items() if exc.msg.startswith(key)), exc.msg.lower())
    text = line.rstrip("\n")
    near = text[max(0, column - 31): column + 20].strip()
    return NbalignError(
        f"{where} is not valid JSON: {words}, at character {column}, near `{near}`.",
        f"correct line {number} of the file, or write it again with "
        + ("df.to_json(path, orient='records', lines=True)." if lines else "df.to_json(path, orient='records')."),
    )


def thumb(value: Any) -> bool | None:
    """A label as thumbs up (True) or down (False), in the forms people write them; None if it is neither."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1, -1):
        return value == 1
    text = str(value).strip().lower()
    return True if text in _UP else False if text in _DOWN else None


# What kind of data a set of columns holds, and the method that learns from it.
KINDS = {
    "pairs": ("preference pairs (`chosen`/`rejected`)", "use %%dpo, %%reward_model, or %%kto --unpair with this data."),
    "thumbs": ("thumbs (answers with a `label`)", "use %%kto with this data."),
    "demonstrations": ("demonstrations (answers to imitate, without thumbs or pairs)", "use %%sft with this data."),
    "prompts": ("prompts without answers",
                "use %%rlhf with this data: it learns from rewards on the model's own answers."),
}


def sft_form(columns: set[str]) -> bool:
    return bool(columns & {"messages", "conversations"} or {"prompt", "completion"} <= columns
                or "instruction" in columns and columns & {"output", "response"})


def data_kind(columns: set[str]) -> str | None:
    if {"chosen", "rejected"} <= columns:
        return "pairs"
    if {"completion", "label"} <= columns:
        return "thumbs"
    if sft_form(columns):
        return "demonstrations"
    if "prompt" in columns:
        return "prompts"
    return None


def wrong_data(columns: set[str], what: str, method: str, needs: str, fits: Callable[[set[str]], bool],
               synonyms: dict[str, str] = SYNONYMS) -> NbalignError:
    """The error for data in the wrong shape. Columns that only need renaming get the rename; data of another
    kind gets the method that learns from it."""
    renames = {c: synonyms[c.lower()] for c in sorted(columns) if c.lower() in synonyms}
    renamed = {renames.get(c, c) for c in columns}
    kind, has = data_kind(columns), "have" if what in ("prompts", "pairs") else "has"
    if kind is None or renames and (fits(renamed) or kind == "prompts"):
        fix = f"give {needs}."
        if renames:
            fix = f"rename the columns, e.g. df.rename(columns={renames!r}), or {fix}"
        return NbalignError(f"The {what} {has} columns {sorted(columns)}, but {method} needs {needs}.", fix)
    name, use = KINDS[kind]
    return NbalignError(
        f"The {what} {has} columns {sorted(columns)}: these are {name}, which {method} cannot learn from "
        f"(it needs {needs}).", use,
    )



# Published forms mapped onto the standard columns, and the line that says so.
FORMS = {
    "sharegpt": "ShareGPT form (conversations with from/value) as messages",
    "conversations": "a `conversations` column (role/content) as messages",
    "alpaca": "Alpaca form (instruction/input/output) as prompt + completion",
    "dolly": "Dolly form (instruction/context/response) as prompt + completion",
    "hh": "HH-RLHF form (chosen/rejected transcripts with Human:/Assistant: turns) as conversational pairs",
}


def standard(records: list[dict], what: str) -> list[dict]:
    """Rows in a published dataset's form as TRL's standard columns; says once what it did. Rows already
    standard pass through unchanged."""
    forms = Counter()

    def convert(i: int, row: dict) -> dict:
        form, mapped = _standard_row(i, row, what)
        forms[form] += 1
        return mapped

    rows = each_row(records, what, convert)
    for form, n in forms.items():
        if form:
            print(f"nbalign: read {n_rows(n)} in {FORMS[form]}.", flush=True)
    return rows


def _standard_row(i: int, row: dict, what: str) -> tuple[str | None, dict]:
    if "conversations" in row and "messages" not in row:
        rest = {k: v for k, v in row.items() if k != "conversations"}
        form = "sharegpt" if is_sharegpt(row["conversations"]) else "conversations"
        return form, {**rest, "messages": sharegpt_messages(row["conversations"], i, what)}
    if "instruction" in row and "prompt" not in row and ("output" in row or "response" in row):
        form, extra, answer = ("alpaca", "input", "output") if "output" in row else ("dolly", "context", "response")
        for column in ("instruction", answer):
            if is_missing(row[column]):
                raise missing_cell(i, what, column)
        prompt = str(row["instruction"])
        if not is_missing(row.get(extra)) and str(row.get(extra) or "").strip():
            prompt = f"{prompt}\n\n{row[extra]}"  # an empty context or input adds nothing
        rest = {k: v for k, v in row.items() if k not in ("instruction", extra, answer)}
        return form, {**rest, "prompt": prompt, "completion": row[answer]}
    if "prompt" not in row and hh_messages(row.get("chosen")) is not None:
        chosen, rejected = hh_messages(row["chosen"]), hh_messages(row.get("rejected"))
        if rejected is None:
            raise RowProblem(i, what, "{has} a `chosen` transcript in HH-RLHF form but a `rejected` one that is not",
                             "give both as \"\\n\\nHuman: ...\\n\\nAssistant: ...\" transcripts, or drop those rows.")
        return "hh", {**row, "chosen": chosen, "rejected": rejected}
    return None, row


def to_conversations(records: list[dict], what: str = "data") -> list[dict]:
    """Normalise SFT rows to {"prompt": [...messages], "completion": [...messages]} or {"messages": [...]}
    with every message checked. Plain strings become a user turn and an assistant turn."""
    columns = {k for r in records for k in r}
    labels = [r.get("label") for r in records if not is_missing(r.get("label"))]
    if data_kind(columns) == "thumbs" and labels and all(thumb(label) is not None for label in labels):
        raise NbalignError(
            f"The {what} has columns {sorted(columns)}: these are thumbs (answers with a `label`), and %%sft would "
            "learn the thumbs-down answers as well as the thumbs-up ones.",
            "use %%kto with this data, or give %%sft the thumbs-up rows alone, e.g. "
            "df[df.label == True].drop(columns=['label']).",
        )
    if not sft_form(columns):
        raise wrong_data(columns, what, "%%sft", SFT_FORMATS, sft_form)
    rows = each_row(standard(records, what), what, lambda i, row: _sft_row(i, row, what))
    repeated = sum(1 for _, stripped in rows if stripped)
    if repeated:
        print(f"nbalign: the completions of {n_rows(repeated)} repeat their prompt turns; read them as the answers "
              "alone.", flush=True)
    return [row for row, _ in rows]


def _sft_row(i: int, row: dict, what: str) -> tuple[dict, bool]:
    if "messages" in row:
        messages = check_messages(row["messages"], i, what)
        if not any(m["role"] == "assistant" for m in messages):
            raise RowProblem(i, what, "{has} no assistant message, so there is nothing to learn from",
                             "every conversation needs at least one {'role': 'assistant', ...} turn.")
        return {"messages": messages}, False
    if "prompt" not in row or "completion" not in row:
        raise RowProblem(i, what, "{has} neither `messages` nor `prompt` + `completion`", f"give {SFT_FORMATS}.")
    prompt = as_messages(row["prompt"], "user", i, what, "prompt")
    completion = as_messages(row["completion"], "assistant", i, what, "completion")
    # A completion that repeats the prompt would teach it twice; other leading turns are multi-turn answers.
    answer = after_prompt(prompt, completion)
    stripped = answer is not None and answer is not completion
    completion = completion if answer is None else answer
    if not "".join(m["content"] for m in completion).strip():
        raise RowProblem(i, what, "{has} an empty completion", "remove them or fill them in.")
    return {"prompt": prompt, "completion": completion}, stripped
