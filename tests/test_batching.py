"""Padding-free SFT batches (nbalign/batching.py): the same logits and loss as padded ones, chosen where they
compute less, and used by %%sft on a real run."""

import pytest
import torch

from nbalign import fastpaths
from nbalign.batching import Costs, PadOrFlatten, layer_costs, supports_flattening
from nbalign.devices import Device


def tiny_llama(impl="sdpa"):
    """A 2-layer random Llama; impl "segments": sdpa switched to nbalign's per-example CPU attention, as a
    training run switches it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa" if impl == "segments" else impl)
    if impl == "segments":
        assert fastpaths.use_segment_attention(model, Device("cpu", False))
    return model


def rows(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 97, (n,), generator=g).tolist()
        labels = [-100] * (n // 3) + ids[n // 3:]  # a prompt the loss does not read
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.mark.parametrize("impl", ["sdpa", "eager", "segments"])
def test_flattened_batch_gives_the_padded_batch_loss_and_gradients(impl):
    model = tiny_llama(impl)
    model.train()
    examples = rows([5, 41, 12, 3])
    collate = {mode: PadOrFlatten(0, layer_costs(model.config), mode) for mode in (False, True)}
    results = {}
    for mode, collator in collate.items():
        batch = collator(examples)
        assert ("position_ids" in batch) == mode and ("attention_mask" in batch) != mode
        model.zero_grad()
        loss = model(**batch, use_cache=False).loss  # TRL's compute_loss passes use_cache=False
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[mode] = (loss.item(), grads)
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    assert torch.allclose(results[True][1], results[False][1], rtol=1e-4, atol=1e-6)
    # each example's logits are its own: none attends to the example before it in the flattened row
    with torch.no_grad():
        padded = model(**collate[False](examples), use_cache=False).logits
        flat = model(**collate[True](examples), use_cache=False).logits
    assert torch.allclose(flat[0, 5:46], padded[1, :41], atol=1e-5)


def test_under_bf16_autocast_each_example_attends_in_fp32_with_bf16s_numbers():
    """Under CPU bf16 autocast (the rotated query and key fp32, the value bf16) the per-example attention runs in
    fp32, where the CPU kernel's backward is about three times faster on short examples than in bf16
    (fastpaths.attend_by_segment): the loss and gradients are those of the padded batch under the same autocast, to
    bf16's rounding, and the flattened row's output is bf16 as autocast's kernel returns it."""
    model = tiny_llama("segments")
    model.train()
    examples = rows([5, 41, 12, 3])
    collate = {mode: PadOrFlatten(0, layer_costs(model.config), mode) for mode in (False, True)}
    seen, real = [], torch.nn.functional.scaled_dot_product_attention

    def watched(query, key, value, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype, torch.is_autocast_enabled("cpu")))
        return real(query, key, value, **kwargs)

    results = {}
    for mode, collator in collate.items():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if mode:
                torch.nn.functional.scaled_dot_product_attention = watched
            try:
                loss = model(**collator(examples), use_cache=False).loss
            finally:
                torch.nn.functional.scaled_dot_product_attention = real
        loss.backward()
        results[mode] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert seen and all(s == (torch.float32, torch.float32, torch.float32, False) for s in seen), seen[:3]
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-3)
    flat, padded = results[True][1], results[False][1]
    assert torch.nn.functional.cosine_similarity(flat, padded, dim=0) > 0.999
    assert (flat - padded).norm() < 0.02 * padded.norm()  # 0.004 measured


def test_a_batch_is_flattened_where_that_computes_less():
    model = tiny_llama()
    costs = layer_costs(model.config)
    assert costs == Costs(per_token=64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 160, per_pair=2 * 64)
    collator = PadOrFlatten(0, costs)
    assert collator.flatten([300, 12, 20, 9, 15, 30, 11, 8])  # one long chat among short ones: padding wastes most
    assert not collator.flatten([300, 290, 310, 305])  # equal lengths: flattening only adds attention
    assert not collator.flatten([40])
    collator(rows([60, 5, 7, 9]))
    collator(rows([60, 58, 61, 59]))
    summary = collator.summary()
    assert summary["batches_flattened"] == 1 and summary["batches_padded"] == 1
    assert summary["padding_saved"] == pytest.approx(1 - (81 + 4 * 61) / (4 * 60 + 4 * 61), abs=1e-3)
    assert not PadOrFlatten(0, costs, False).flatten([300, 1, 1, 1])
    assert supports_flattening(model)


def test_per_example_attention_runs_each_example_alone_and_prices_the_flattened_row_so(monkeypatch):
    """nbalign's CPU training attention: a flattened row's examples are four causal attentions of their own sizes
    (not one masked 61 x 61 square); padded batches and cached generation go to sdpa with its mask, as before."""
    import torch.nn.functional as F

    model = tiny_llama("segments")
    reference = tiny_llama("sdpa")
    shapes, real = [], F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        shapes.append((q.shape[2], kw.get("attn_mask") is None))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    examples = rows([5, 41, 12, 3])
    flat, padded = (PadOrFlatten(0, layer_costs(model.config), mode)(examples) for mode in (True, False))
    with torch.no_grad():
        ours = model(**flat, use_cache=False).logits
        assert shapes == [(5, True), (41, True), (12, True), (3, True)] * 2  # two layers, no mask
        shapes.clear()
        theirs = reference(**flat, use_cache=False).logits
        assert shapes == [(61, False)] * 2  # sdpa: one masked square
        shapes.clear()
        assert torch.allclose(ours, theirs, atol=1e-5)
        assert torch.allclose(model(**padded).logits, reference(**padded).logits, atol=1e-6)
        assert shapes == [(41, False)] * 4  # the padded batch: sdpa with its padding mask, on both
        prompt = torch.tensor([[3, 5, 7, 9]])
        assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False),
                           reference.generate(prompt, max_new_tokens=5, do_sample=False))
    costs = layer_costs(model.config)
    assert costs.per_example and not layer_costs(reference.config).per_example
    # Priced per example: nearly equal lengths are now flattened too (they pad a little, and no pairs are added).
    assert costs.flattened([300, 12, 20, 9]) == 341 * costs.per_token + (300**2 + 12**2 + 20**2 + 9**2) * costs.per_pair
    assert PadOrFlatten(0, costs).flatten([300, 290, 310, 305])
    assert not PadOrFlatten(0, layer_costs(reference.config)).flatten([300, 290, 310, 305])


def test_per_example_attention_only_on_checked_models_and_within_a_sliding_window():
    """Model families not checked keep sdpa; a sliding-window layer attends per example only where every example
    fits in the window (where it does not, sdpa's windowed mask runs), with the masked square's logits either way."""
    import copy

    from transformers import AutoModelForCausalLM, GPT2Config, MistralConfig

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2),
                                            attn_implementation="sdpa")
    assert not fastpaths.use_segment_attention(gpt2, Device("cpu", False))
    assert gpt2.config._attn_implementation == "sdpa"
    assert not fastpaths.use_segment_attention(tiny_llama(), Device("cuda", True))

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    reference = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model = copy.deepcopy(reference)
    assert fastpaths.use_segment_attention(model, Device("cpu", False))
    for lengths in ([5, 7, 3], [5, 12, 3]):  # all within the window; one longer than it
        flat = PadOrFlatten(0, layer_costs(model.config), True)(rows(lengths))
        with torch.no_grad():
            assert torch.allclose(model(**flat, use_cache=False).logits, reference(**flat, use_cache=False).logits,
                                  atol=1e-5), lengths
    costs = layer_costs(model.config)
    assert costs.per_example and costs.window == 8
    assert costs.flattened([5, 7]) == 12 * costs.per_token + (25 + 49) * costs.per_pair
    assert costs.flattened([5, 12]) == 17 * costs.per_token + 17 * 17 * costs.per_pair  # priced as the square


def test_sft_spec_padding_free_option():
    from nbalign.errors import NbalignError
    from nbalign.specs import SFTSpec

    assert SFTSpec(data=[{"prompt": "a", "completion": "b"}]).padding_free == "auto"
    assert SFTSpec(data=[{"prompt": "a", "completion": "b"}], padding_free="false").padding_free is False
    with pytest.raises(NbalignError, match="padding_free"):
        SFTSpec(data=[{"prompt": "a", "completion": "b"}], padding_free="sometimes")


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_padded_batch_runs_flattened_with_the_same_outputs(side):
    """The preference trainers' padded batches: the wrapped forward flattens them and hands back every per-token
    output (logits; the fused head's log-probs, as DPO and KTO read them) in the padded shape."""
    from trl.trainer.utils import add_fused_lm_head

    from nbalign.batching import flatten_padded_forward

    model = tiny_llama()
    add_fused_lm_head(model)
    model.train()
    lengths, width = [30, 4, 11, 7], 30
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols] = torch.randint(1, 97, (n,), generator=g)
        mask[i, cols] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels = labels.masked_fill(mask.cumsum(1) <= 3, -100)  # each row's first three tokens: its prompt
    padded = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
    padded_logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    counter = flatten_padded_forward(model, layer_costs(model.config), True)
    flat = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
    flat_logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert counter.flattened == 2 and counter.padded == 0
    assert flat.log_probs.shape == padded.log_probs.shape
    assert torch.allclose(flat.log_probs, padded.log_probs, atol=1e-5)
    assert flat.loss.item() == pytest.approx(padded.loss.item(), rel=1e-5)
    real = mask.bool()
    assert torch.allclose(flat_logits[real], padded_logits[real], atol=1e-5)
    flat.loss.backward()  # gradients flow through the scatter back into the padded shape
    assert counter.summary()["padding_saved"] == pytest.approx(1 - sum(lengths) / (4 * width), abs=1e-3)


@pytest.mark.parametrize("method", ["sft", "dpo", "kto", "reward_model"])
def test_training_on_ragged_rows_flattens_and_learns_the_same(method, tiny_model, in_tmp, monkeypatch):
    """A real run on short and long conversations mixed: batches are flattened, and the losses step by step
    are those of the padded run."""
    import nbalign

    history = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}] * 12
    rows = []
    for i in range(8):
        prompt = (history if i % 4 == 0 else []) + [{"role": "user", "content": f"What is {i} plus {i}?"}]
        answer = [{"role": "assistant", "content": f"{2 * i}."}]
        wrong = [{"role": "assistant", "content": f"I think it might be {2 * i + 1}, though I am not sure."}]
        rows.append({"messages": prompt + answer} if method == "sft" else
                    {"prompt": prompt, "chosen": answer, "rejected": wrong} if method in ("dpo", "reward_model") else
                    {"prompt": prompt, "completion": answer if i % 2 else wrong, "label": bool(i % 2)})
    fn = getattr(nbalign, method)
    options = {"model": tiny_model, "batch_size": 4, "epochs": 1, "learning_rate": 1e-3}
    if method != "reward_model":
        options["watch"] = False
    if method == "sft":
        options["eval_split"] = 0
    split, real = {}, fastpaths.attend_by_segment
    def counting(module, query, key, value, attention_mask, **kwargs):  # noqa: E306
        if fastpaths._starts(kwargs.get("position_ids"), query, key):
            split[mode] = split.get(mode, 0) + 1
        return real(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(fastpaths, "attend_by_segment", counting)  # what the run registers
    runs = {}
    for mode in ("auto", False):
        runs[mode] = fn(rows, out=f"runs/{method}-{mode}", padding_free=mode, **options)
    assert split.get("auto", 0) >= 2 and False not in split  # flattened rows attended example by example
    flat, padded = runs["auto"].summary, runs[False].summary
    assert flat["batches_flattened"] >= 1 and flat["padding_saved"] > 0.3
    assert "batches_flattened" not in padded
    losses = {mode: [e["loss"] for e in run.metrics.to_dict("records") if e.get("loss") == e.get("loss")
                     and e.get("loss") is not None] for mode, run in runs.items()}
    assert len(losses["auto"]) == len(losses[False]) >= 2
    assert losses["auto"] == pytest.approx(losses[False], rel=2e-3)


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_flattened_reward_model_scores_each_row_at_its_last_token(side):
    """A sequence classifier's score is read at each row's rightmost non-pad token, as transformers reads it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from nbalign.batching import flatten_padded_forward

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    model = get_peft_model(AutoModelForSequenceClassification.from_config(cfg, attn_implementation="sdpa"),
                           LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    lengths, width = [25, 6, 13, 9], 25
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols] = torch.randint(1, 97, (n,))
        mask[i, cols] = 1
    padded = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    counter = flatten_padded_forward(model, layer_costs(model.config), True, pooled=True)
    flat = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert counter.flattened == 1 and flat.shape == padded.shape == (4, 1)
    assert torch.allclose(flat, padded, atol=1e-5)


def test_the_estimates_batches_are_padded_or_flattened_as_the_run_would():
    """batching.drawn_batches: each batch's tokens, padded (no costs: padding_free off) or flattened where the costs
    say so; in the data's order (KTO's sequential sampling), the longest together (length-grouped sampling), or
    the seeded shuffle, a new order each epoch."""
    from nbalign.batching import Costs, drawn_batches

    units = [(10,), (100,), (12,), (90,), (50,)]
    per_example = Costs(per_token=1000.0, per_pair=1.0, per_example=True)
    assert drawn_batches(units, 2, 3, None, sampling="sequential") == [200, 180, 50]
    assert drawn_batches(units, 2, 3, per_example, sampling="sequential") == [110, 102, 50]
    assert drawn_batches(units, 2, 3, per_example, mode=False, sampling="sequential") == [200, 180, 50]
    assert drawn_batches(units, 2, 2, per_example, sampling="group_by_length") == [190, 62]
    # Equal lengths gain nothing from flattening and stay padded; the last batch of an epoch holds the rest.
    assert drawn_batches([(40,), (40,), (40,)], 2, 2, per_example, sampling="sequential") == [80, 40]
    pairs = [(10, 30), (20, 20), (5, 100)]  # both answers of a pair in the same batch
    assert drawn_batches(pairs, 3, 1, None, sampling="sequential") == [6 * 100]
    assert drawn_batches(pairs, 3, 1, per_example, sampling="sequential") == [185]
    epochs = drawn_batches([(n,) for n in range(1, 41)], 4, 20, per_example, seed=3)
    assert len(epochs) == 20 and sum(epochs[:10]) == sum(epochs[10:]) == sum(range(1, 41))
    assert epochs[:10] != epochs[10:]  # the second epoch is shuffled again (seed + 1)
