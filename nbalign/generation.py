"""Text from a base model or a run's tuned model, with its chat template."""

from __future__ import annotations

from typing import Any

from .session import session


def load_for_inference(model: str):
    """(model, tokenizer) for a model name or run folder: parents merged, eval mode, on the best device."""
    from .models import load_model, load_tokenizer, pick_device, quiet, resolve

    ref = resolve(model)
    device = pick_device()
    with quiet():
        loaded = load_model(ref, device)
    loaded.eval()
    return loaded, load_tokenizer(ref)


def generate(model: str, prompt: Any, max_new_tokens: int = 128, **kwargs) -> str | list[str]:
    """Greedy by default (pass do_sample=True, temperature=... to sample). A list of prompts gives a list."""
    from pathlib import Path

    key = model
    if Path(model).exists():
        # A run folder trained again in place (--overwrite) must not answer from the old weights.
        status = Path(model) / "status.json"
        key = f"{Path(model).resolve()}@{status.stat().st_mtime_ns if status.exists() else 0}"
    loaded, tokenizer = session.cached_model(key, lambda: load_for_inference(model))
    single = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict))
    prompts = [prompt] if single else list(prompt)
    answers = generate_with(loaded, tokenizer, prompts, max_new_tokens=max_new_tokens, **kwargs)
    return answers[0] if single else answers


def generate_with(model, tokenizer, prompts: list, max_new_tokens: int = 128, batch_size: int = 8, **kwargs) -> list[str]:
    import torch

    texts = [_render(tokenizer, p) for p in prompts]
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    if not kwargs["do_sample"]:
        # Greedy decoding: unset the sampling knobs a generation_config may carry, to avoid warnings.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    out = []
    try:
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(model.device)
            with torch.no_grad():
                ids = model.generate(**batch, max_new_tokens=max_new_tokens, **kwargs)
            new = ids[:, batch["input_ids"].shape[1] :]
            out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return out


def _render(tokenizer, prompt: Any) -> str:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"
