"""Messages and the text a model sees, defined once: checking message lists, joining their contents, the
prompt and completion as the chat template renders them, and right-padding token ids into a batch.
Data, evaluation, scoring, generation, reward models and RL all read text through these."""

from __future__ import annotations

import json
from typing import Any

from .errors import NbalignError

ROLES = ("system", "user", "assistant", "tool")


def as_messages(value: Any, role: str, i: int, what: str) -> list[dict]:
    """A cell as a checked message list: a string becomes one `role` message."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return check_messages(value, i, what)
    if value is None or is_missing(value):
        raise NbalignError(f"Row {i} of the {what} has an empty {role} text.", "remove the row or fill it in.")
    return [{"role": role, "content": str(value)}]


def is_missing(value: Any) -> bool:
    """None or a float NaN (what pandas puts in an empty cell)."""
    return value is None or (isinstance(value, float) and value != value)


def check_messages(messages: Any, i: int, what: str) -> list[dict]:
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)  # CSV/Parquet round-trips store lists as JSON text
        except ValueError:
            pass
    if hasattr(messages, "tolist") and not isinstance(messages, (str, dict)):
        messages = messages.tolist()  # Parquet gives numpy arrays of dicts
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
        if m["role"] not in ROLES:
            raise NbalignError(
                f"Row {i} of the {what} has a message with role {m['role']!r}.",
                "use the roles system, user, assistant (or tool).",
            )
        content = m["content"]
        if is_missing(content) and m["role"] == "assistant":
            raise NbalignError(
                f"Row {i} of the {what} has an assistant message with no content ({content!r}).",
                "fill it in or drop the row.",
            )
        out.append({"role": m["role"], "content": "" if is_missing(content) else str(content)})
    return out


def joined(messages: Any) -> str:
    """The contents of a message list, concatenated (a string is returned as it is)."""
    if isinstance(messages, str):
        return messages
    return "".join(m.get("content") or "" for m in messages)


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
