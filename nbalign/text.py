"""Messages and the text a model sees, defined once: reading cells as checked message lists (with the problems
of many rows gathered into one error), joining their contents, the prompt and completion as the chat template
renders them, and right-padding token ids into a batch. Data, evaluation, scoring, generation, reward models and
RL all read text through these."""

from __future__ import annotations

import json
import numbers
import re
from typing import Any, Callable

from .errors import NbalignError

ROLES = ("system", "user", "assistant", "tool")


class RowProblem(NbalignError):
    """What is wrong with one row. The converters gather these, so that one error names every row with the same
    problem instead of stopping at the first; raised alone, it reads as a whole error about that row.

    `says` follows the row numbers, with "{has}" for the verb: "{has} no `prompt` (empty cell: NaN/None)".
    `missing` names the column of an empty cell, for a `dropna` in the fix."""

    def __init__(self, i: int, what: str, says: str, fix: str | None = None, missing: str | None = None):
        self.says, self.missing = says, missing
        fix = fix or (missing and dropna_fix([missing]))
        super().__init__(f"Row {i} of the {what} {says.replace('{has}', 'has')}.", fix)


def dropna_fix(columns: list[str]) -> str:
    return f"drop or fill in those rows before training, e.g. df = df.dropna(subset={columns!r})."


def missing_cell(i: int, what: str, column: str, absent: bool = False) -> RowProblem:
    why = "the key is absent" if absent else "empty cell: NaN/None"
    return RowProblem(i, what, f"{{has}} no `{column}` ({why})", missing=column)


def each_row(records: list[dict], what: str, convert: Callable[[int, dict], Any]) -> list:
    """convert(i, row) for every row. Rows that fail alike are named together in one error, so the user can
    fix them all at once."""
    out, failed = [], {}
    for i, row in enumerate(records):
        try:
            out.append(convert(i, row))
        except RowProblem as problem:
            failed.setdefault(problem.says, []).append((i, problem))
    if failed:
        raise _gathered(failed, what)
    return out


def _gathered(failed: dict[str, list], what: str) -> NbalignError:
    parts, fixes, missing = [], [], []
    for says, hits in failed.items():
        rows = [i for i, _ in hits]
        many = len(rows) > 1
        where = f"rows {rows_hint(rows)}" if many else f"row {rows[0]}"
        if not parts:
            where = f"{where.capitalize()} of the {what}"
        parts.append(f"{where} {says.replace('{has}', 'have' if many else 'has')}")
        first = hits[0][1]
        if first.missing:
            missing.append(first.missing)
        elif first.fix not in fixes:
            fixes.append(first.fix)
    fixes = ([dropna_fix(list(dict.fromkeys(missing)))] if missing else []) + fixes
    return NbalignError("; ".join(parts) + ".", " ".join(fixes))


def rows_hint(indices: list[int]) -> str:
    """Row numbers for a message: the first eight, and how many more."""
    shown = ", ".join(str(i) for i in indices[:8])
    return shown + (f" and {len(indices) - 8} more" if len(indices) > 8 else "")


def n_rows(n: int) -> str:
    return f"{n} row" + ("s" if n != 1 else "")


def after_prompt(prompt: list[dict], answer: list[dict]) -> list[dict] | None:
    """The answer without the prompt turns it repeats (UltraFeedback's answers are whole conversations that
    start with the prompt); None when the answer starts with turns that are not the prompt."""
    if answer and answer[0]["role"] != "assistant":
        if answer[: len(prompt)] == prompt:
            return answer[len(prompt):]
        return None
    return answer


def decoded(value: Any) -> Any:
    """A cell as Python values: Parquet's numpy arrays as lists, and message lists that CSV stored as JSON text
    as lists (only text that parses to {"role": ...} dicts; any other text is text)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, dict)):
        return value.tolist()
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        if isinstance(parsed, list) and parsed and all(isinstance(m, dict) and "role" in m for m in parsed):
            return parsed
    return value


def as_messages(value: Any, role: str, i: int, what: str, column: str | None = None) -> list[dict]:
    """A cell as a checked message list: text becomes one `role` message. An empty cell (None, NaN) is an error
    rather than the text "nan"."""
    value = decoded(value)
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict) and "role" in value:
        value = [value]  # one message given bare
    if isinstance(value, list):
        return check_messages(value, i, what, column or "messages")
    if is_missing(value):
        if column:
            raise missing_cell(i, what, column)
        raise RowProblem(i, what, f"{{has}} an empty {role} text (NaN/None)", "fill it in or drop the row.")
    if isinstance(value, numbers.Number):  # CSV reads "4" as a number; the text is still what the user wrote
        return [{"role": role, "content": str(value)}]
    raise RowProblem(
        i, what, f"{{has}} a `{column or role}` that is a {type(value).__name__}, not text or a list of messages",
        'give text, or a list like [{"role": "user", "content": "Hi"}].',
    )


def is_missing(value: Any) -> bool:
    """None, a float NaN (what pandas puts in an empty cell), or pandas' NA/NaT."""
    if value is None or (isinstance(value, float) and value != value):
        return True
    return type(value).__name__ in ("NAType", "NaTType")


def _listed(value: Any) -> Any:
    """A column that should hold a list, as one: CSV stores lists as JSON text, Parquet as numpy arrays."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return decoded(value)


def check_messages(messages: Any, i: int, what: str, column: str = "messages") -> list[dict]:
    messages = _listed(messages)
    if is_missing(messages):
        raise missing_cell(i, what, column)
    if not isinstance(messages, list) or not messages:
        raise RowProblem(
            i, what, f"{{has}} a `{column}` that is not a non-empty list of {{'role', 'content'}} dicts",
            'write e.g. [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}].',
        )
    return [_message(m, i, what, column) for m in messages]


def _message(m: Any, i: int, what: str, column: str) -> dict:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise RowProblem(
            i, what, f"{{has}} a message without 'role' and 'content' in `{column}`: {str(m)[:80]}",
            "give each message as {'role': 'user'|'assistant'|'system', 'content': '...'}.",
        )
    if m["role"] not in ROLES:
        raise RowProblem(i, what, f"{{has}} a message with role {m['role']!r}",
                         "use the roles system, user, assistant (or tool).")
    content = m["content"]
    if is_missing(content):
        if m["role"] == "assistant":  # an answer of "nan" or "" would be learned as the answer
            raise RowProblem(
                i, what, f"{{has}} an assistant turn with no content (None/NaN) in `{column}`",
                "fill in those answers, or drop those rows (df.drop(index=[...]) with the row numbers above).",
            )
        content = ""
    elif not isinstance(content, (str, numbers.Number)):
        raise RowProblem(
            i, what, f"{{has}} a message whose content is a {type(content).__name__}, not text, in `{column}`",
            "give each message's content as text.",
        )
    return {"role": m["role"], "content": str(content) if not isinstance(content, str) else content}


# Published conversation forms, read as messages.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system", "tool": "tool"}
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ?")


def sharegpt_messages(turns: Any, i: int, what: str, column: str = "conversations") -> list[dict]:
    """ShareGPT turns ({"from": "human"|"gpt"|"system", "value": ...}) as checked messages."""
    turns = _listed(turns)
    if not is_sharegpt(turns):
        return check_messages(turns, i, what, column)
    unknown = sorted({str(t["from"]) for t in turns if str(t["from"]).lower() not in SHAREGPT_ROLES})
    if unknown:
        raise RowProblem(i, what, f"{{has}} turns from {unknown} in `{column}`", "use from: human, gpt or system.")
    messages = [{"role": SHAREGPT_ROLES[str(t["from"]).lower()], "content": t.get("value")} for t in turns]
    return check_messages(messages, i, what, column)


def is_sharegpt(turns: Any) -> bool:
    turns = _listed(turns)
    return isinstance(turns, list) and bool(turns) and all(isinstance(t, dict) and "from" in t for t in turns)


def hh_messages(text: Any) -> list[dict] | None:
    r"""A transcript in Anthropic HH-RLHF form ("\n\nHuman: ...\n\nAssistant: ...") as messages, or None when
    the text is not one."""
    if not isinstance(text, str) or not text.lstrip().startswith("Human:") or "\n\nAssistant:" not in text:
        return None
    parts = _HH_TURN.split(text.lstrip())
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def joined(messages: Any) -> str:
    """The contents of a message list, concatenated (a string is returned as it is)."""
    if isinstance(messages, str):
        return messages
    return "".join(m.get("content") or "" for m in messages)


def plain_prompt(prompt: Any) -> Any:
    """A one-turn user message list as its text, the form label stores keep prompts in (so a prompt given either
    way is the same prompt); anything else as it is."""
    if (isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], dict)
            and prompt[0].get("role") == "user"):
        return prompt[0].get("content")
    return prompt


def last_user_text(prompt: Any) -> str:
    """What the user asked last: the text a reward function or a person reads as "the prompt"."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else joined(prompt)


def assistant_text(completion: Any) -> str:
    """The text the assistant wrote in a completion (a string or a message list)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def to_messages(prompt: Any) -> list[dict]:
    """A prompt given as a string or a message list, as a message list."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def prompt_text(tokenizer, messages: Any) -> str:
    """The prompt as the model sees it before it answers: the chat template with the generation prompt, or
    plain lines for a base model without a template."""
    messages = to_messages(messages)
    if has_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(m["content"] + "\n" for m in messages)


def completion_text(tokenizer, prompt: list[dict], completion: list[dict]) -> tuple[str, str]:
    """(prompt as the model sees it, the completion with its end-of-turn) as the chat template renders them."""
    head = prompt_text(tokenizer, prompt)
    if has_template(tokenizer):
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if full.startswith(head):
            return head, full[len(head):].rstrip("\n")
    return head, joined(completion) + (tokenizer.eos_token or "")


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def pad_right(sequences: list[list[int]], pad: int, masks: list[list[int]] | None = None):
    """Right-padded id tensor, its attention mask, and (when `masks` is given) the masks padded with 0."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    target = torch.zeros((len(sequences), width), dtype=torch.long) if masks is not None else None
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[row, : len(seq)] = 1
        if target is not None:
            target[row, : len(seq)] = torch.tensor(masks[row], dtype=torch.long)
    return (ids, attention) if target is None else (ids, attention, target)
