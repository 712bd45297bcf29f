"""Text from a base model or a run's tuned model, with its chat template, and the one bounded cache of a
model kept loaded between calls (so re-running a cell that generates does not reload, nor grow memory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .text import prompt_text


class ModelCache:
    """At most one model kept loaded for generation or scoring: asking for another frees the first."""

    def __init__(self):
        self._loaded: tuple[str, object, object] | None = None  # (key, model, tokenizer)

    def get(self, key: str, load):
        """The model for `key`, loading it with `load()` and dropping any other one kept before."""
        if self._loaded is None or self._loaded[0] != key:
            self.release()
            model, tokenizer = load()
            self._loaded = (key, model, tokenizer)
        return self._loaded[1], self._loaded[2]

    def release(self) -> None:
        if self._loaded is not None:
            self._loaded = None
            from .devices import free_memory

            free_memory()


# The process holds one: the memory it bounds is the process's. Training releases it first.
CACHE = ModelCache()


def cache_key(model: str, kind: str = "causal") -> str:
    """A key that changes when a run folder is trained again in place (--overwrite), so an answer never
    comes from old weights."""
    from .runfolder import status_stamp

    path = Path(str(model))
    if path.exists():
        return f"{kind}:{path.resolve()}@{status_stamp(path)}"
    return f"{kind}:{model}"


def load_for_inference(model: str):
    """(model, tokenizer) for a model name or run folder: parents merged, eval mode, on the best device."""
    from .devices import pick_device, quiet
    from .models import load_model, load_tokenizer, resolve

    ref = resolve(model)
    device = pick_device()
    with quiet():
        loaded = load_model(ref, device)
    loaded.eval()
    return loaded, load_tokenizer(ref)


def generate(model: str, prompt: Any, max_new_tokens: int = 128, **kwargs) -> str | list[str]:
    """Greedy by default (pass do_sample=True, temperature=... to sample). A list of prompts gives a list."""
    loaded, tokenizer = CACHE.get(cache_key(model), lambda: load_for_inference(model))
    single = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict))
    prompts = [prompt] if single else list(prompt)
    answers = generate_with(loaded, tokenizer, prompts, max_new_tokens=max_new_tokens, **kwargs)
    return answers[0] if single else answers


def generate_with(model, tokenizer, prompts: list, max_new_tokens: int = 128, batch_size: int = 8, **kwargs) -> list[str]:
    import torch

    texts = [prompt_text(tokenizer, p) for p in prompts]
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
