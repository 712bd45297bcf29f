"""How a run changes the weights (what %%lora sets): the adapter's spec, and one setting applied over another."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

from .errors import NbalignError
from .spec_fields import Spec, choice, opt


ADAPTER_TYPES = ("lora", "dora", "ia3", "prefix", "prompt", "full")
QUANTIZE = (None, "4bit")


@dataclass
class AdapterSpec(Spec):
    """How the weights change: what `%%lora` sets for the session."""

    where: typing.ClassVar[str] = "%%lora"

    type: str = opt("lora", "lora, dora (weight-decomposed LoRA), ia3 (learned scales of keys, values and the MLP), "
                            "prefix (prefix tuning: learned keys and values in every layer), prompt (prompt tuning: "
                            "learned input embeddings), or full (every weight trains)")
    r: int = opt(16, "LoRA rank: the adapter's width; trainable parameters grow linearly with it")
    alpha: int | None = opt(None, "LoRA scaling numerator (update scaled by alpha/r); default 2*r")
    dropout: float = opt(0.05, "dropout on the adapter's input")
    target_modules: Any = opt(
        "all-linear",
        "modules that get adapters: all-linear, or a list of names such as [q_proj, v_proj]",
    )
    quantize: str | None = opt(None, "4bit: load the frozen base in NF4 with double quantization (QLoRA)")
    virtual_tokens: int = opt(20, "prefix and prompt tuning: how many virtual tokens are learned")

    def __post_init__(self):
        self.type = str(self.type).lower()
        choice("type", self.type, ADAPTER_TYPES, self.where)
        if isinstance(self.quantize, str):
            self.quantize = self.quantize.lower().replace("-", "")
            if self.quantize in ("none", "null", "no", "false"):
                self.quantize = None
        choice("quantize", self.quantize, QUANTIZE, self.where)
        if self.type == "full" and self.quantize:
            raise NbalignError(
                "%%lora: full fine-tuning cannot train 4-bit weights.",
                "use `type: lora` with `quantize: 4bit` (QLoRA), or drop `quantize` for full fine-tuning.",
            )
        if self.quantize and self.type not in ("lora", "dora"):
            raise NbalignError(
                f"%%lora: 4-bit loading is offered with LoRA and DoRA (QLoRA), not with type {self.type}.",
                "use `type: lora` with `quantize: 4bit`, or drop `quantize`.",
            )
        if self.virtual_tokens < 1:
            raise NbalignError(f"%%lora: 'virtual_tokens' must be at least 1, got {self.virtual_tokens}.",
                               "use e.g. virtual_tokens: 20.")
        if self.r < 1:
            raise NbalignError(f"%%lora: 'r' must be at least 1, got {self.r}.", "use a rank such as 8 or 16.")
        if self.alpha is not None and not self.alpha > 0:
            raise NbalignError(f"%%lora: 'alpha' must be positive, got {self.alpha}.", "use e.g. alpha: 32.")
        if not 0 <= self.dropout < 1:
            raise NbalignError(f"%%lora: 'dropout' must be in [0, 1), got {self.dropout}.", "use e.g. 0.05.")
        if isinstance(self.target_modules, str) and "," in self.target_modules:
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if not self.target_modules or not isinstance(self.target_modules, (str, list)):
            raise NbalignError(
                f"%%lora: 'target_modules' must be 'all-linear' or a list of module names, got "
                f"{self.target_modules!r}.",
                "write `target_modules: all-linear` or `target_modules: [q_proj, v_proj]`.",
            )

    @property
    def scaling_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.r

    def describe(self) -> str:
        if self.type == "full":
            return "full fine-tuning"
        if self.type == "ia3":
            targets = "keys, values and MLP down projections" if self.target_modules == "all-linear" else \
                ",".join([self.target_modules] if isinstance(self.target_modules, str) else self.target_modules)
            return f"IA3 on {targets}"
        if self.type == "prefix":
            return f"prefix tuning, {self.virtual_tokens} virtual tokens in every layer"
        if self.type == "prompt":
            return f"prompt tuning, {self.virtual_tokens} virtual input tokens"
        kind = ("QLoRA 4-bit" if self.quantize else "LoRA") + (" + DoRA" if self.type == "dora" else "")
        targets = self.target_modules if isinstance(self.target_modules, str) else ",".join(self.target_modules)
        return f"{kind} r={self.r} alpha={self.scaling_alpha} on {targets}"


def resolve_adapter(override: Any, current: AdapterSpec | None = None) -> AdapterSpec:
    """`current` (the session's %%lora setting, or the default) changed by a cell's `lora:` override."""
    current = current or AdapterSpec()
    if override is None:
        return current
    if isinstance(override, AdapterSpec):
        return override
    if isinstance(override, str):
        return AdapterSpec.from_dict({**current.to_dict(), "type": override})
    if isinstance(override, dict):
        return AdapterSpec.from_dict({**current.to_dict(), **override})
    raise NbalignError(
        f"'lora' must be a mapping of %%lora fields or one of lora/dora/full, got {override!r}.",
        "write e.g. `lora: {r: 8}` or `lora: full` in the cell body.",
    )
