"""nbalign's CPU LM head gives TRL's fused head's values and gradients, on the positions TRL's loss reads."""

import pytest
import torch

from nbalign import fastpaths

trl_kernels = pytest.importorskip("trl.kernels.chunked_logprob")
TRL = trl_kernels.ChunkedLogProbFunction
CPU = fastpaths.CpuLogProbs
ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _inputs(n=40, hidden=24, vocab=300, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).requires_grad_()
    b = torch.randn(vocab, generator=g).requires_grad_() if bias else None
    t = torch.randint(0, vocab, (n,), generator=g)
    t[3] = 0  # a position whose target is the first vocabulary entry
    return h, w, b, t


def _run(fn, h, w, b, t, temperature=0.7, scale=1.3, outputs=ALL, autocast=False, entropy_grad=True):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn.apply(h, w, b, t, temperature, 128, None, scale, outputs)
    weights = torch.linspace(0.5, 1.5, len(t))
    loss = -(out[0] * weights).sum()
    if entropy_grad and out[1] is not None:
        loss = loss + 0.3 * (out[1] * weights.flip(0)).sum()
    loss.backward()
    grads = [h.grad, w.grad] + ([b.grad] if b is not None else [])
    return out, grads


@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_trls_in_fp32(bias):
    h, w, b, t = _inputs(bias=bias)
    ours, our_grads = _run(CPU, h, w, b, t)
    theirs, their_grads = _run(TRL, h, w, b, t)
    for name, a, x in zip(ALL, ours, theirs):
        if name == "is_top1":
            assert torch.equal(a, x)
        else:
            torch.testing.assert_close(a, x, rtol=1e-5, atol=1e-5, msg=name)
    for a, x in zip(our_grads, their_grads):
        torch.testing.assert_close(a, x, rtol=1e-4, atol=1e-6)


def test_under_bf16_autocast_it_matches_trl_to_bf16_rounding_and_only_requested_outputs_are_computed():
    h, w, b, t = _inputs(n=64, hidden=64, vocab=1000)
    ours, our_grads = _run(CPU, h, w, b, t, autocast=True, outputs=("log_probs", "entropy"))
    theirs, their_grads = _run(TRL, h, w, b, t, autocast=True, outputs=("log_probs", "entropy"))
    assert ours[2] is None and ours[3] is None and ours[4] is None
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=2e-3)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=2e-3)
    for a, x in zip(our_grads, their_grads):
        assert (a - x).norm() / x.norm() < 1e-2


def test_a_loss_on_the_log_probs_alone_needs_no_entropy_gradient():
    h, w, b, t = _inputs()
    ours, our_grads = _run(CPU, h, w, b, t, entropy_grad=False)
    theirs, their_grads = _run(TRL, h, w, b, t, entropy_grad=False)
    for a, x in zip(our_grads, their_grads):
        torch.testing.assert_close(a, x, rtol=1e-4, atol=1e-6)


def test_installed_trl_head_scores_only_the_labelled_positions_and_gives_the_model_loss():
    """Through TRL's own fused forward on a real (tiny) model: the loss and gradients are the plain model's."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer import utils as trl_utils

    assert fastpaths.install_head(), "this TRL no longer has the fused head nbalign replaces on the CPU: see nbalign/fastpaths.py"
    calls = []
    cpu_apply = trl_utils._ChunkedLogProbFunction.cpu_function.apply
    trl_utils._ChunkedLogProbFunction.cpu_function.apply = lambda *a: calls.append(a[0].shape[0]) or cpu_apply(*a)
    try:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
        ids = torch.randint(0, 500, (3, 12))
        labels = ids.clone()
        labels[:, :5] = -100  # a prompt the loss does not read
        labels[2, 9:] = -100
        plain = model(input_ids=ids, labels=labels).loss
        plain.backward()
        plain_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        fused = model(input_ids=ids, labels=labels, fused_lm_head=True)
        fused.loss.backward()
    finally:
        trl_utils._ChunkedLogProbFunction.cpu_function.apply = cpu_apply
    assert calls == [int((labels[:, 1:] != -100).sum())]  # only the read positions were scored
    torch.testing.assert_close(fused.loss, plain, rtol=1e-5, atol=1e-6)
    for a, x in zip((p.grad for p in model.parameters()), plain_grads):
        torch.testing.assert_close(a, x, rtol=1e-4, atol=1e-6)
    assert (fused.log_probs[:, :4] == 0).all() and (fused.entropy[:, :4] == 0).all()


def test_word_dropout_drops_a_share_p_keeps_the_mean_and_is_off_in_eval():
    torch.manual_seed(0)
    drop = fastpaths.WordDropout(0.05)
    x = torch.ones(300, 1001, requires_grad=True)  # an odd size: the last 64-bit draw is split
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.003
    assert abs(y.mean().item() - 1.0) < 0.005  # kept values are scaled by 1 / (1 - p)
    y.sum().backward()
    assert torch.equal(x.grad != 0, y != 0)  # the gradient flows through the kept values only
    masks = [drop(torch.ones(4, 8)) == 0 for _ in range(20)]
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 1  # a fresh mask every call
    drop.eval()
    assert torch.equal(drop(x), x)


def test_the_adapter_gets_word_dropouts_with_the_specs_p():
    from transformers import LlamaConfig, LlamaForCausalLM

    from nbalign.adapters import AdapterSpec
    from nbalign.models import apply_adapter

    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    peft_model = apply_adapter(model, AdapterSpec(r=4, dropout=0.1), seed=0)
    drops = [d for m in peft_model.modules() for d in getattr(m, "lora_dropout", {}).values()]
    assert len(drops) == 14 and all(type(d) is fastpaths.WordDropout and d.p == 0.1 for d in drops)


def test_a_frozen_heads_cast_is_made_once_and_again_when_the_weight_changes():
    h, w, b, t = _inputs(n=16, hidden=32, vocab=200)
    frozen = w.detach().clone()
    kept = lambda: fastpaths._KEPT[id(frozen)][2]  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = CPU.apply(h, frozen, None, t, 1.0, 128)[0]
        copy = kept()
        again = CPU.apply(h, frozen, None, t, 1.0, 128)[0]
        assert kept() is copy and torch.equal(first, again)  # reused, the same numbers
        frozen.mul_(2.0)  # an in-place change (the version counter moves): cast again
        changed = CPU.apply(h, frozen, None, t, 1.0, 128)[0]
    assert kept() is not copy and not torch.equal(changed, first)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = CPU.apply(h, frozen.clone(), None, t, 1.0, 128)[0]  # no cast kept for the copy yet
    assert torch.equal(changed, fresh)
    trained = w.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        CPU.apply(h, trained, None, t, 1.0, 128)
    assert id(trained) not in fastpaths._KEPT  # a trained weight changes every step: never kept
    fastpaths.forget_casts()  # what a run's end does
    assert not fastpaths._KEPT


@pytest.mark.parametrize("autocast", [False, True])
def test_lora_layers_without_the_input_cast_give_the_same_outputs_and_gradients(autocast):
    """peft casts a LoRA layer's input to the adapter's dtype; on an fp32 model that cast only ever turns bf16
    activations (under autocast) into fp32 ones the dropout and matmul turn back: dropping it changes nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nbalign.adapters import AdapterSpec
    from nbalign.models import apply_adapter

    def run(cast: bool):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
        peft_model = apply_adapter(model, AdapterSpec(r=4, dropout=0.1), seed=0)
        layers = [m for m in peft_model.modules() if hasattr(m, "cast_input_dtype_enabled")]
        assert len(layers) == 14 and not any(m.cast_input_dtype_enabled for m in layers)
        for m in layers:
            m.cast_input_dtype_enabled = cast
        ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)  # the same dropout masks on both sides
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad for p in peft_model.parameters() if p.requires_grad]

    (loss, grads), (cast_loss, cast_grads) = run(False), run(True)
    assert torch.equal(loss, cast_loss)
    assert all(torch.equal(a, x) for a, x in zip(grads, cast_grads))


def test_models_that_are_not_all_fp32_keep_peft_s_input_cast():
    from transformers import LlamaConfig, LlamaForCausalLM

    from nbalign.adapters import AdapterSpec
    from nbalign.models import apply_adapter

    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).to(torch.bfloat16)
    peft_model = apply_adapter(model, AdapterSpec(r=4), seed=0)
    layers = [m for m in peft_model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert layers and all(m.cast_input_dtype_enabled for m in layers)


def test_frozen_linears_cast_once_under_autocast_give_the_same_loss_gradients_and_generations():
    """Autocast casts a frozen weight again at every pass; `cast_frozen_once` keeps one bf16 copy per weight for
    the run, the values autocast makes, so nothing a run computes changes, bit for bit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nbalign.adapters import AdapterSpec
    from nbalign.models import apply_adapter

    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(1))

    def run(once: bool):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
        peft_model = apply_adapter(model, AdapterSpec(r=4, dropout=0.1), seed=0)
        with torch.no_grad():  # B = 0 at the start: give the adapters a say, so their gradients are compared too
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        if once:
            assert fastpaths.cast_frozen_once(peft_model) == 15  # 14 adapted layers' base weights and the head
        torch.manual_seed(2)  # the same dropout masks on both sides
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = peft_model(input_ids=ids, labels=ids).loss
        kept = {k: v[2] for k, v in fastpaths._KEPT.items()}
        loss.backward()
        peft_model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = peft_model.generate(input_ids=ids[:, :4], max_new_tokens=6, do_sample=False)
        reused = all(fastpaths._KEPT[k][2] is v for k, v in kept.items())
        grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
        fastpaths.forget_casts()
        return loss.detach(), grads, out, len(kept), reused, peft_model

    (loss, grads, out, _, _, _), (once_loss, once_grads, once_out, n_kept, reused, model) = run(False), run(True)
    assert n_kept == 15 and reused  # one copy per frozen weight, made at the first pass and used at each after
    assert torch.equal(loss, once_loss) and torch.equal(out, once_out)
    assert len(grads) == 28 and all(torch.equal(a, x) for a, x in zip(grads, once_grads))
    with torch.no_grad():
        model(input_ids=ids)  # outside autocast: the fp32 weights themselves, no copy
    assert not fastpaths._KEPT


def test_a_model_whose_weights_train_keeps_autocasts_own_casts():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert fastpaths.cast_frozen_once(model) == 0  # full fine-tuning: every weight trains
    assert fastpaths.cast_frozen_once(model.to(torch.bfloat16).requires_grad_(False)) == 0  # bf16 weights: no cast
