"""How much memory a run will need, worked out before anything is loaded, and whether the device has it.

The estimate is built from the model's architecture (read on the meta device: no weights), the adapter, the
method and the largest batch the run will train on: the batches the trainer will draw from the data, each padded
or flattened as the run will (batching.largest_batch), so ragged rows count their own tokens, not the longest's:

- weights: every parameter in the number format it is loaded in (fp32 on a CPU, bf16 on CUDA; NF4 linear
  layers with 4-bit QLoRA), plus a second copy for a method that keeps a separate reference model;
- training state: each trainable parameter's gradient and AdamW's two moments, in fp32;
- activations: what the backward pass keeps for each token of the largest batch, layer by layer (the inputs of
  every linear layer and norm, queries, keys and values, the attention output, the MLP's four intermediate
  vectors, and each adapted layer's dropped-out input), in the compute format (bf16 under autocast), plus the
  head's log-probs on the tokens the loss reads;
- generation (online RL): the KV cache of every completion generated for one step;
- evaluation (the watch of SFT, DPO and KTO, between steps, when a step's activations are gone): its scoring's
  log-probabilities (at most SCORING_TENSORS tensors of scoring.ROW_BYTES) and the KV cache of one batch of
  answers; only what it needs beyond a training step's activations and head is added.

On the CPU the figure is what the run adds to the process (its resident set before loading the model is not
counted: Python and the libraries); it is checked against the measured peak in tests/test_memory.py. On CUDA it
is the allocator's peak. A run whose estimate does not fit in the free memory stops before loading, with the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import NbalignError
from .generation import BATCH

MiB = 2**20


@dataclass
class Estimate:
    """Bytes a run needs, by part, and what the device has free."""

    parts: dict = field(default_factory=dict)
    available: int | None = None
    where: str = "memory"

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    def __str__(self) -> str:
        shown = ", ".join(f"{name} {value / MiB:,.0f}" for name, value in self.parts.items() if value >= MiB / 2)
        free = f" of {self.available / MiB:,.0f} MiB free" if self.available is not None else ""
        return f"about {self.total / MiB:,.0f} MiB{free} ({shown} MiB)"


def architecture(skel) -> dict:
    """The sizes the estimate needs, from a model on the meta device."""
    config = skel.config.get_text_config() if hasattr(skel.config, "get_text_config") else skel.config
    hidden = config.hidden_size
    heads = getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return {
        "hidden": hidden,
        "intermediate": getattr(config, "intermediate_size", 4 * hidden),
        "layers": config.num_hidden_layers,
        "kv_width": kv * head_dim,
        "q_width": heads * head_dim,
        "vocab": config.vocab_size,
        "params": sum(p.numel() for p in skel.parameters()),
    }


def linear_layers(skel, adapter=None) -> list:
    """The linear layers an adapter can target (lm_head excluded, as peft's all-linear does), or those `adapter`
    targets."""
    targets = getattr(adapter, "target_modules", None)
    names = None if targets in ("all-linear", None) else ({targets} if isinstance(targets, str) else set(targets))
    return [module for name, module in skel.named_modules()
            if type(module).__name__ == "Linear" and not name.endswith("lm_head")
            and (names is None or name.rsplit(".", 1)[-1] in names)]


def activation_elements(arch: dict, adapter, adapted: list) -> int:
    """Values the backward pass keeps per token and layer (see the module's list); `adapted`: the adapted layers,
    each of which keeps its dropped-out input."""
    h, i, q, kv = arch["hidden"], arch["intermediate"], arch["q_width"], arch["kv_width"]
    # Two norms (input and output each), q/k/v before and after the rotation, the attention's output and its
    # log-sum-exp, the output projection's input, and the MLP's gate, up, activation and product.
    kept = 4 * h + 2 * (q + 2 * kv) + 2 * q + h + 4 * i
    if adapter.type in ("lora", "dora") and adapter.dropout > 0:
        kept += sum(m.in_features for m in adapted) // arch["layers"]
    return kept


def trainable(skel, adapter) -> int:
    """Parameters the optimizer updates: all of them for full fine-tuning; r x (in + out) per adapted linear layer
    for LoRA (plus DoRA's magnitude vector, one value per output); one scale per key, value and MLP input for IA3;
    the virtual tokens' vectors for prefix (keys and values in every layer) and prompt tuning."""
    if adapter.type == "full":
        return sum(p.numel() for p in skel.parameters())
    if adapter.type in ("ia3", "prefix", "prompt"):
        arch = architecture(skel)
        if adapter.type == "prompt":
            return adapter.virtual_tokens * arch["hidden"]
        if adapter.type == "prefix":
            return adapter.virtual_tokens * arch["layers"] * 2 * arch["kv_width"]
        return arch["layers"] * (2 * arch["kv_width"] + arch["intermediate"])  # keys, values, MLP input
    return sum(adapter.r * (m.in_features + m.out_features) + (m.out_features if adapter.type == "dora" else 0)
               for m in linear_layers(skel, adapter))


# The evaluation's working set: answers are generated generation.BATCH prompts at a time, and its scoring
# reads up to 8 sequences at a time in chunks of at most scoring.ROW_BYTES of fp32 log-probs, holding a forward's
# logits, the policy's and the reference's log-probs (scoring.answer_kl) and temporaries: 5 chunks' worth, measured
# (SmolLM2-135M with LoRA, one row per step: 619 MiB above weights and optimizer for SFT's watch, 927 for DPO's).
EVAL_BATCH, SCORING_ROWS, SCORING_TENSORS = BATCH, 8, 5
# The share of SFT's bytes per counted value that the peak of a preference or reward step holds (their saved
# activations per token are SFT's; SFT's backward holds more besides). Measured on the benchmark's ragged data
# (bf16 autocast, SmolLM2-135M, LoRA, every batch as the run drew it): bytes per counted value, SFT 4.5, DPO 3.0,
# the reward model 2.8, KTO 2.6; on tests/test_memory.py's rows SFT 4.8, DPO 3.1. On CUDA (H100, bf16)
# DPO's peak matched SFT's bytes per value (estimate / peak 1.03 without this share): it applies on the CPU only.
PAIRS_KEPT = 0.75


def estimate(skel, adapter, device, *, sequences: int, length: int, tokens: int | None = None,
             loss_tokens: int | None = None, reference_copy: bool = False, generated: int = 0,
             checkpointing: bool = False, evaluated: int = 0, kept: float = 1.0) -> Estimate:
    """The peak memory of training `sequences` sequences of `length` tokens at once (the largest batch; `tokens`:
    the tokens it computes where that is not sequences x length, a flattened batch of ragged rows; `kept`: the
    share of SFT's bytes per counted value the method's peak holds, below);
    `checkpointing`: activation checkpointing keeps each layer's input and recomputes one layer at a time;
    `evaluated`: the watch answers prompts of up to `length` tokens with this many new tokens each (0: no watch)."""
    from .scoring import ROW_BYTES
    arch = architecture(skel)
    params = arch["params"]
    weight_bytes = 2 if device.bf16 else 4
    quantized = sum(m.weight.numel() for m in linear_layers(skel)) if getattr(adapter, "quantize", None) else 0
    weights = (params - quantized) * weight_bytes + quantized * (0.5 + 1 / 64)
    updated = trainable(skel, adapter)
    tokens = sequences * length if tokens is None else tokens
    # Bytes per counted value, measured on SmolLM2-135M (tests/test_memory.py checks them), with nbalign's CPU LM
    # head and dropout and per-example attention on flattened rows (fastpaths.py). On a CPU with bf16 autocast, 4:
    # peaks of 2,745 MiB for 4 x 200 tokens of SFT and 2,394 for DPO's 4 x 240, this count gave 2,452 and 2,826
    # (DPO keeps fewer bytes per counted value than SFT: 3.1 against 4.8; with PAIRS_KEPT since, 2,356). In fp32
    # (no autocast): 5.5 (3,346 and 3,122 MiB measured, 3,039 and 3,529 estimated). On the benchmark's ragged rows
    # (bench/data.py, 32 rows in batches of 8, every batch as drawn), estimate / peak with bf16 autocast: SFT 1.05,
    # DPO 1.02, KTO 1.15, the reward model 1.00 (SFT 2.23 and the reward model 3.34 before the batches were worked
    # out: each taken as its rows times the longest); in fp32 0.85, 0.93, 0.95, 0.91. Before attention ran per
    # example on a CPU, sdpa's masked square of a flattened row added about 450 MiB to DPO's peak (5 and 7 bytes were
    # fitted with it). On CUDA in bf16
    # (H100): 2.0, the count in bf16 (LoRA 12,050 MiB measured at 32 x 360 tokens, 11,991 estimated; full
    # fine-tuning 10,232 and 10,154).
    compute_bytes = 2.0 if device.bf16 else 4 if device.amp else 5.5
    if getattr(adapter, "quantize", None):
        compute_bytes *= 1.25  # 4-bit layers keep their dequantised inputs too: 15,014 MiB vs LoRA's 12,050 (H100)
    adapted = linear_layers(skel, adapter) if adapter.type in ("lora", "dora") else []
    per_layer = activation_elements(arch, adapter, adapted)
    per_token = (arch["hidden"] * arch["layers"] + per_layer if checkpointing else per_layer * arch["layers"]) \
        * compute_bytes
    loss_tokens = tokens if loss_tokens is None else loss_tokens
    kv_bytes = arch["layers"] * 2 * arch["kv_width"] * (2 if device.bf16 else 4)  # a token's keys and values
    parts = {
        "weights": weights,
        "reference": weights if reference_copy else 0,
        # fp32 gradient and AdamW's two moments (and the weight itself for an adapter's new parameters).
        "gradients and optimizer": updated * (12 if adapter.type == "full" else 16),
        "activations": tokens * per_token * (kept if device.type == "cpu" else 1.0),  # CUDA: see PAIRS_KEPT
        # The head runs in tiles over the tokens the loss reads: one tile of logits, and each token's log-prob.
        "head": min(loss_tokens, 1024) * arch["vocab"] * 4 * 2 if loss_tokens else 0,
        "generation": generated * kv_bytes,
    }
    if evaluated:
        chunk = min(ROW_BYTES, SCORING_ROWS * (length + evaluated) * arch["vocab"] * 4)
        needs = SCORING_TENSORS * chunk + EVAL_BATCH * (length + evaluated) * kv_bytes
        parts["evaluation"] = max(0, needs - parts["activations"] - parts["head"] - parts["generation"])
    if device.type == "cpu" and device.amp and adapter.type == "full":
        parts["weights"] += params * 2  # autocast's bf16 copies of trainable weights, kept for the step
    return Estimate({k: int(v) for k, v in parts.items() if v}, available(device), str(device))


def available(device) -> int | None:
    """Free memory on the device: CUDA's free bytes, or the CPU's available memory (within a cgroup's limit).
    NBALIGN_MEMORY_LIMIT (bytes, or with a MiB/GiB suffix) overrides it."""
    forced = os.environ.get("NBALIGN_MEMORY_LIMIT")
    if forced:
        return parse_bytes(forced)
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    if device.type != "cpu":
        return None
    free = _meminfo_available()
    limit = _cgroup_free()
    values = [v for v in (free, limit) if v is not None]
    return min(values) if values else None


def parse_bytes(text: str) -> int:
    value = text.strip().lower()
    for suffix, scale in (("gib", 2**30), ("gb", 10**9), ("mib", MiB), ("mb", 10**6), ("kib", 1024)):
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * scale)
    return int(float(value))


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_free() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="utf-8") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current", encoding="utf-8") as f:
            used = int(f.read().strip())
        return int(limit) - used
    except (OSError, ValueError):
        return None


def check(est: Estimate, where: str, batch_size: int, max_length: int, quantized: bool, split: bool = False) -> None:
    """Stop before loading when the run will not fit, naming the fixes that would make it fit (`split`: fewer
    rows per step with accumulation were tried already and did not fit either)."""
    if est.fits():
        return
    fixes = []
    if not quantized:
        fixes.append("`%%lora quantize: 4bit` (QLoRA: the base weights take about a quarter)")
    fixes.append(f"a shorter max_length (now {max_length})")
    if split:
        fixes.append("a smaller model (one row per step with gradient accumulation and activation checkpointing does "
                     "not fit either)")
    elif batch_size > 1:
        fixes.append(f"a smaller batch_size with gradient_accumulation_steps to keep the effective batch "
                     f"(e.g. batch_size: {max(1, batch_size // 4)}, gradient_accumulation_steps: "
                     f"{batch_size // max(1, batch_size // 4)})")
    raise NbalignError(
        f"{where}: this run needs {est}, more than the {est.where} has free "
        f"({est.available / MiB:,.0f} MiB); it was stopped before loading the model.",
        "try " + "; or ".join(fixes) + ".",
    )


def fit_batch(needed, batch_size: int, min_rows: int | None, chosen, name: str, where: str, max_length: int,
              quantized: bool) -> tuple[Estimate, int, bool]:
    """The estimate, rows per step and activation checkpointing a run trains with. `needed(rows, checkpointing)`
    estimates one step. A batch that does not fit is split into the most rows per step that fit (down to
    `min_rows`; None: never split), the rest made up by gradient accumulation: the same effective batch, the same
    training. Where no split fits, activations are checkpointed (about a third more compute), unless the cell
    `chosen` either way. A run that will not fit even so stops here, with the fix."""
    need = needed(batch_size, bool(chosen))
    if need.fits():
        return need, batch_size, bool(chosen)
    sizes = [r for r in range(batch_size, (min_rows or batch_size) - 1, -1) if batch_size % r == 0]
    for checkpointing in ([False, True] if chosen is None else [bool(chosen)]):
        for rows in sizes:
            if (smaller := needed(rows, checkpointing)).fits():
                how = [f"{rows} rows per step with {batch_size // rows} accumulation steps (the same effective "
                       "batch)"] if rows < batch_size else []
                how += ["activation checkpointing (about a third more compute)"] if checkpointing and not chosen else []
                print(f"{name}: a batch of {batch_size} needs {need.total / MiB:,.0f} MiB, more than the "
                      f"{need.available / MiB:,.0f} MiB free; training with {' and '.join(how)}.", flush=True)
                return smaller, rows, checkpointing
    check(need, where, batch_size, max_length, quantized, split=len(sizes) > 1)
    return need, batch_size, bool(chosen)


def needed_for(method, spec, skel, device, tokenizer, prepared, extra: dict, steps: int, sampling: str = "random"):
    """A training run's peak memory, estimated before loading, the rows per step and whether activations are
    checkpointed: `fit_batch` over the method's largest batch (`method.memory_shape`; accumulation does not add to
    it), its tokens as the run will pad or flatten them (batching.largest_batch) over its `steps` steps, drawn in
    the order of `sampling` (the config's train_sampling_strategy)."""
    import copy

    from .batching import largest_batch

    costs = flattening_costs(skel, device, spec)
    trained = steps * max(1, extra.get("gradient_accumulation_steps") or 1) * spec.batch_size  # rows trained
    seed = extra["data_seed"] if extra.get("data_seed") is not None else spec.seed
    shapes: dict[int, dict] = {}  # by rows per step: memory_shape tokenises every row

    def needed(rows: int, checkpointing: bool):
        if rows not in shapes:
            smaller = copy.copy(spec)  # the spec's checks already ran; only the rows per step differ
            smaller.batch_size = rows
            shape = shapes[rows] = method.memory_shape(smaller, tokenizer, prepared)
            units = shape.pop("units", None)  # each example's sequence lengths
            if units:
                shape["tokens"] = largest_batch(units, rows, -(-trained // rows), costs, spec.padding_free, seed,
                                                sampling)
        evaluated = spec.eval_max_new_tokens if getattr(spec, "watch", False) else 0  # SFT, DPO, KTO's watch
        return estimate(skel, spec.lora, device, checkpointing=checkpointing, evaluated=evaluated, **shapes[rows])

    split = None if extra.get("gradient_accumulation_steps") else method.min_micro_batch
    return fit_batch(needed, spec.batch_size, split,
                     extra.get("activation_checkpointing", extra.get("gradient_checkpointing")),
                     f"nbalign {method.name}", spec.where, spec.max_length, bool(spec.lora.quantize))


def flattening_costs(skel, device, spec):
    """The costs by which the run will pad or flatten each batch (batching.Flattening), or None where it never
    flattens: padding_free false, virtual-token adapters, attention that ignores example boundaries (packed rows
    give the estimate no `units` to price)."""
    if getattr(spec, "padding_free", False) is False or spec.lora.type in ("prefix", "prompt"):
        return None
    from dataclasses import replace

    from .batching import layer_costs, segments_apply, supports_flattening

    if not supports_flattening(skel):
        return None
    costs = layer_costs(skel.config)
    return replace(costs, per_example=costs.per_example or segments_apply(skel.config, device))


class PeakMeter:
    """The peak memory a run adds, measured: CUDA's allocator peak, or on Linux the process's peak resident set
    (reset when the run starts, through /proc/self/clear_refs) above what it held before loading."""

    def __init__(self, device):
        self.device, self.before = device, None
        try:
            if device.type == "cuda":
                import torch

                torch.cuda.reset_peak_memory_stats()
                self.before = torch.cuda.memory_allocated()
            else:
                with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
                    f.write("5")
                self.before = _status("VmRSS:")
        except (OSError, ImportError, RuntimeError):
            self.before = None

    def peak(self) -> int | None:
        if self.before is None:
            return None
        if self.device.type == "cuda":
            import torch

            return int(torch.cuda.max_memory_allocated() - self.before)
        high = _status("VmHWM:")
        return high - self.before if high is not None else None


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith(field)), None)
    except OSError:
        return None
