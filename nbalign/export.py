"""A run's model in the formats other tools load: the adapter alone, a merged safetensors model, or GGUF.

- **merged safetensors** (`merged=True`): the base with every adapter on the way merged in, saved with
  `save_pretrained` beside its tokenizer and chat template, so `AutoModelForCausalLM.from_pretrained(folder)`
  loads it without peft or nbalign;
- **adapter** (`merged=False`): the run's adapter folder as peft saved it, with the tokenizer;
- **GGUF** (a target ending in `.gguf`): the merged model as one GGUF file for llama.cpp-based tools (llama.cpp,
  Ollama, LM Studio), in F16 (norms in F32, as llama.cpp's converter writes them) or Q8_0 (8-bit blocks of 32),
  with the tokenizer (BPE tokens, merges, special ids) and the chat template in its metadata. Llama-architecture
  models only (SmolLM2, Llama, and the models that share its layout); queries and keys are stored in llama.cpp's
  rotary layout, as its converter does.

Every export is written into a temporary name and renamed into place, then loaded back and checked: the
safetensors model must give the run's logits, the GGUF file (read back through transformers) the same within
its precision.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import runfolder
from .errors import NbalignError

GGUF_TYPES = ("f16", "q8_0")


def export(run_path: str | Path, target: str | Path, merged: bool = True, gguf_type: str = "f16",
           dtype: str = "float32") -> Path:
    """Write the run's model to `target` (a folder, or a `.gguf` file) and check it by loading it back."""
    run_path, target = Path(run_path), Path(target).expanduser()
    status = runfolder.read_status(run_path).get("status") if runfolder.is_run_folder(run_path) else None
    if status != "finished":
        raise NbalignError(f"'{run_path}' is not a finished run ({status or 'no run folder'}): there are no final "
                           "weights to export.", "export a finished run; `%nbalign runs` lists them.")
    gguf_type = gguf_type.lower().replace("-", "_")
    if target.suffix.lower() == ".gguf" and gguf_type not in GGUF_TYPES:
        raise NbalignError(f"export: gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}.",
                           "use gguf_type='f16' (exact to half precision) or 'q8_0' (half the size).")
    if target.exists() and any(target.iterdir() if target.is_dir() else [True]):
        raise NbalignError(f"export: '{target}' already exists.", "pick a new path, or delete the old export first.")
    target.parent.mkdir(parents=True, exist_ok=True)
    from .devices import quiet

    with quiet():  # no weight-loading or shard-writing bars from the libraries under the export
        if target.suffix.lower() == ".gguf":
            return _gguf(run_path, target, gguf_type)
        if not merged:
            return _adapter(run_path, target)
        return _merged(run_path, target, dtype)


def _final_model(run_path: Path):
    import torch

    from .devices import Device
    from .models import load_model, load_tokenizer, resolve

    ref = resolve(str(run_path))
    model = load_model(ref, Device("cpu", False))
    if hasattr(model, "peft_config"):
        raise NbalignError(f"export: '{run_path}' learned virtual tokens (prefix or prompt tuning); a merged model "
                           "or a GGUF file has no place for them.", "export its adapter with merged=False.")
    model.eval()
    return model, load_tokenizer(ref), torch


def _adapter(run_path: Path, target: Path) -> Path:
    import shutil

    weights = runfolder.weights_dir(run_path)
    if weights.name != runfolder.ADAPTER:
        raise NbalignError(f"export: '{run_path}' trained every weight (full fine-tuning); it has no adapter.",
                           "export it with merged=True (its whole model).")
    with runfolder.atomic_folder(target) as tmp:
        shutil.copytree(weights, tmp, dirs_exist_ok=True)
    return target


def _merged(run_path: Path, target: Path, dtype: str) -> Path:
    model, tokenizer, torch = _final_model(run_path)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise NbalignError(f"export: dtype must be float32, bfloat16 or float16, got {dtype!r}.",
                           "use dtype='bfloat16' to halve the size.")
    probe = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        expected = model(**probe).logits
    with runfolder.atomic_folder(target) as tmp:
        model.to(getattr(torch, dtype)).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)(**probe).logits
    tolerance = 1e-4 if dtype == "float32" else 0.1
    if not torch.allclose(got, expected, atol=tolerance * max(1.0, expected.abs().max().item()), rtol=0):
        raise NbalignError(f"export: the model saved in '{target}' does not give the run's logits when loaded back.",
                           "this is a bug in nbalign's export: please report it with the run's spec.json.")
    return target


# ----------------------------------------------------------------------------------------------------
# GGUF


def _permute(w, heads: int):
    """HF's rotary layout of a query/key projection -> llama.cpp's (the permutation its converter applies)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf(run_path: Path, target: Path, gguf_type: str) -> Path:
    import gguf
    import numpy as np

    model, tokenizer, torch = _final_model(run_path)
    config = model.config
    if config.model_type not in ("llama", "mistral") or getattr(config, "attention_bias", False):
        raise NbalignError(f"export: GGUF export covers Llama-layout models; this run's model is {config.model_type}.",
                           "export it as merged safetensors (merged=True) and convert that with llama.cpp's "
                           "convert_hf_to_gguf.py.")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tmp = target.with_name(f".{target.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(f"{run_path.name} (nbalign)")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None)
                                    or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_vocab_size(config.vocab_size)
    file_type = gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    writer.add_file_type(file_type)
    _tokenizer_metadata(writer, tokenizer, config)
    quant = gguf.GGMLQuantizationType.F16 if gguf_type == "f16" else gguf.GGMLQuantizationType.Q8_0
    state = model.state_dict()
    for name, tensor in state.items():
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # tied: llama.cpp reads the output projection from token_embd
        stem, suffix = name.rsplit(".", 1)
        mapped = names.get_name(stem)
        if mapped is None:
            raise NbalignError(f"export: no GGUF name for the tensor '{name}'.",
                               "export as merged safetensors and convert it with llama.cpp's convert_hf_to_gguf.py.")
        data = tensor.detach().float()
        if stem.endswith("q_proj"):
            data = _permute(data, heads)
        elif stem.endswith("k_proj"):
            data = _permute(data, kv_heads)
        array = data.numpy()
        if array.ndim == 1 or quant == gguf.GGMLQuantizationType.F16 or array.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F32 if array.ndim == 1 else gguf.GGMLQuantizationType.F16
            writer.add_tensor(f"{mapped}.{suffix}", array.astype(np.float32 if array.ndim == 1 else np.float16),
                              raw_dtype=kind)
        else:
            packed = gguf.quants.quantize(array, quant)
            writer.add_tensor(f"{mapped}.{suffix}", packed, raw_shape=packed.shape, raw_dtype=quant)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, target)
    _check_gguf(target, model, tokenizer, gguf_type)
    return target


def _tokenizer_metadata(writer, tokenizer, config) -> None:
    """BPE tokens, merges and special ids from the tokenizer's tokenizer.json, and its chat template."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise NbalignError("export: GGUF export writes byte-level BPE tokenizers (GPT-2 style) only; this model's "
                           f"is {spec['model']['type']}.", "export as merged safetensors and convert with llama.cpp.")
    vocab = dict(spec["model"]["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    size = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, i in vocab.items():
        tokens[i] = text
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    types = [3 if i in special else 1 for i in range(size)]  # 3: control, 1: normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if "smollm" in str(config.name_or_path).lower() else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token_id in (("add_bos_token_id", tokenizer.bos_token_id), ("add_eos_token_id", tokenizer.eos_token_id),
                             ("add_unk_token_id", tokenizer.unk_token_id), ("add_pad_token_id", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, setter)(token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _check_gguf(target: Path, model, tokenizer, gguf_type: str) -> None:
    """Load the file back through transformers and compare next-token logits with the run's model."""
    import torch
    from transformers import AutoModelForCausalLM

    probe = tokenizer("The capital of France is", return_tensors="pt")
    back = AutoModelForCausalLM.from_pretrained(target.parent, gguf_file=target.name, dtype=torch.float32)
    with torch.no_grad():
        expected, got = model(**probe).logits[0, -1], back(**probe).logits[0, -1]
    similarity = torch.nn.functional.cosine_similarity(expected, got, dim=0).item()
    if similarity < (0.999 if gguf_type == "f16" else 0.99):
        raise NbalignError(f"export: the GGUF file '{target}' read back gives other logits than the run "
                           f"(cosine similarity {similarity:.4f}).",
                           "this is a bug in nbalign's export: please report it with the run's spec.json.")
