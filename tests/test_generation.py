"""Greedy answers that drop each row once it has ended (generation.greedy_dropping_ended) are generate()'s own:
the same tokens for left-padded prompts of different lengths, with a LoRA adapter on, and stopping on request."""

import threading

import pytest
import torch

from nbalign import generation


def _save_random(tmp_path_factory, smollm2_dir, name: str, config_class, model_class, **extra) -> str:
    """A 2-layer random model of `model_class` with the SmolLM2 tokenizer, initialised at a scale (0.3) where its
    greedy tokens depend on its input (the suite's tiny model, at transformers' small default scale, says one token
    whatever it is asked)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp(name)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = config_class(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                          tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def lively_model(smollm2_dir, tmp_path_factory) -> str:
    """A random Llama whose greedy tokens depend on its input."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save_random(tmp_path_factory, smollm2_dir, "lively-llama", LlamaConfig, LlamaForCausalLM)


@pytest.fixture(scope="module")
def sliding_model(smollm2_dir, tmp_path_factory) -> str:
    """The same with sliding-window attention (Mistral): its cache cannot drop rows, so ended rows stay in the batch
    and only their tokens are dropped."""
    from transformers import MistralConfig, MistralForCausalLM

    return _save_random(tmp_path_factory, smollm2_dir, "sliding-mistral", MistralConfig, MistralForCausalLM,
                        sliding_window=16)


def _model_and_batch(folder, lora=False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    prompts = [f"Question {i}: " + "word " * (3 * i) for i in range(9)]  # left padding from 0 to 24 tokens
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return model, tokenizer, batch


def _ended_at_different_steps(model, batch, tokenizer) -> list[int]:
    """End tokens that rows say at different steps (row i's token at step i), so that rows leave the batch one after
    another: a random model rarely says the real end token."""
    with torch.no_grad():
        free = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = free[:, batch["input_ids"].shape[1]:].tolist()
    ends = [row[i] for i, row in enumerate(new[:8])]
    model.generation_config.eos_token_id = ends
    return ends


@pytest.mark.parametrize("kind, lora", [("lively", False), ("lively", True), ("sliding", False)])
def test_dropping_ended_rows_gives_generates_greedy_tokens(request, kind, lora):
    model, tokenizer, batch = _model_and_batch(request.getfixturevalue(f"{kind}_model"), lora)
    ends = _ended_at_different_steps(model, batch, tokenizer)
    pad = tokenizer.pad_token_id
    assert generation.plain_greedy(model, {"do_sample": False, "pad_token_id": pad, "temperature": None})
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=16, do_sample=False, pad_token_id=pad)
        expected = expected[:, batch["input_ids"].shape[1]:]
        got = generation.greedy_dropping_ended(model, batch, 16, pad=pad)
    lengths = [min([row.index(e) + 1 for e in ends if e in row] or [16]) for row in expected.tolist()]
    assert len(set(lengths)) >= 3, lengths  # rows ended at different steps: some left the batch early
    assert got.shape[1] >= max(lengths)
    assert got[:, :expected.shape[1]].tolist() == expected.tolist()


def test_generate_with_uses_it_for_plain_greedy_only(lively_model, monkeypatch):
    model, tokenizer, batch = _model_and_batch(lively_model)
    calls = []
    real = generation.greedy_dropping_ended
    monkeypatch.setattr(generation, "greedy_dropping_ended", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompts = ["Hello", "Name a colour, please"]
    greedy = generation.generate_with(model, tokenizer, prompts, max_new_tokens=5)
    assert calls and len(greedy) == 2
    calls.clear()
    # A repetition penalty or sampling is generate()'s own work.
    generation.generate_with(model, tokenizer, prompts, max_new_tokens=5, repetition_penalty=1.3)
    generation.generate_with(model, tokenizer, prompts, max_new_tokens=5, do_sample=True, seed=1)
    model.generation_config.repetition_penalty = 1.2
    generation.generate_with(model, tokenizer, prompts, max_new_tokens=5)
    assert not calls


def test_a_set_stop_event_ends_after_the_next_token(lively_model):
    model, tokenizer, batch = _model_and_batch(lively_model)
    stop = threading.Event()
    stop.set()
    with torch.no_grad():
        got = generation.greedy_dropping_ended(model, batch, 10, stop=stop, pad=tokenizer.pad_token_id)
        first = model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert got[:, 0].tolist() == first[:, -1].tolist()
    assert (got[:, 1:] == tokenizer.pad_token_id).all()
