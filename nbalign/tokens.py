"""SFT rows as the trainer sees them: token ids and a loss mask over what the assistant writes, and a check
that every row keeps an answer within max_length."""

from __future__ import annotations

from .errors import NbalignError
from .text import has_template, rows_hint


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


def check_sft_lengths(tokens: dict[str, list], max_length: int, what: str) -> None:
    """Rows whose answer starts at or after max_length would be cut to their prompt and teach nothing (TRL then
    fails deep in training): refuse them by name, as the preference methods do."""
    starts = [next((i for i, m in enumerate(mask) if m), len(mask)) for mask in tokens["completion_mask"]]
    long = [i for i, (start, mask) in enumerate(zip(starts, tokens["completion_mask"]))
            if any(mask) and start >= max_length - 1]
    if long:
        worst = max(starts[i] for i in long)
        which = f"the prompt of row {long[0]} takes" if len(long) == 1 else f"the prompts of rows {rows_hint(long)} take up to"
        raise NbalignError(
            f"%%sft: {which} {worst} tokens of the {what}, which leaves no room for the answer within max_length "
            f"{max_length}, so {'that row' if len(long) == 1 else 'those rows'} would teach nothing.",
            f"raise --max-length above {worst + 64}, or shorten or drop {'it' if len(long) == 1 else 'them'}.",
        )
