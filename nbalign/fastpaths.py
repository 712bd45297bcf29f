"""Places where a CPU training step spent its time on work that need not be done.

Training code imports this module (it imports torch); nothing on the way to `%load_ext nbalign` does.

**The LM head.** TRL (>= 1.16) gives every trainer a fused LM head: the per-token log-probabilities of the labels,
computed in tiles without the `[tokens, vocab]` logits. On CUDA a Triton kernel folds the tiles and only the
positions whose label is read are scored. Without Triton (a CPU) TRL scores every position, prompt and padding
included, and folds each tile with a dozen element-wise fp32 passes; on SmolLM2-135M (8 x 594 tokens, bf16
autocast) that head took 16.7 s of a 39 s SFT step. `install_head()` swaps in, for CPU tensors only, `CpuLogProbs`:
only the read positions, one matrix multiply per block of rows in the compute dtype (bf16 under autocast, as
TRL's), then a fused `log_softmax` and the requested statistics (entropy, log sum p^2, mean logit, top-1) in fp32;
the backward recomputes the block, as TRL's does, so the logits are never kept. 2.9 s instead of 16.7 s, TRL's
values and gradients to rounding (tests/test_fastpaths.py). CUDA keeps TRL's kernel; a TRL without the two names
this replaces keeps its own head (`install_head` returns False: slower, not wrong).

**LoRA dropout.** peft's `nn.Dropout` draws one random number per value of every adapted layer's input
(`bernoulli_`): 4.3 s of that step. `WordDropout` draws 64 random bits for four values: the same regulariser
(p kept to 1/32768), 0.7 s.

**Frozen weights under autocast.** Autocast casts a weight to bf16 at every forward pass and keeps a cast only
of a leaf that trains, so every frozen base weight of a LoRA model (106 M values on SmolLM2-135M) was cast again
at each pass: the policy's and the reference's forward in a preference step, and every token generated under
autocast (an RL step's rollouts are not: accelerate's unwrapped model generates in fp32). `cast_frozen_once`
makes a CPU model's frozen `nn.Linear`s take their bf16 copy from `_cast` (made once per run, as for the head),
the same values autocast would make: the same numbers, bit for bit.
Measured (one thread, bf16 CPU): 32 tokens for 8 prompts under autocast 4.9 s -> 3.6 s; a LoRA SFT step of 8 x
60 tokens 3.2 s -> 3.05 s.

**Attention across a flattened row.** A flattened batch (nbalign/batching.py) is one row whose position ids restart
at each example; transformers' sdpa masks attention between the examples, but the CPU's kernel still computes the
whole row's causal square, masked part included: for eight examples of 60 tokens, 480^2 / 2 query-key pairs where
the examples hold 8 x 60^2 / 2. `use_segment_attention` gives a CPU training model an attention implementation
that runs each example as its own causal attention (the same kernel, the same numbers to rounding) and hands
everything else (padded batches, generation with a cache) to transformers' sdpa unchanged. Under bf16 autocast it
runs in fp32: the CPU kernel's bf16 backward took three times as long on 60-token examples (an SFT step of 8 x 60
tokens spent 15% of its time there; 4% in fp32).
"""

from __future__ import annotations

import contextlib
import weakref

import torch

OPTIONAL = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
ROW_BYTES = 1 << 27  # fp32 logits held at once: 128 MiB (about 680 positions of a 49,152-token vocabulary)

_installed = False
_KEPT: dict[int, tuple] = {}  # id(weight) -> (weak reference, (storage, version, dtype), cast copy): see _cast


def _rows(vocab: int) -> int:
    return max(16, ROW_BYTES // (4 * vocab))


class CpuLogProbs(torch.autograd.Function):
    """TRL's `ChunkedLogProbFunction` (same arguments, same outputs) in whole-vocabulary rows."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
                outputs=("log_probs",) + OPTIONAL):
        ctx.set_materialize_grads(False)
        compute = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
        scale = logit_scale / temperature
        n, vocab = hidden.shape[0], weight.shape[0]
        f32 = {"dtype": torch.float32}
        log_probs = torch.empty(n, **f32)
        entropy = torch.empty(n, **f32) if "entropy" in outputs else None
        sq = torch.empty(n, **f32) if "log_sum_sq_probs" in outputs else None
        mean = torch.empty(n, **f32) if "mean_logits" in outputs else None
        top1 = torch.empty(n, dtype=torch.bool) if "is_top1" in outputs else None
        with torch.autocast("cpu", enabled=False):
            w = _cast(weight, compute)
            b = bias.to(compute) if bias is not None else None
            step = _rows(vocab)
            for s in range(0, n, step):
                e = min(s + step, n)
                t = targets[s:e, None]
                z = _logits(hidden[s:e].to(compute), w, b, scale)
                log_p = torch.log_softmax(z, -1)
                log_probs[s:e] = log_p.gather(-1, t).squeeze(-1)
                if mean is not None:
                    mean[s:e] = z.mean(-1)
                if top1 is not None:
                    top1[s:e] = z.argmax(-1) == t.squeeze(-1)  # the first maximum, as TRL's kernel counts ties
                del z
                if entropy is not None or sq is not None:
                    p = torch.exp(log_p)
                    if entropy is not None:
                        entropy[s:e] = -_dot(p, log_p)
                    if sq is not None:
                        sq[s:e] = torch.log(_dot(p, p))
        ctx.save_for_backward(hidden, weight, bias, targets, entropy)
        ctx.compute, ctx.scale = compute, scale
        ctx.mark_non_differentiable(*(x for x in (sq, mean, top1) if x is not None))
        return log_probs, entropy, sq, mean, top1

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_):
        hidden, weight, bias, targets, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        n, vocab = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32) if need_bias else None
        with torch.autocast("cpu", enabled=False):
            w = _cast(weight, ctx.compute)
            b = bias.to(ctx.compute) if bias is not None else None
            step = _rows(vocab)
            for s in range(0, n, step):
                e = min(s + step, n)
                t = targets[s:e, None]
                h = hidden[s:e].to(ctx.compute)
                z = _logits(h, w, b, ctx.scale)
                # d log p_t / dz_j = 1[j = t] - p_j;  dH / dz_j = -p_j (log p_j + H)
                g = grad_logprobs[s:e, None].float() if grad_logprobs is not None else z.new_zeros(e - s, 1)
                if grad_entropy is None:  # the usual case: one softmax, the gradient written in `compute`
                    p = torch.softmax(z, -1)
                    del z
                    p.scatter_add_(-1, t, torch.full_like(g, -1.0))
                    grad = torch.mul(p, g.mul(-ctx.scale), out=torch.empty(p.shape, dtype=ctx.compute))
                else:
                    log_p = torch.log_softmax(z, -1)
                    del z
                    p = torch.exp(log_p)
                    grad = p * log_p.add_(entropy[s:e, None]) * grad_entropy[s:e, None].float().neg()
                    grad.sub_(p.mul_(g)).scatter_add_(-1, t, g)
                    grad = grad.mul_(ctx.scale).to(ctx.compute)
                del p
                if grad_hidden is not None:
                    grad_hidden[s:e] = torch.mm(grad, w)
                if grad_weight is not None:
                    grad_weight.add_(torch.mm(grad.t(), h))
                if grad_bias is not None:
                    grad_bias.add_(grad.sum(0, dtype=torch.float32))
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None, None, None)



def _cast(weight, dtype):
    """`weight` in `dtype`. A frozen weight's cast copy is kept until the run ends (`forget_casts`): casting
    SmolLM2's 49,152 x 576 head took 72 ms, twice a step (forward and backward), about 6% of a short-row SFT step.
    The copy is made again when the weight's storage or version counter changes."""
    if weight.dtype == dtype or weight.requires_grad:
        return weight.to(dtype)
    key = (weight.data_ptr(), weight._version, dtype)
    kept = _KEPT.get(id(weight))
    if kept is None or kept[0]() is not weight or kept[1] != key:
        kept = _KEPT[id(weight)] = (weakref.ref(weight), key, weight.to(dtype))
    return kept[2]


def forget_casts() -> None:
    """Drop the kept casts (a run's end: its model is freed, and nothing outside a run may rely on a copy that a
    later in-place write through `.data`, which no version counter sees, would leave stale)."""
    _KEPT.clear()


def _dot(a, b):
    """Row-wise dot products (a batched matrix multiply: one pass, no product tensor)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _logits(h, w, b, scale: float):
    """One block of rows' logits in fp32, scaled (a fresh tensor the caller may change in place)."""
    z = torch.mm(h, w.t()) if b is None else torch.addmm(b, h, w.t())
    z = z.float()
    return z.mul_(scale) if scale != 1.0 else z


def install_head() -> bool:
    """Route TRL's fused head through `CpuLogProbs` for CPU tensors, once per process. False where this TRL does
    not have the fused head this replaces (its own head then runs, correct and slower)."""
    global _installed
    if _installed:
        return True
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        return False
    original, use_triton = getattr(trl_utils, "_ChunkedLogProbFunction", None), getattr(trl_utils, "_use_triton", None)
    if original is None or use_triton is None:
        return False
    cpu = CpuLogProbs

    class Dispatch:
        """TRL's function on devices with Triton (and with a soft cap, which only Gemma's heads have); ours on CPUs."""

        cpu_function = cpu
        trl_function = original

        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, *rest):
            chosen = cpu if hidden.device.type == "cpu" and softcap is None else original
            return chosen.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, *rest)

    def scores_only_read_positions(device) -> bool:
        # TRL scores only the positions with a label where this is true; elsewhere every position.
        return device.type == "cpu" or use_triton(device)

    trl_utils._ChunkedLogProbFunction = Dispatch
    trl_utils._use_triton = scores_only_read_positions
    _installed = True
    return True


class WordDropout(torch.nn.Dropout):
    """`nn.Dropout` whose keep mask comes from 15 random bits per value, four values to one 64-bit draw. Under
    autocast the input is cast first, as the adapter's matrix multiply would cast it: the mask kept for the
    backward is then in bf16, not fp32, and the multiply runs in one dtype."""

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
        bits = words.view(torch.int16)[:n].view(x.shape) & 0x7FFF  # random_() leaves an int64's top bit 0
        return x * (bits >= round(self.p * 32768)).to(x.dtype) * (1 / (1 - self.p))


def cheaper_dropout(model) -> int:
    """Replace peft's LoRA dropout modules by `WordDropout`s of the same p; returns how many."""
    swapped = 0
    for module in model.modules():
        for name, dropout in getattr(module, "lora_dropout", {}).items():
            if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                module.lora_dropout[name] = WordDropout(dropout.p)
                swapped += 1
    return swapped


class CastOnceLinear(torch.nn.Linear):
    """An `nn.Linear` with a frozen fp32 weight on the CPU whose bf16 copy under autocast is made once (`_cast`);
    outside autocast, or once its weight trains, the plain `nn.Linear`."""

    def forward(self, x):
        if torch.is_autocast_enabled("cpu") and not self.weight.requires_grad:
            return torch.nn.functional.linear(x, _cast(self.weight, torch.get_autocast_dtype("cpu")), self.bias)
        return torch.nn.functional.linear(x, self.weight, self.bias)


def cast_frozen_once(model) -> int:
    """Give every frozen fp32 `nn.Linear` on the CPU (a LoRA model's base layers, the head) `CastOnceLinear`'s
    forward; returns how many. The model is the run's own, and the kept copies go with `forget_casts` (before each
    evaluation and at the run's end). A copy is made again when the weight's storage or version counter changes;
    a write through `.data` (peft's in-place adapter merge) moves neither, so nothing may merge into the base
    weights during a run (nothing in a run does: merging happens on loaded parents, before this)."""
    changed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(module) is torch.nn.Linear and weight is not None and not weight.requires_grad \
                and weight.dtype == torch.float32 and weight.device.type == "cpu":
            module.__class__ = CastOnceLinear
            changed += 1
    return changed


def fewer_casts(model) -> int:
    """Stop peft casting a LoRA layer's input to the adapter's dtype where that cast is never needed; returns how
    many layers. Under bf16 autocast, o_proj's and down_proj's inputs are bf16: peft cast them to fp32, then the
    dropout and the adapter's matrix multiply cast them back, two copies of the activations per layer and pass for
    the same values. Where every weight of the model is fp32 (a CPU run), an input outside autocast is fp32 already,
    so the cast only ever does that; models with bf16, fp16 or quantized weights keep it. Vanilla LoRA layers only
    (DoRA's own forward is left as peft wrote it)."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return 0
    changed = 0
    for module in model.modules():
        if getattr(module, "cast_input_dtype_enabled", None) is True and not getattr(module, "lora_variant", None) \
                and hasattr(module, "lora_A"):
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed


def use_segment_attention(model, device) -> bool:
    """Switch a CPU training model on transformers' sdpa to `attend_by_segment`; False where it stays as it is
    (another device, attention implementation or model family). The model is the run's own: freed at its end."""
    from .batching import SEGMENTS, segments_apply

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if not segments_apply(config, device):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SEGMENTS, attend_by_segment)
    AttentionMaskInterface.register(SEGMENTS, sdpa_mask)  # padded batches get sdpa's masks, as before
    base.set_attn_implementation(SEGMENTS)
    return config._attn_implementation == SEGMENTS


def attend_by_segment(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function interface (query, key, value: [batch, heads, tokens, head dim]; returns
    [batch, tokens, heads, head dim] and no weights). One flattened row (batch 1, no cache, position ids that
    restart, every example within a sliding window if the layer has one): each example's causal attention on its
    own, exactly the masked square's numbers; anything else, generation included: sdpa as transformers runs it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = None if kwargs.get("use_cache") else _starts(kwargs.get("position_ids"), query, key)
    ends = starts[1:] + [query.shape[2]] if starts else []
    window = kwargs.get("sliding_window")
    if starts is None or not getattr(module, "is_causal", True) or kwargs.get("softcap") is not None \
            or kwargs.get("is_causal") is False or (window and max(e - s for s, e in zip(starts, ends)) > window):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = key.shape[1] != query.shape[1]
    half = [t.dtype for t in (query, key, value) if t.dtype in (torch.bfloat16, torch.float16)]
    fp32 = bool(half) and query.device.type == "cpu"
    if fp32:
        # The CPU kernel's half-precision backward is slow on short sequences: for one example of 60 tokens (9
        # heads, 3 key/value heads, 64 dims, one thread) forward and backward took 1.87 ms in bf16 and 0.61 ms in
        # fp32, about equal from 250 tokens on (measured). So fp32 inputs (under autocast the rotated query and key
        # are fp32 already, the value bf16, and autocast would cast all three to bf16), the output cast back to
        # what autocast's kernel returns: its numbers to bf16's rounding (that kernel accumulates in fp32 too).
        query, key, value = query.float(), key.float(), value.float()
    with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
        parts = [torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling, is_causal=True,
            enable_gqa=gqa) for s, e in zip(starts, ends)]
    out = torch.cat(parts, dim=2)
    return (out.to(half[0]) if fp32 else out).transpose(1, 2).contiguous(), None


def _starts(position_ids, query, key) -> list[int] | None:
    """Where the examples of one flattened row start (a position id that does not follow the one before), read
    once per forward and kept on the position ids; None where this is not one flattened row of several."""
    if position_ids is None or query.shape[0] != 1 or position_ids.shape != (1, query.shape[2]) \
            or key.shape[2] != query.shape[2]:
        return None
    starts = getattr(position_ids, "_nbalign_starts", None)
    if starts is None:
        breaks = (torch.diff(position_ids[0]) != 1).nonzero().flatten().add(1).tolist()
        starts = [0, *breaks] if breaks else []
        position_ids._nbalign_starts = starts
    return starts or None
