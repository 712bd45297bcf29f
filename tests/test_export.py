"""run.export: merged safetensors, the adapter alone, and GGUF, each loaded back and giving the run's answers."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import nbalign
from nbalign.errors import NbalignError
from helpers import chats

PROMPTS = ["What is the capital of France?", "Name a colour.", "What is 2 plus 3?"]


def _greedy(model, tokenizer, prompt, n=8):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    nbalign.lora(r=4, model=tiny_model)
    run = nbalign.sft(chats(8), model=tiny_model, out=str(root / "run"), epochs=1, batch_size=4, learning_rate=5e-2,
                      eval_points=1, probe=False, fewshot=0, watch=False)
    from nbalign.devices import Device
    from nbalign.models import load_model, load_tokenizer, resolve

    ref = resolve(str(run.path))
    return run, root, load_model(ref, Device("cpu", False)).eval(), load_tokenizer(ref)


def test_merged_safetensors_load_without_peft_and_answer_as_the_run(tiny_run):
    run, root, model, tokenizer = tiny_run
    folder = run.export(root / "merged")
    assert (folder / "model.safetensors").is_file() and not (folder / "adapter_config.json").exists()
    back = AutoModelForCausalLM.from_pretrained(folder)
    back_tok = AutoTokenizer.from_pretrained(folder)
    assert back_tok.chat_template == tokenizer.chat_template
    for prompt in PROMPTS:
        assert _greedy(back, back_tok, prompt) == _greedy(model, tokenizer, prompt)
    with pytest.raises(NbalignError, match="already exists"):
        run.export(root / "merged")


def test_the_adapter_alone_loads_with_peft(tiny_run, tiny_model):
    from peft import PeftModel

    run, root, model, tokenizer = tiny_run
    folder = run.export(root / "adapter", merged=False)
    back = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), folder).eval()
    assert _greedy(back, tokenizer, PROMPTS[0]) == _greedy(model, tokenizer, PROMPTS[0])


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_gguf_reads_back_through_transformers_with_the_runs_logits_and_tokenizer(tiny_run, kind):
    run, root, model, tokenizer = tiny_run
    path = run.export(root / f"model-{kind}.gguf", gguf_type=kind)
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    back_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                         add_generation_prompt=True)
    assert back_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        a, b = model(**ids).logits[0], back(**ids).logits[0]
    similarity = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
    assert similarity > (0.9999 if kind == "f16" else 0.999), similarity
    if kind == "q8_0":  # 8.5 bits a weight against F16's 16 (the norms stay F32)
        from gguf import GGUFReader

        stored = sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)
        assert stored < 0.6 * 2 * sum(p.numel() for p in model.parameters())


def test_unfinished_runs_and_unknown_formats_are_refused(tiny_run, tmp_path):
    import json

    run, root, model, tokenizer = tiny_run
    with pytest.raises(NbalignError, match="gguf_type must be one of"):
        run.export(tmp_path / "x.gguf", gguf_type="q4_k")
    status = run.path / "status.json"
    saved = status.read_text()
    status.write_text(json.dumps({**json.loads(saved), "status": "interrupted"}))
    try:
        with pytest.raises(NbalignError, match="interrupted"):
            run.export(tmp_path / "y")
    finally:
        status.write_text(saved)


@pytest.mark.slow
@pytest.mark.shares("json-sft")
def test_the_builtin_model_tuned_exports_to_gguf_and_gives_the_runs_greedy_answers(in_tmp, json_sft_run):
    """The built-in model came from a GGUF file: a run on it (the JSON defaults run, trained once for three
    tests) goes back to GGUF and answers the same."""
    from nbalign.examples import json_answers

    run = json_sft_run
    path = run.export("exports/json.gguf")
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for row in json_answers("heldout")[:4]:
        prompt = row["messages"][0]["content"]
        expected = run.generate(prompt, max_new_tokens=24)
        assert tokenizer.decode(_greedy(back, tokenizer, prompt, 24), skip_special_tokens=True).strip() == \
            expected.strip()
