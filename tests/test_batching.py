"""Padding-free SFT batches (nbalign/batching.py): the same logits and loss as padded ones, chosen where they
compute less, and used by %%sft on a real run."""

import pytest
import torch

from nbalign.batching import Costs, PadOrFlatten, layer_costs, supports_flattening


def tiny_llama(impl="sdpa"):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)


def rows(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 97, (n,), generator=g).tolist()
        labels = [-100] * (n // 3) + ids[n // 3:]  # a prompt the loss does not read
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
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


def test_sft_spec_padding_free_option():
    from nbalign.errors import NbalignError
    from nbalign.specs import SFTSpec

    assert SFTSpec(data=[{"prompt": "a", "completion": "b"}]).padding_free == "auto"
    assert SFTSpec(data=[{"prompt": "a", "completion": "b"}], padding_free="false").padding_free is False
    with pytest.raises(NbalignError, match="padding_free"):
        SFTSpec(data=[{"prompt": "a", "completion": "b"}], padding_free="sometimes")
