"""Preference data in TRL's standard formats: pairs (DPO family, reward models), unpaired thumbs (KTO),
and prompts alone (online RL); checked row by row, with errors that name the rows and the fix."""

from __future__ import annotations

from typing import Any

from .data import load_records, sft_form, standard, thumb, wrong_data
from .errors import NbalignError
from .text import (RowProblem, after_prompt, as_messages, each_row, is_missing, joined, missing_cell, n_rows,
                   prompt_text, rows_hint)


PAIR_FORMAT = "`prompt` + `chosen` + `rejected` (or `chosen`/`rejected` conversations that share their prompt)"
UNPAIRED_FORMAT = "`prompt` + `completion` + `label` (true for thumbs up, false for thumbs down)"
PAIR_SYNONYMS = {
    "question": "prompt", "instruction": "prompt", "query": "prompt",
    "preferred": "chosen", "good": "chosen", "winner": "chosen", "accepted": "chosen", "response_chosen": "chosen",
    "dispreferred": "rejected", "bad": "rejected", "loser": "rejected", "response_rejected": "rejected",
    "response": "completion", "answer": "completion", "output": "completion",
    "thumbs": "label", "thumbs_up": "label", "desirable": "label", "rating": "label", "score": "label",
}
_NOT_THE_PROMPT = ("give `chosen`/`rejected` (or `completion`) as the answers alone, or drop the `prompt` column "
                   "so that the turns both conversations share become the prompt.")


def _is_pairs(columns: set[str]) -> bool:
    return {"chosen", "rejected"} <= columns


def _split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """TRL's implicit-prompt pairs: two conversations whose common leading turns are the prompt."""
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    return chosen[:k], chosen[k:], rejected[k:]


def _answer(prompt: list[dict], answer: list[dict], i: int, what: str, column: str) -> tuple[list[dict], bool]:
    """The answer after the prompt turns it repeats (and whether it repeated them); an answer that starts with
    other turns than the prompt is ambiguous, so refused."""
    rest = after_prompt(prompt, answer)
    if rest is None:
        raise RowProblem(i, what, f"{{has}} a `{column}` conversation that starts with a {answer[0]['role']} turn "
                         "other than the `prompt`", _NOT_THE_PROMPT)
    return rest, rest is not answer


def _repeated_note(n: int, columns: str) -> None:
    if n:
        print(f"nbalign: the {columns} conversations of {n_rows(n)} repeat their `prompt` turns (UltraFeedback "
              "form); read them as the answers alone.", flush=True)


def to_pairs(records: list[dict], what: str = "data") -> list[dict]:
    """Normalise preference pairs to conversational {"prompt": [...], "chosen": [...], "rejected": [...]}.
    Empty or identical chosen/rejected answers are errors that name the rows."""
    columns = {k for r in records for k in r}
    if not _is_pairs(columns):
        raise wrong_data(columns, what, "%%dpo or %%reward_model", PAIR_FORMAT, _is_pairs, PAIR_SYNONYMS)
    rows = each_row(standard(records, what), what, lambda i, row: _pair(i, row, what))
    _repeated_note(sum(repeated for _, repeated in rows), "`chosen`/`rejected`")
    return [row for row, _ in rows]


def _pair(i: int, row: dict, what: str) -> tuple[dict, bool]:
    for column in ("chosen", "rejected"):
        if column not in row:
            raise missing_cell(i, what, column, absent=True)
    chosen = as_messages(row["chosen"], "assistant", i, what, "chosen")
    rejected = as_messages(row["rejected"], "assistant", i, what, "rejected")
    repeated = False
    if "prompt" in row and not is_missing(row["prompt"]):
        prompt = as_messages(row["prompt"], "user", i, what, "prompt")
        (chosen, repeated), (rejected, _) = (_answer(prompt, chosen, i, what, "chosen"),
                                             _answer(prompt, rejected, i, what, "rejected"))
    elif chosen[0]["role"] != "assistant":  # whole conversations: the turns they share are the prompt
        prompt, chosen, rejected = _split_shared_prompt(chosen, rejected)
        if not prompt:
            raise RowProblem(i, what, "{has} chosen and rejected conversations that share no leading turns, and no "
                             "`prompt`, so the prompt cannot be found", "add a `prompt` column.")
    elif "prompt" in row:
        raise missing_cell(i, what, "prompt")
    else:
        raise RowProblem(i, what, "{has} no `prompt`", f"give {PAIR_FORMAT}; the prompt is what both answer.")
    if not joined(chosen).strip() or not joined(rejected).strip():
        raise RowProblem(i, what, "{has} an empty chosen or rejected answer",
                         "fill them in or drop them; a pair needs two answers to compare.")
    if joined(chosen).strip() == joined(rejected).strip():
        raise RowProblem(i, what, "{has} identical chosen and rejected answers, which teach nothing and only add "
                         "noise", "drop them, e.g. df[df.chosen != df.rejected].")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, repeated


def parse_label(value: Any, i: int, what: str) -> bool:
    if is_missing(value):
        raise missing_cell(i, what, "label")
    up = thumb(value)
    if up is None:
        raise RowProblem(i, what, f"{{has}} label {value!r}, which is neither thumbs up nor thumbs down",
                         "use true/false (or 1/0, up/down).")
    return up


def to_unpaired(records: list[dict], what: str = "data", unpair: bool = False) -> list[dict]:
    """Normalise thumbs data to conversational {"prompt", "completion", "label"}. With `unpair`, pairs become
    two rows each: the chosen answer labelled up, the rejected one down."""
    columns = {k for r in records for k in r}
    if _is_pairs(columns):
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

    def fits(names: set[str]) -> bool:
        return {"prompt", "completion", "label"} <= names

    if not fits(columns):
        raise wrong_data(columns, what, "%%kto", UNPAIRED_FORMAT, fits, PAIR_SYNONYMS)
    rows = each_row(records, what, lambda i, row: _thumb(i, row, what))
    _repeated_note(sum(repeated for _, repeated in rows), "`completion`")
    return [row for row, _ in rows]


def _thumb(i: int, row: dict, what: str) -> tuple[dict, bool]:
    for column in ("prompt", "completion", "label"):
        if column not in row:
            raise missing_cell(i, what, column, absent=True)
    prompt = as_messages(row["prompt"], "user", i, what, "prompt")
    completion, repeated = _answer(prompt, as_messages(row["completion"], "assistant", i, what, "completion"),
                                   i, what, "completion")
    label = parse_label(row["label"], i, what)
    if not joined(completion).strip():
        raise RowProblem(i, what, "{has} an empty completion", "fill them in or drop them.")
    return {"prompt": prompt, "completion": completion, "label": label}, repeated


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


def _has_prompts(columns: set[str]) -> bool:
    return bool("prompt" in columns or sft_form(columns) or _is_pairs(columns))


def to_prompts(data: Any, what: str = "prompts") -> list[dict]:
    """Rows {"prompt": [...messages], **other columns}: from a list of strings, or rows with `prompt` (text or
    messages), `messages` conversations (everything before the last assistant turn is the prompt), pairs without
    a `prompt` (the turns both answers share), or the published forms data.standard reads."""
    if isinstance(data, (list, tuple)) and any(isinstance(x, str) for x in data) and all(
            isinstance(x, str) or is_missing(x) for x in data):
        data = [{"prompt": x} for x in data]
    records = load_records(data, what)
    columns = {k for r in records for k in r}
    if not _has_prompts(columns):
        raise wrong_data(columns, what, "%%rlhf", PROMPT_FORMAT, _has_prompts)
    rows = standard(records, what)
    # Other columns go to the reward functions as the user named them, before any mapping.
    return each_row(rows, what, lambda i, row: {"prompt": _prompt(i, row, what), **_extra(records[i])})


def _extra(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("prompt", "messages", "conversations")}


def _prompt(i: int, row: dict, what: str) -> list[dict]:
    if "prompt" in row:
        prompt = as_messages(row["prompt"], "user", i, what, "prompt")
    elif "messages" in row:
        prompt = as_messages(row["messages"], "user", i, what, "messages")
        while prompt and prompt[-1]["role"] == "assistant":
            prompt = prompt[:-1]
    elif _is_pairs(set(row)):
        prompt, _, _ = _split_shared_prompt(as_messages(row["chosen"], "assistant", i, what, "chosen"),
                                            as_messages(row["rejected"], "assistant", i, what, "rejected"))
    else:
        raise missing_cell(i, what, "prompt", absent=True)
    if not prompt or not joined(prompt).strip():
        raise RowProblem(i, what, "{has} an empty prompt", "fill them in or drop them.")
    return prompt
