"""The rest of the PEFT family in %%lora: IA3, prefix tuning and prompt tuning, beside LoRA, DoRA and full."""

import math

import pytest
import torch

import nbalign
from nbalign.adapters import AdapterSpec
from nbalign.errors import NbalignError
from helpers import chats, logged


@pytest.mark.parametrize("kind, expected", [("ia3", "IA3"), ("prefix", "prefix tuning"), ("prompt", "prompt tuning")])
def test_lora_reports_what_each_type_trains(tiny_model, kind, expected):
    report = nbalign.lora(type=kind, virtual_tokens=10, model=tiny_model)
    assert expected in str(report)
    lora = nbalign.lora(type="lora", r=8, model=tiny_model)
    assert 0 < report.trainable < lora.trainable  # they learn fewer parameters than LoRA here
    if kind == "prompt":
        assert report.trainable == 10 * 32  # ten virtual tokens of the tiny model's width
    if kind == "prefix":
        assert report.trainable == 10 * 2 * 2 * 16  # keys and values (2 heads of 8) of ten tokens in two layers


@pytest.mark.parametrize("kind", ["ia3", "prefix", "prompt"])
def test_each_type_trains_with_sft_saves_and_loads_as_a_model(tiny_model, in_tmp, kind):
    nbalign.lora(type=kind, virtual_tokens=8, model=tiny_model)
    run = nbalign.sft(chats(16), model=tiny_model, out=f"runs/{kind}", epochs=3, batch_size=4, eval_points=1,
                      probe=False, fewshot=0, watch=False)
    assert run.status == "finished"
    config = (run.path / "adapter" / "adapter_config.json").read_text()
    assert {"ia3": "IA3", "prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}[kind] in config
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from nbalign.models import apply_adapter

    initial = get_peft_model_state_dict(apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_model),
                                                      AdapterSpec(type=kind, virtual_tokens=8), seed=42))
    trained = load_file(run.path / "adapter" / "adapter_model.safetensors")
    assert set(trained) == set(initial)
    assert all(not torch.equal(trained[k], initial[k]) for k in trained)  # every trainable tensor moved
    assert all(math.isfinite(row["loss"]) for row in logged(run, "loss"))
    assert isinstance(run.generate("Hello", max_new_tokens=4), str)
    assert run.spec["trl_config"]["learning_rate"] == pytest.approx(
        2e-4 * {"ia3": 15, "prefix": 50, "prompt": 150}[kind])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_virtual_token_types_generate_what_their_forward_computes(smollm2_dir, kind):
    """Greedy answers of a prefix- or prompt-tuned model to a left-padded batch of prompts of different lengths
    are the tokens its own forward (what training optimised) ranks first, one at a time. PEFT 0.21's generate()
    under transformers 5 put the virtual tokens in again before every new token: a prompt-tuned built-in model
    answered "The capital Poland is Poland is the capital" where its forward says "The capital of Poland is
    Warsaw.", 15 times slower."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nbalign.generation import generate_with
    from nbalign.models import apply_adapter
    from nbalign.text import prompt_text

    # The adapters as initialised (random virtual tokens): on the built-in model they change its answers.
    model = apply_adapter(AutoModelForCausalLM.from_pretrained(smollm2_dir), AdapterSpec(type=kind, virtual_tokens=8),
                          seed=1).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = ["Hi", "What is the capital of Poland?", "What is 18 plus 5? Answer briefly, please, in one short line."]

    def forward_greedy(prompt: str, n: int = 8) -> str:
        ids = tokenizer(prompt_text(tokenizer, prompt), return_tensors="pt", add_special_tokens=False).input_ids
        new = []
        with torch.no_grad():
            for _ in range(n):
                token = model(input_ids=ids).logits[0, -1].argmax()
                if token == tokenizer.eos_token_id:
                    break
                new.append(int(token))
                ids = torch.cat([ids, token.view(1, 1)], dim=1)
        return tokenizer.decode(new, skip_special_tokens=True).strip()

    def generated() -> list[str]:
        return generate_with(model, tokenizer, prompts, max_new_tokens=8)

    expected = [forward_greedy(p) for p in prompts]
    assert generated() == expected
    with model.disable_adapter():  # the virtual tokens make a difference here
        assert generated() != expected
    # Beam search repeats each prompt's inputs (and, for prefix tuning, needs the prefix for every beam).
    assert len(generate_with(model, tokenizer, prompts[:2], max_new_tokens=3, num_beams=2)) == 2


def test_four_bit_is_for_lora_and_dora_only():
    with pytest.raises(NbalignError, match="4-bit loading is offered with LoRA and DoRA"):
        AdapterSpec.from_dict({"type": "ia3", "quantize": "4bit"})
    with pytest.raises(NbalignError, match="virtual_tokens"):
        AdapterSpec.from_dict({"type": "prompt", "virtual_tokens": 0})


def _reference_nll(model_name: str, rows: list) -> float:
    """Mean negative log-likelihood per token of the rows' reference answers under the model."""
    from nbalign.generation import load_for_inference
    from nbalign.scoring import sequence_logps
    from nbalign.text import completion_text

    model, tokenizer = load_for_inference(model_name)
    heads, tails = zip(*(completion_text(tokenizer, r["messages"][:1], r["messages"][1:]) for r in rows))
    sums, counts = sequence_logps(model, tokenizer, list(heads), list(tails))
    return -sum(sums) / sum(counts)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ia3", "prefix", "prompt"])
def test_each_type_moves_the_builtin_model_toward_the_data(in_tmp, kind):
    """One end-to-end run per type on the built-in model, on its defaults: the held-out reference answers (the
    one-line JSON format) become far likelier (per token)."""
    from nbalign.examples import json_answers

    heldout = json_answers("heldout")
    nbalign.lora(type=kind)
    run = nbalign.sft(json_answers("train"), out=f"runs/{kind}", eval_split=0, watch=False, probe=False, fewshot=0)
    before, after = _reference_nll("smollm2-135m", heldout), _reference_nll(str(run.path), heldout)
    print(f"{kind}: held-out reference NLL/token {before:.3f} -> {after:.3f}")
    # Measured with the run's own evaluation too: prompt tuning 3.39 -> 0.82 (11/16 held-out answers in the
    # form), IA3 -> 0.64 (5/16), prefix tuning -> 2.10 (0/16); LoRA on the same data 14/16.
    assert after < 0.7 * before
