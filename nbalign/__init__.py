"""nbalign: fine-tune and align language models from a Jupyter notebook.

`%load_ext nbalign` registers the magics; the same things are plain functions here. Importing nbalign is
cheap: torch, transformers and TRL load on first use.
"""

from __future__ import annotations

import logging
import warnings

from .version import __version__

# peft says at every forward of a prefix- or prompt-tuned model that it ignores the position ids it is given: it
# places the virtual tokens itself, so nothing is wrong, and the notice would fill a cell's output.
warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning",
                        category=UserWarning)


class _OptionalKernelNotices(logging.Filter):
    """On a CPU with AVX512-bf16, importing bitsandbytes (peft imports it) fetches an optional 4-bit CPU kernel
    from the Hugging Face Hub. Offline, or without the `kernels` package, it works without it, but says so at
    import in two warnings a notebook shows in red: kernels that it skipped the kernel's publisher check,
    bitsandbytes that it could not load the kernel. Only those two are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format is the handler's to report, not ours
            return True
        return not ("'kernels-community/quantization-bitsandbytes'" in text
                    or text.startswith("Failed to load CPU gemm_4bit_forward from kernels-community"))


# Filters on the loggers themselves (getLogger imports nothing): a logger's filter sees only its own records.
for _name in ("kernels._internals.hf_hub", "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_name).addFilter(_OptionalKernelNotices())

__all__ = [
    "lora", "sft", "dpo", "kto", "reward_model", "rlhf", "merge", "compare", "chat", "evaluate", "replay", "RewardModel", "list_runs", "generate",
    "Run", "label_pairs", "label_thumbs", "LabelStore", "prelabel", "agreement", "revise", "make_judge",
    "NbalignError", "session", "load_ipython_extension", "examples", "__version__",
]

_LAZY = {
    "lora": ("api", "lora"),
    "sft": ("api", "sft"),
    "dpo": ("api", "dpo"),
    "kto": ("api", "kto"),
    "reward_model": ("api", "reward_model"),
    "rlhf": ("api", "rlhf"),
    "merge": ("api", "merge"),
    "compare": ("views", "compare"),
    "chat": ("views", "chat"),
    "evaluate": ("api", "evaluate"),
    "replay": ("api", "replay"),
    "RewardModel": ("runs", "RewardModel"),
    "list_runs": ("api", "list_runs"),
    "generate": ("api", "generate"),
    "Run": ("runs", "Run"),
    "label_pairs": ("api", "label_pairs"),
    "label_thumbs": ("api", "label_thumbs"),
    "LabelStore": ("labeling.store", "LabelStore"),
    "prelabel": ("labeling.judge", "prelabel"),
    "make_judge": ("labeling.judge", "make_judge"),
    "agreement": ("labeling.agreement", "agreement"),
    "revise": ("labeling.constitution", "revise"),
    "NbalignError": ("errors", "NbalignError"),
    "session": ("_session", "session"),
}


def __getattr__(name):
    import importlib

    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    if name == "examples":
        return importlib.import_module(".examples", __name__)
    raise AttributeError(f"module 'nbalign' has no attribute {name!r}")


def load_ipython_extension(ipython):
    from .magics import load_ipython_extension as _load

    _load(ipython)
