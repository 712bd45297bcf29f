"""Text from a base model or a run's tuned model, with its chat template, and the one bounded cache of a
model kept loaded between calls (so re-running a cell that generates does not reload, nor grow memory).
Seeded sampling that leaves the global RNG alone, and sources of answers to compare (a model, the same with a
system message or settings of its own, or a function), each answer with where it came from."""

from __future__ import annotations

import datetime as _dt
import threading
from pathlib import Path
from typing import Any

from .errors import NbalignError
from .text import prompt_text, to_messages

SOURCE_KEYS = ("model", "system", "sampling")


class ModelCache:
    """At most one model kept loaded for generation or scoring: asking for another frees the first. Safe to
    reach from several threads (a judge in the labeller's candidate thread, the kernel's own): one loads at a
    time, and nobody gets a half-swapped entry."""

    def __init__(self):
        self._loaded: tuple[str, object, object] | None = None  # (key, model, tokenizer)
        self._lock = threading.RLock()

    def get(self, key: str, load):
        """The model for `key`, loading it with `load()` and dropping any other one kept before."""
        with self._lock:
            if self._loaded is None or self._loaded[0] != key:
                self.release()
                model, tokenizer = load()
                self._loaded = (key, model, tokenizer)
            return self._loaded[1], self._loaded[2]

    def release(self) -> None:
        with self._lock:
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


# Prompts answered at once. A step of greedy decoding reads every weight whatever the batch, so on a CPU the batch
# is nearly free up to a few dozen rows: 36 prompts of 40 new tokens each (SmolLM2-135M, one thread, fp32) took
# 24 s in batches of 8, 19 s in batches of 16, 13 s in one batch. 32 covers an evaluation's held-out prompts
# (evaluation.eval_data keeps 32) and the knowledge probe (20) in one batch each.
BATCH = 32


def generate_with(model, tokenizer, prompts: list, max_new_tokens: int = 128, batch_size: int = BATCH,
                  seed: int | None = None, stop: threading.Event | None = None, system: str | None = None,
                  **kwargs) -> list[str]:
    """Answers to `prompts` (strings or message lists) from a loaded model. Greedy unless kwargs say
    do_sample=True. With `seed`, sampling draws from a generator of its own (see `decoding`): the same seed
    gives the same answers and the global RNG is left alone. With `stop`, generation ends at the next token
    once the event is set. With `system`, each prompt is answered after that system message (in place of
    one the prompt has)."""
    import torch

    if seed is not None and kwargs.get("do_sample"):
        kwargs = decoding(kwargs, seed, model.device)
    if stop is not None:
        kwargs["stopping_criteria"] = stopping(stop)
    if system is not None:
        prompts = [[{"role": "system", "content": system}] + [m for m in to_messages(p) if m.get("role") != "system"]
                   for p in prompts]
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
                if virtual_tokens(model):
                    new = generate_after_virtual_tokens(model, batch, max_new_tokens=max_new_tokens, **kwargs)
                elif plain_greedy(model, kwargs):
                    new = greedy_dropping_ended(model, batch, max_new_tokens, stop, kwargs.get("pad_token_id"))
                else:
                    ids = model.generate(**batch, max_new_tokens=max_new_tokens, **kwargs)
                    new = ids[:, batch["input_ids"].shape[1] :]
            out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return out


# What greedy decoding passes generate() here; anything else (a sampler, a logits processor) goes to generate().
GREEDY_KEYS = {"do_sample", "pad_token_id", "temperature", "top_p", "top_k", "stopping_criteria"}
# generate()'s settings that change the greedy choice, at the values that leave it alone.
NEUTRAL = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "min_length": (None, 0),
           "min_new_tokens": (None, 0), "bad_words_ids": (None,), "suppress_tokens": (None,),
           "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
           "sequence_bias": (None,), "encoder_repetition_penalty": (None, 1.0), "exponential_decay_length_penalty":
           (None,), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "guidance_scale": (None, 1.0),
           "watermarking_config": (None,), "num_beams": (None, 1), "num_return_sequences": (None, 1),
           "renormalize_logits": (None, False), "logits_processor": (None,), "assistant_model": (None,)}


def plain_greedy(model, kwargs: dict) -> bool:
    """Whether `greedy_dropping_ended` gives generate()'s greedy answers for `model` and these settings: a
    transformers decoder whose forward takes a cache, plain greedy settings here and in its generation config."""
    import inspect

    config = getattr(model, "generation_config", None)
    if kwargs.get("do_sample") or not set(kwargs) <= GREEDY_KEYS or config is None:
        return False
    if getattr(model.config, "is_encoder_decoder", False) or any(
            getattr(config, name, None) not in neutral for name, neutral in NEUTRAL.items()):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    taken = inspect.signature(base.forward).parameters
    return {"cache", "position_ids", "logits_to_keep"} <= set(taken)


def greedy_dropping_ended(model, batch, max_new_tokens: int, stop: threading.Event | None = None,
                          pad: int | None = None):
    """generate()'s greedy tokens for a left-padded batch, [rows, tokens] padded with `pad`, where a row
    leaves the batch once it has ended: generate() computes every row at every step until the last one ends, so a
    short answer paid for the longest one's length (held-out prompts to 64 tokens, SmolLM2-135M, one thread:
    16 style questions 12.6 s -> 8.8 s, 16 capital-and-sum questions 12.0 s -> 10.4 s, 20 probe questions 13.2 s
    -> 11.3 s, every answer the same; tests/test_generation.py). Positions from the attention mask, as generate()
    makes them; the cache keeps its rows in step with the batch (a cache of another kind than transformers'
    dynamic one keeps every row, and ended rows' tokens are dropped)."""
    import torch
    from transformers import DynamicCache

    ids, mask = batch["input_ids"], batch["attention_mask"]
    n, device = ids.shape[0], ids.device
    ends = model.generation_config.eos_token_id
    ends = torch.tensor([ends] if isinstance(ends, int) else list(ends or []), dtype=torch.long, device=device)
    pad = model.generation_config.pad_token_id if pad is None else pad
    pad = int(ends[0]) if pad is None and len(ends) else (0 if pad is None else int(pad))
    out = torch.full((n, max(max_new_tokens, 0)), pad, dtype=torch.long, device=device)
    if max_new_tokens <= 0:
        return out
    cache = DynamicCache(config=model.config)
    position = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position, cache=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    droppable = all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers)
    rows, position = torch.arange(n, device=device), position[:, -1:]
    live = torch.ones(n, dtype=torch.bool, device=device)  # rows kept in a cache that cannot drop them
    for step in range(max_new_tokens):
        token = logits.float().argmax(-1)
        out[rows[live], step] = token[live]
        ended = torch.isin(token, ends) | ~live
        if step + 1 == max_new_tokens or bool(ended.all()) or (stop is not None and stop.is_set()):
            break
        if bool(ended.any()):
            if droppable:
                keep = (~ended).nonzero().flatten()
                cache.batch_select_indices(keep)
                rows, token, mask, position, live = rows[keep], token[keep], mask[keep], position[keep], live[keep]
            else:
                live = ~ended
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = position + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=cache,
                       use_cache=True).logits[:, -1]
    return out


def virtual_tokens(model) -> int:
    """How many virtual tokens a prompt-learning adapter (prompt tuning, p-tuning, prefix tuning) puts before
    each input of `model`: 0 for any other model, and while the adapter is switched off."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not config.is_prompt_learning or getattr(model, "_adapters_disabled", False):
        return 0
    return int(config.num_virtual_tokens)


def generate_after_virtual_tokens(model, batch, **kwargs):
    """The new tokens a prompt-learning PEFT model generates for a left-padded batch, computed as its forward
    (the one training optimised) computes them. PEFT 0.21's own generate() looks for the cache under the name
    `past_key_values`, which transformers 5 renamed `cache`: it finds none at every step, so prompt and p-tuning
    put their virtual tokens in again before each new token (greedy answers that were not the model's, 15 times
    slower), and prefix tuning's first token's logits were already up to 3.7 away from its forward's. Here the base
    model generates with the virtual tokens placed once, as the forward places them: prompt embeddings before
    the input's embeddings, or the prefix as an already-filled cache; positions come from the attention mask,
    so a row's left padding does not move them."""
    import inspect

    import torch
    from peft import PeftType

    n, k = batch["input_ids"].shape[0], virtual_tokens(model)
    mask = batch["attention_mask"]
    mask = torch.cat([torch.ones(n, k, dtype=mask.dtype, device=mask.device), mask], dim=1)
    base, kind = model.get_base_model(), model.active_peft_config.peft_type
    if kind in (PeftType.PREFIX_TUNING, getattr(PeftType, "CARTRIDGE", None)):
        # The prefix is the first k positions of the cache; their input ids are never read. generate() repeats the
        # inputs for beams or several answers per prompt, not a cache: the prefix is made for that many rows.
        ids = torch.cat([batch["input_ids"][:, :1].expand(n, k), batch["input_ids"]], dim=1)
        rows = n * max(kwargs.get("num_beams") or 1, kwargs.get("num_return_sequences") or 1)
        # transformers 5 renamed generate()'s `past_key_values` to `cache` (the old name warns, then goes).
        named = inspect.signature(base.prepare_inputs_for_generation).parameters
        name = "cache" if "cache" in named else "past_key_values"
        out = base.generate(input_ids=ids, attention_mask=mask, **{name: model.get_prompt(batch_size=rows)}, **kwargs)
        return out[:, ids.shape[1]:]
    if kind not in (PeftType.PROMPT_TUNING, PeftType.P_TUNING):  # e.g. multitask prompt tuning (needs task ids)
        return model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1]:]
    embeds = model.word_embeddings(batch["input_ids"])
    embeds = torch.cat([model.get_prompt(batch_size=n).to(embeds.dtype), embeds], dim=1)
    return base.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)  # only the new tokens come back


def decoding(sampling: dict, seed: int, device) -> dict:
    """generate() keyword arguments for `sampling` (do_sample, temperature, top_k, top_p, min_p, others passed
    on). A sample is drawn from a torch.Generator of its own (after temperature/top-k/top-p/min-p) and greedy
    decoding takes the drawn token, so the global RNG, which training in another thread may be using, is never
    touched, and a seed gives the same answers. Wrong settings (a temperature of 0) raise ValueError here."""
    import torch
    from transformers import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    rest = dict(sampling)
    knobs = {k: rest.pop(k, None) for k in ("temperature", "top_k", "top_p", "min_p")}
    if not rest.pop("do_sample", True):
        return {"do_sample": False, **rest}
    warpers = ((TemperatureLogitsWarper, "temperature", float), (TopKLogitsWarper, "top_k", int),
               (TopPLogitsWarper, "top_p", float), (MinPLogitsWarper, "min_p", float))
    processors = [cls(kind(knobs[k])) for cls, k, kind in warpers if knobs[k] is not None]
    generator = torch.Generator(device=device).manual_seed(int(seed))

    def draw(input_ids, scores):
        picked = torch.multinomial(torch.softmax(scores.float(), dim=-1), 1, generator=generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, picked, 0.0)

    return {"do_sample": False, "logits_processor": LogitsProcessorList([*processors, draw]), **rest}


def stopping(stop: threading.Event):
    """generate() stops at the next token once `stop` is set (a closing caller need not wait for a whole answer)."""
    import torch
    from transformers import StoppingCriteriaList

    def stopped(input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([stopped])


# -- sources of answers -------------------------------------------------------------------------------------
def model_of(source: Any) -> str | None:
    """The model name or run folder a source generates with (None for a function)."""
    return None if callable(source) else str(source["model"]) if isinstance(source, dict) else str(source)


def source_name(source: Any) -> str:
    if callable(source):
        return f"{getattr(source, '__module__', None) or '?'}.{getattr(source, '__qualname__', type(source).__name__)}"
    return model_of(source)


def check_source(source: Any) -> None:
    """Refuse what cannot answer. A source is a function prompt -> answer text, a model name or run folder, or
    {"model": name or folder, "system": text, "sampling": {...}} (system and sampling optional). A missing
    folder or an unfinished run is refused now, not when the first answer is due."""
    if callable(source):
        return
    if isinstance(source, dict):
        system, sampling = source.get("system"), source.get("sampling")
        if (set(source) - set(SOURCE_KEYS) or not isinstance(source.get("model"), (str, Path)) or not (
                system is None or (isinstance(system, str) and system.strip())) or not isinstance(sampling, (dict, type(None)))):
            raise NbalignError(f"The source {source!r} is not a model with a system message or sampling of its own.",
                               "use the keys 'model' (a name or run folder), 'system' (text) and 'sampling' (a dict), "
                               "e.g. {'model': 'smollm2-135m', 'system': 'Answer in one short sentence.'}.")
    name = model_of(source) if isinstance(source, (str, dict)) else None
    if not name or not name.strip():
        raise NbalignError(f"{source!r} is not a model to generate answers with.",
                           "pass a model name, a run folder, {'model': ..., 'system': ...}, or a function "
                           "prompt -> answer text.")
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        from .models import resolve

        resolve(name)


def check_sampling(sampling: dict, source: Any = None) -> dict:
    """Sampling settings for a source, do_sample on unless they say otherwise; a temperature of 0 or a top_p of 2
    is refused here."""
    settings = {"do_sample": True, **sampling}
    if not callable(source):
        try:
            decoding(settings, 0, "cpu")
        except (TypeError, ValueError) as exc:
            raise NbalignError(f"sampling={settings!r} cannot be used: {exc}",
                               "e.g. {'temperature': 0.8, 'top_p': 0.95}, or {'do_sample': False} for greedy.") from None
    return settings


def answers_from(source: Any, prompt: Any, n: int, load, seed: int = 0, sampling: dict | None = None,
                 max_new_tokens: int = 128, stop: threading.Event | None = None) -> tuple[list[str] | None, dict | None]:
    """(n answers to `prompt`, where they came from: the function, or model, adapter, system and sampling), or
    (None, None) when `stop` was set meanwhile. `load(name)` gives a model's (model, tokenizer)."""
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
    if callable(source):
        texts = [source(prompt) for _ in range(n)]
        wrong = next((t for t in texts if not isinstance(t, str)), "")
        if not isinstance(wrong, str):
            raise NbalignError(f"The answer function {source_name(source)} returned {type(wrong).__name__}, not text.",
                               "make it return the answer as a string.")
        return texts, {"function": source_name(source), "time": when}
    from .models import resolve

    name, system = model_of(source), source.get("system") if isinstance(source, dict) else None
    sampling = {"do_sample": True, **(sampling or {})}
    model, tokenizer = load(name)
    texts = generate_with(model, tokenizer, [prompt] * n, max_new_tokens=max_new_tokens, seed=seed, stop=stop,
                          system=system, **sampling)
    if stop is not None and stop.is_set():
        return None, None
    ref = resolve(name)
    where = {"model": name, "adapter": ref.parents[-1] if ref.parents else None}
    return texts, {**where, **({"system": system} if system is not None else {}),
                   "sampling": {**sampling, "max_new_tokens": max_new_tokens, "seed": seed}, "time": when}
