"""SFT batches without the padding that costs more than it saves.

A batch of rows of different lengths is either padded to its longest row (TRL's default) or flattened into one
row with position ids restarting at each example ("padding-free": no padding token is computed). Both give the
same loss and the same gradients: with no attention mask and no cache, transformers (>= 5) reads the example
boundaries from the position ids and masks attention between examples (sdpa, eager, flex) or passes them to the
varlen kernels (flash attention); tests/test_batching.py checks the logits agree. What differs is the work:
padding computes every layer on tokens nobody reads; flattening lets sdpa's CPU kernel span the whole flattened
row (the masked part included), which is why a CPU training model attends each example on its own instead
(fastpaths.attend_by_segment, priced by `Costs.per_example`). `PadOrFlatten` prices both for each batch from the
model's shape and takes the cheaper, so a batch of a few long and many short chats is flattened and, where
attention spans the row, a batch of equal lengths stays padded.

The preference trainers build their padded batches themselves (TRL 1.16 has padding-free DPO switched off), so
`flatten_padded_forward` does the same one level down: it wraps the model's forward, flattens a padded batch it
is handed (attention mask in, position ids out), and puts every per-token output back in the padded shape, where
the trainer reads it. Padded positions come back as zeros, which is what the trainers' masks make of them.
"""

from __future__ import annotations

from dataclasses import dataclass

# nbalign's CPU attention for training (fastpaths.attend_by_segment): each example of a flattened row on its own.
SEGMENTS = "nbalign_segments"
# Attention implementations that read example boundaries from position ids when there is no attention mask.
BOUNDARY_AWARE = {"sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", SEGMENTS}
# Those that attend within each example only, so a flattened row costs no cross-example pairs.
PER_EXAMPLE = {SEGMENTS, "flash_attention_2", "flash_attention_3"}
# Forward arguments the flattening wrapper knows how to carry over; a call with any other (position ids, a cache,
# logits_to_keep, embeddings) runs as it came.
UNDERSTOOD = {"input_ids", "attention_mask", "labels", "shift_labels", "fused_lm_head", "use_cache", "return_dict",
              "output_router_logits", "num_items_in_batch"}


# Decoders checked to run every attention through transformers' attention interface with no special case for the
# name "sdpa" (Falcon branches on that name; Gemma 4's shared key/value layers slice their inputs unless it is
# sdpa), no mask overlays (multimodal models) and causal self-attention.
SEGMENT_MODELS = ("llama", "mistral", "qwen2", "qwen3")


def segments_apply(config, device) -> bool:
    """Whether a training model of this config on `device` attends each example of a flattened row on its own
    (fastpaths.use_segment_attention); also read by the memory estimate before anything is loaded."""
    return device.type == "cpu" and config is not None and getattr(config, "_attn_implementation", None) == "sdpa" \
        and getattr(config, "model_type", None) in SEGMENT_MODELS and not getattr(config, "sub_configs", None)


@dataclass(frozen=True)
class Costs:
    """Multiply-adds of one layer: per token through its linear maps, per (query, key) pair in attention."""

    per_token: float
    per_pair: float
    per_example: bool = False  # attention computed within each example of a flattened row (PER_EXAMPLE)
    window: int | None = None  # a sliding window: per example only where every example fits in it

    def rows(self, n: int, width: int) -> float:
        """`n` rows of `width` tokens each (a padded batch whatever its padding side)."""
        return n * width * (self.per_token + width * self.per_pair)

    def flattened(self, lengths: list[int]) -> float:
        return self.summed(sum(lengths), sum(n * n for n in lengths), max(lengths))

    def summed(self, total, squares, longest):
        """`flattened` from the lengths' sum, sum of squares and maximum (numbers, or numpy arrays of them)."""
        alone = self.per_example * (longest <= self.window if self.window else 1)  # each example attended alone
        return total * self.per_token + (alone * squares + (1 - alone) * total * total) * self.per_pair


def layer_costs(config) -> Costs:
    """The per-layer costs of a decoder from its config (hidden size, MLP width, heads): q/k/v/o and a gated
    MLP per token; QK^T and the weighted sum of V per attended pair."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = cfg.hidden_size
    heads = getattr(cfg, "num_attention_heads", 1) or 1
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv = (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
    mlp = getattr(cfg, "intermediate_size", None) or 4 * hidden
    per_token = hidden * (heads * head_dim) * 2 + hidden * kv * 2 + 3 * hidden * mlp
    return Costs(per_token=float(per_token), per_pair=float(2 * heads * head_dim),
                 per_example=getattr(config, "_attn_implementation", None) in PER_EXAMPLE,
                 window=getattr(cfg, "sliding_window", None))


def supports_flattening(model) -> bool:
    """Whether `model` reads example boundaries from position ids (a transformers decoder on an attention
    implementation that does)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) if config is not None else None
    # Prefix and prompt tuning put virtual tokens before each row: a flattened row would have one prefix for all.
    prompt_learning = any(getattr(c, "is_prompt_learning", False) for c in getattr(model, "peft_config", {}).values())
    return impl in BOUNDARY_AWARE and not prompt_learning


class Flattening:
    """The choice for each batch, padded or flattened, whichever `costs` prices lower (`mode` True or False forces
    one), and its record: batches of each kind, and the tokens computed against those padding would compute."""

    def __init__(self, costs: Costs, mode="auto"):
        self.costs, self.mode = costs, mode
        self.flattened = self.padded = 0
        self.tokens_computed = self.tokens_if_padded = 0

    def decide(self, lengths: list[int], width: int) -> bool:
        """Whether rows of `lengths` tokens, padded to `width`, run flattened."""
        return bool(flattens(self.costs, self.mode, len(lengths), sum(lengths), sum(n * n for n in lengths),
                             max(lengths), width))

    def record(self, flat: bool, lengths: list[int], width: int) -> None:
        self.flattened += flat
        self.padded += not flat
        self.tokens_computed += sum(lengths) if flat else len(lengths) * width
        self.tokens_if_padded += len(lengths) * width

    def summary(self) -> dict:
        """Batches flattened and padded, and the share of padded work the flattening saved."""
        saved = 1 - self.tokens_computed / self.tokens_if_padded if self.tokens_if_padded else 0.0
        return {"batches_flattened": self.flattened, "batches_padded": self.padded, "padding_saved": round(saved, 3)}


def flattens(costs: Costs, mode, count, total, squares, longest, width):
    """The flattening rule, for one batch or (numpy arrays) many: `count` sequences of `total` tokens, their
    squares summing to `squares`, the longest `longest`, padded to `width`. Never a single sequence; else as
    `mode` forces, or where `costs` prices the flattened row lower."""
    chosen = costs.summed(total, squares, longest) < costs.rows(count, width) if mode == "auto" else bool(mode)
    return (count > 1) & chosen


class PadOrFlatten(Flattening):
    """Data collator for tokenised SFT rows (`input_ids`, `labels`): each batch padded to its longest row or
    flattened, as `Flattening` decides and records."""

    def __init__(self, pad_token_id: int, costs: Costs, mode="auto"):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        super().__init__(costs, mode)
        self._pad = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)
        self._flat = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)

    def flatten(self, lengths: list[int]) -> bool:
        return self.decide(lengths, max(lengths))

    def __call__(self, examples: list[dict]) -> dict:
        lengths = [len(e["input_ids"]) for e in examples]
        flat = self.flatten(lengths)
        self.record(flat, lengths, max(lengths))
        return (self._flat if flat else self._pad)(examples)


def _score_head(model):
    """The sequence classifier's head (transformers names it `score`; PEFT wraps it to train and save it)."""
    heads = [(name, module) for name, module in model.named_modules() if name.split(".")[-1] == "score"]
    return min(heads, key=lambda item: len(item[0]))[1] if heads else None


def flatten_padded_forward(model, costs: Costs, mode="auto", pooled: bool = False) -> Flattening:
    """Wrap `model.forward` (in place) so that a right-, left- or un-padded batch with an attention mask is run
    flattened where that computes less (`mode` as Flattening). `pooled`: a sequence classifier, whose score is
    read, as transformers reads it, at each row's rightmost token that is not the pad token. Returns the counter
    of batches seen."""
    import functools

    import torch

    counter = Flattening(costs, mode)
    forward = model.forward

    @functools.wraps(forward)
    def flat_forward(*args, **kwargs):
        if args and args[0] is model:  # accelerate's unwrap_model re-binds the forward it finds as a method
            args = args[1:]
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        plain = (args or ids is None or mask is None or ids.dim() != 2 or mask.shape != ids.shape
                 or any(v is not None for k, v in kwargs.items() if k not in UNDERSTOOD))
        if plain:
            return forward(*args, **kwargs)
        keep = mask.bool()
        lengths = keep.sum(1)
        first = keep.int().argmax(1)
        contiguous = bool(((keep.int().flip(1).argmax(1) * -1 + keep.shape[1] - first) == lengths).all())
        n, width = ids.shape
        flat = contiguous and bool((lengths > 0).all()) and counter.decide(lengths.tolist(), width)
        counter.record(flat, lengths.tolist(), width)
        if not flat:
            return forward(*args, **kwargs)
        positions = (keep.cumsum(1) - 1).clamp(min=0)
        flat_kwargs = {k: v for k, v in kwargs.items() if k != "attention_mask"}
        flat_kwargs["input_ids"] = ids[keep][None]
        flat_kwargs["position_ids"] = positions[keep][None]
        for key in ("labels", "shift_labels"):
            if kwargs.get(key) is not None:
                flat_kwargs[key] = kwargs[key][keep][None]
        if kwargs.get("labels") is not None:  # a row's first token is never predicted from the row before it
            flat_kwargs["labels"] = flat_kwargs["labels"].masked_fill(flat_kwargs["position_ids"] == 0, -100)
        index = torch.full_like(ids, -1)
        index[keep] = torch.arange(int(lengths.sum()), device=ids.device)
        if pooled:
            return pooled_forward(flat_kwargs, ids, keep, index)
        out = forward(**flat_kwargs)
        total = int(lengths.sum())
        for name, value in list(out.items()):
            if not torch.is_tensor(value) or value.dim() < 2 or value.shape[0] != 1:
                continue
            if value.shape[1] == total:  # one value per token: logits, hidden states
                full = value.new_zeros((n, width, *value.shape[2:]))
                full[keep] = value[0]
            elif value.shape[1] == total - 1:  # one per predicted next token (fused head): positions t -> t + 1
                both = keep[:, :-1] & keep[:, 1:]
                full = value.new_zeros((n, width - 1, *value.shape[2:]))
                full[both] = value[0][index[:, :-1][both]]
            else:
                continue
            out[name] = full
        return out

    def pooled_forward(flat_kwargs, ids, keep, index):
        head, scores = _score_head(model), []
        hook = head.register_forward_hook(lambda module, args, output: scores.append(output))
        try:
            out = forward(**flat_kwargs)
        finally:
            hook.remove()
        pad = model.config.get_text_config().pad_token_id if hasattr(model.config, "get_text_config") else None
        readable = keep & (ids != pad) if pad is not None else keep
        readable = torch.where(readable.any(1, keepdim=True), readable, keep)
        columns = torch.arange(ids.shape[1], device=ids.device)
        last = (columns * readable).argmax(1)
        out["logits"] = scores[-1][0][index[torch.arange(ids.shape[0], device=ids.device), last]]
        return out

    model.forward = flat_forward
    return counter


def largest_batch(units: list[tuple[int, ...]], rows: int, batches: int, costs: Costs | None, mode="auto",
                  seed: int = 42, sampling: str = "random") -> int:
    """Tokens the largest of a run's first `batches` batches computes (`drawn_batches`): the memory estimate's
    batch, worked out before anything is loaded. Past 1,000 epochs (which `drawn_batches` does not draw) the
    longest examples' batch stands for the rest."""
    top = max(drawn_batches(units, rows, batches, costs, mode, seed, sampling), default=0)
    if batches > 1000 * -(-len(units) // rows):
        top = max(top, drawn_batches(units, rows, 1, costs, mode, seed, "longest first")[0])
    return top


def drawn_batches(units: list[tuple[int, ...]], rows: int, batches: int, costs: Costs | None, mode="auto",
                  seed: int = 42, sampling: str = "random") -> list[int]:
    """Tokens each of a run's first `batches` batches computes, in the order the trainer draws them.

    `units`: each training example's sequence lengths (one for SFT and KTO, both answers of a pair). The batches are
    the ones the trainer will draw, `rows` examples at a time (the last batch of an epoch short), in the order of
    its `sampling` (transformers' train_sampling_strategy): "random", accelerate's seedable sampler, whose order in
    epoch e is `torch.randperm(len(units))` seeded with seed + e (the run's seed or data_seed); "sequential" (KTO's
    default), the data's order; any other (length-grouped or rebalanced batches, rows TRL reshuffles first), the
    longest examples together: a bound for length-grouped batches, a guess otherwise. Not modelled: several
    processes (accelerate deals the batches out and fills the last round from the epoch's start).
    tests/test_memory.py checks the order against runs'. Each batch is padded to its longest sequence or, with
    `costs` (None: never), flattened where `Flattening` would flatten it."""
    import numpy as np
    import torch

    lengths = np.zeros((len(units) + 1, max(len(u) for u in units)), dtype=np.int64)  # the last row: none
    for i, unit in enumerate(units):
        lengths[i, :len(unit)] = unit
    n = len(units)
    per_epoch = -(-n // rows)
    out, left = [], batches
    for epoch in range(min(-(-batches // per_epoch), 1000)):  # see largest_batch
        if sampling == "random":
            generator = torch.Generator()
            generator.manual_seed(seed + epoch)
            drawn = torch.randperm(n, generator=generator).numpy()
        else:
            drawn = np.arange(n) if sampling == "sequential" else np.argsort(-lengths[:n].sum(1), kind="stable")
        order = np.concatenate([drawn, np.full(per_epoch * rows - n, n)])
        held = lengths[order].reshape(per_epoch, -1)[:left]
        left -= len(held)
        width, count = held.max(1), (held > 0).sum(1)
        total, squares = held.sum(1), (held * held).sum(1)
        flat = False if costs is None else flattens(costs, mode, count, total, squares, width, width)
        out += np.where(flat, total, count * width).tolist()
    return out
