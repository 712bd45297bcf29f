"""Typed specs: what a training cell asks for, validated, JSON-serialisable.

Each field is documented once (its `help`), and the magics build their options from these fields, so a
new field is a new option everywhere. Keys a spec does not own are kept in `trl` and checked against the
method's TRL config when the run is built (see methods/), so any TRL field can be passed through.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import NbalignError, unknown_option

BUILTIN_MODEL = "smollm2-135m"


def opt(default: Any, help: str, *, line: bool = True, factory=None):
    """A documented spec field. `line=False` keeps it out of the magic's line options (body only)."""
    meta = {"help": help, "line": line}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _base_type(tp) -> tuple[type | None, bool]:
    """(the simple type a field holds, whether None is allowed); (None, _) for anything richer."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            return None, optional
        tp = args[0]
    if typing.get_origin(tp) is typing.Literal:
        return str, optional
    return (tp if tp in (int, float, bool, str) else None), optional


def coerce(name: str, value: Any, tp, where: str) -> Any:
    """Turn a YAML or command-line value into the field's type; PyYAML reads `2e-4` as a string."""
    base, optional = _base_type(tp)
    if value is None or base is None:
        return value
    if isinstance(value, str) and optional and value.strip().lower() in ("none", "null", "~"):
        return None
    try:
        if base is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("true", "yes", "on", "1"):
                    return True
                if low in ("false", "no", "off", "0"):
                    return False
                raise ValueError(value)
            return bool(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if base is int and isinstance(value, str):
            return int(float(value)) if float(value).is_integer() else int(value)
        return base(value)
    except (TypeError, ValueError):
        raise NbalignError(
            f"{where}: '{name}' must be {'an' if base is int else 'a'} {base.__name__}, got {value!r}.",
            f"write e.g. `{name}: {_example(base)}`.",
        ) from None


def _example(base: type) -> str:
    return {int: "8", float: "2.0e-4", bool: "true", str: "text"}[base]


def choice(name: str, value: Any, choices: tuple, where: str) -> None:
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise NbalignError(f"{where}: '{name}' must be one of {shown}, got {value!r}.", f"pick one of {shown}.")


class Spec:
    """Shared behaviour of spec dataclasses: building from dicts, checking, JSON."""

    where: typing.ClassVar[str] = "nbalign"

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict | None, *, passthrough: bool = False):
        """Build a spec. Unknown keys are an error, or with `passthrough` are kept in `trl` for the method to
        check against its TRL config (which knows its own fields)."""
        values = dict(values or {})
        own = cls.field_names() - {"trl"}
        known, extra = {}, {}
        for key, value in values.items():
            key = str(key).replace("-", "_")
            (known if key in own else extra)[key] = value
        if extra and not passthrough:
            raise unknown_option(next(iter(extra)), own, cls.where)
        if extra:
            known["trl"] = {**known.get("trl", {}), **extra}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in known and f.name != "trl":
                known[f.name] = coerce(f.name, known[f.name], hints[f.name], cls.where)
        return cls(**known)

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Spec):
        return value.to_dict()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return describe_data(value)


def describe_data(data: Any) -> dict:
    """A JSON stand-in for in-memory data: its kind, size and a fingerprint, so a resumed run can tell
    whether it was given the same data."""
    kind = type(data).__name__
    rows = None
    try:
        rows = len(data)
    except TypeError:
        pass
    try:
        if hasattr(data, "to_json") and hasattr(data, "columns"):  # pandas
            blob = data.to_json(orient="records", default_handler=str)
        elif hasattr(data, "to_list") and hasattr(data, "column_names"):  # datasets.Dataset
            blob = json.dumps(data.to_list(), sort_keys=True, default=str)
        else:
            blob = json.dumps(data, sort_keys=True, default=str)
        fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]
    except Exception:  # noqa: BLE001 - an unhashable object just has no fingerprint
        fingerprint = None
    return {"in_memory": kind, "rows": rows, "fingerprint": fingerprint}


ADAPTER_TYPES = ("lora", "dora", "full")
QUANTIZE = (None, "4bit")


@dataclass
class AdapterSpec(Spec):
    """How the weights change: what `%%lora` sets for the session."""

    where: typing.ClassVar[str] = "%%lora"

    type: str = opt("lora", "lora, dora (weight-decomposed LoRA), or full (every weight trains)")
    r: int = opt(16, "LoRA rank: the adapter's width; trainable parameters grow linearly with it")
    alpha: int | None = opt(None, "LoRA scaling numerator (update scaled by alpha/r); default 2*r")
    dropout: float = opt(0.05, "dropout on the adapter's input")
    target_modules: Any = opt(
        "all-linear",
        "modules that get adapters: all-linear, or a list of names such as [q_proj, v_proj]",
    )
    quantize: str | None = opt(None, "4bit: load the frozen base in NF4 with double quantization (QLoRA)")

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
        if self.r < 1:
            raise NbalignError(f"%%lora: 'r' must be at least 1, got {self.r}.", "use a rank such as 8 or 16.")
        if self.alpha is not None and self.alpha <= 0:
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
        kind = ("QLoRA 4-bit" if self.quantize else "LoRA") + (" + DoRA" if self.type == "dora" else "")
        targets = self.target_modules if isinstance(self.target_modules, str) else ",".join(self.target_modules)
        return f"{kind} r={self.r} alpha={self.scaling_alpha} on {targets}"


@dataclass
class TrainSpec(Spec):
    """Options every training method shares. Method specs add their own."""

    method: typing.ClassVar[str] = "train"

    model: str = opt(BUILTIN_MODEL, "base model: smollm2-135m, a hub id, a local folder, or a run folder")
    data: Any = opt(None, "training data: a notebook variable (list, DataFrame, Dataset) or a file path")
    out: str | None = opt(None, "run folder; default runs/<method>-<date>-<time>")
    eval_data: Any = opt(None, "held-out data in the same format, evaluated each epoch")
    epochs: float = opt(3.0, "passes over the data")
    learning_rate: float | None = opt(None, "peak learning rate; default 2e-4 with an adapter, 2e-5 full")
    batch_size: int = opt(8, "examples per step (per device)")
    max_length: int = opt(1024, "tokens per example; longer ones are truncated")
    seed: int = opt(42, "random seed for the adapter init and data order")
    resume: bool = opt(False, "continue an interrupted run in --out from its last checkpoint")
    overwrite: bool = opt(False, "replace a finished run in --out")
    lora: Any = opt(None, "override the session's %%lora for this cell: a mapping of %%lora fields, or 'full'")
    trl: dict = opt(None, "extra TRL config fields, passed through unchanged", line=False, factory=dict)

    def __post_init__(self):
        if self.data is None and not self.resume:
            raise NbalignError(
                f"%%{self.method}: no training data was given.",
                f"pass --data NAME (a notebook variable) or --data path/to/file.jsonl.",
            )
        if self.epochs <= 0:
            raise NbalignError(f"%%{self.method}: 'epochs' must be positive, got {self.epochs}.", "use e.g. 3.")
        if self.batch_size < 1:
            raise NbalignError(f"%%{self.method}: 'batch_size' must be at least 1.", "use e.g. 8.")
        if self.max_length < 8:
            raise NbalignError(f"%%{self.method}: 'max_length' {self.max_length} is too small.", "use e.g. 1024.")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise NbalignError(f"%%{self.method}: 'learning_rate' must be positive.", "use e.g. 2.0e-4.")
        if self.resume and self.overwrite:
            raise NbalignError(
                f"%%{self.method}: --resume and --overwrite contradict each other.",
                "use --resume to continue the run in --out, or --overwrite to start it again.",
            )


@dataclass
class SFTSpec(TrainSpec):
    """Supervised fine-tuning on demonstrations (messages, prompt/completion, or Alpaca columns)."""

    method: typing.ClassVar[str] = "sft"
    where: typing.ClassVar[str] = "%%sft"

    completion_only_loss: bool = opt(True, "loss on assistant/completion tokens only (false: every token)")
    packing: bool = opt(False, "pack several short examples into one max_length row")


@dataclass
class PreferenceSpec(TrainSpec):
    """Options shared by the methods that learn from comparisons: the evaluation they show."""

    watch: bool = opt(True, "measure the evaluation before, during and after training (shown at the end)")
    general_text: Any = opt(None, "text for the forgetting watch (perplexity before/after); default: built-in English")
    eval_points: int = opt(2, "evaluations during training, for the curves (0: only before and after)")
    eval_max_new_tokens: int = opt(64, "tokens generated per held-out prompt for the length and KL watch")

    def __post_init__(self):
        super().__post_init__()
        if self.eval_points < 0:
            raise NbalignError(f"{self.where}: 'eval_points' must be 0 or more.", "use e.g. 4.")
        if self.eval_max_new_tokens < 1:
            raise NbalignError(f"{self.where}: 'eval_max_new_tokens' must be positive.", "use e.g. 64.")


DPO_LOSSES = (
    "sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft",
)
REFERENCE_FREE = ("simpo", "orpo")
PRECOMPUTE = ("auto", True, False)


@dataclass
class DPOSpec(PreferenceSpec):
    """Direct preference optimisation and its family, from (prompt, chosen, rejected) pairs."""

    method: typing.ClassVar[str] = "dpo"
    where: typing.ClassVar[str] = "%%dpo"

    loss: Any = opt(
        "sigmoid",
        "sigmoid (DPO), ipo, hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, "
        "apo_down, discopop, sigmoid_norm; a weighted mixture like {sigmoid: 0.8, bco_pair: 0.2}; or the "
        "reference-free simpo and orpo",
    )
    beta: float | None = opt(None, "how far from the reference the policy may move; default 0.1 (simpo: 2.0)")
    sft_weight: float = opt(
        1.0,
        "weight of an SFT term on the chosen answers (RPO): keeps their likelihood rising so generations "
        "move, not only the margin; 0 for the pure loss",
    )
    precompute_ref: Any = opt("auto", "compute reference log-probs once before training: auto (when cheaper), true, false")

    def __post_init__(self):
        super().__post_init__()
        self.loss = self.loss_weights()  # normalised: {name: weight}
        if self.sft_weight < 0:
            raise NbalignError("%%dpo: 'sft_weight' must be 0 or more.", "use 1.0 (default) or 0 for the pure loss.")
        if self.beta is not None and self.beta <= 0:
            raise NbalignError("%%dpo: 'beta' must be positive.", "use e.g. beta: 0.1.")
        if isinstance(self.precompute_ref, str) and self.precompute_ref.lower() != "auto":
            self.precompute_ref = coerce("precompute_ref", self.precompute_ref, bool, self.where)
        choice("precompute_ref", self.precompute_ref, PRECOMPUTE, self.where)

    def loss_weights(self) -> dict:
        loss = self.loss
        if isinstance(loss, str):
            parts = [p.strip() for p in loss.replace("+", ",").split(",") if p.strip()]
            loss = {p: 1.0 for p in parts}
        elif isinstance(loss, (list, tuple)):
            loss = {str(p): 1.0 for p in loss}
        if not isinstance(loss, dict) or not loss:
            raise NbalignError(
                f"%%dpo: 'loss' must be a loss name, a list, or a mapping of name to weight, got {self.loss!r}.",
                "write e.g. `loss: ipo` or `loss: {sigmoid: 0.8, bco_pair: 0.2}`.",
            )
        names = {str(k).lower(): coerce(f"loss weight of {k}", v, float, self.where) for k, v in loss.items()}
        valid = DPO_LOSSES + REFERENCE_FREE
        for name in names:
            if name not in valid:
                raise unknown_option(name, valid, "%%dpo loss")
        free = [n for n in names if n in REFERENCE_FREE]
        if free and len(names) > 1:
            raise NbalignError(
                f"%%dpo: {free[0]} is its own trainer and cannot be mixed with other losses.",
                f"use `loss: {free[0]}` alone (its SFT term is set by sft_weight).",
            )
        return names

    @property
    def reference_free(self) -> str | None:
        name = next(iter(self.loss))
        return name if name in REFERENCE_FREE else None


@dataclass
class KTOSpec(PreferenceSpec):
    """Kahneman-Tversky optimisation from unpaired thumbs: (prompt, completion, label)."""

    method: typing.ClassVar[str] = "kto"
    where: typing.ClassVar[str] = "%%kto"

    beta: float = opt(0.1, "how far from the reference the policy may move")
    unpair: bool = opt(False, "accept preference pairs: each becomes a thumbs-up (chosen) and a thumbs-down row")
    desirable_weight: float | None = opt(None, "loss weight of thumbs-up rows; default balances skewed classes")
    undesirable_weight: float | None = opt(None, "loss weight of thumbs-down rows; default balances skewed classes")
    precompute_ref: Any = opt("auto", "compute reference log-probs once before training: auto (when cheaper), true, false")

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise NbalignError("%%kto: 'beta' must be positive.", "use e.g. beta: 0.1.")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise NbalignError(f"%%kto: '{name}' must be positive.", "leave it unset to balance automatically.")
        if isinstance(self.precompute_ref, str) and self.precompute_ref.lower() != "auto":
            self.precompute_ref = coerce("precompute_ref", self.precompute_ref, bool, self.where)
        choice("precompute_ref", self.precompute_ref, PRECOMPUTE, self.where)


@dataclass
class RewardSpec(TrainSpec):
    """A Bradley-Terry reward model: a scalar head on the base, trained on (prompt, chosen, rejected) pairs."""

    method: typing.ClassVar[str] = "reward_model"
    where: typing.ClassVar[str] = "%%reward_model"

    center_rewards: float | None = opt(0.01, "pull scores towards zero mean (coefficient; null to turn off)")


RL_ALGORITHMS = ("grpo", "rloo")


@dataclass
class RLHFSpec(TrainSpec):
    """Online RL: the model answers prompts, a reward model or Python functions score the answers, and the
    policy moves towards high reward with a KL penalty to the reference."""

    method: typing.ClassVar[str] = "rlhf"
    where: typing.ClassVar[str] = "%%rlhf"

    reward: Any = opt(None, "a %%reward_model run folder, or Python reward function(s) by notebook name")
    algorithm: str = opt("grpo", "grpo (group-relative advantages) or rloo (leave-one-out baseline)")
    beta: float = opt(0.05, "KL penalty to the reference: higher keeps the policy closer")
    num_generations: int = opt(4, "answers sampled per prompt; the advantage compares them")
    max_completion_length: int = opt(64, "tokens per sampled answer")
    temperature: float = opt(1.0, "sampling temperature of the answers")
    epochs: float = opt(1.0, "passes over the prompts")
    batch_size: int = opt(8, "answers per step (per device); a multiple of num_generations")

    def __post_init__(self):
        super().__post_init__()
        self.algorithm = str(self.algorithm).lower()
        choice("algorithm", self.algorithm, RL_ALGORITHMS, self.where)
        if self.reward is None:
            raise NbalignError(
                "%%rlhf: no reward was given.",
                "pass --reward runs/rm1 (a %%reward_model run) or --reward my_fn (a Python function in the notebook).",
            )
        if self.num_generations < 2:
            raise NbalignError("%%rlhf: 'num_generations' must be at least 2 to compare answers.", "use e.g. 4.")
        if self.batch_size % self.num_generations:
            raise NbalignError(
                f"%%rlhf: batch_size {self.batch_size} is not a multiple of num_generations {self.num_generations}.",
                f"use batch_size {self.num_generations * max(1, self.batch_size // self.num_generations)}.",
            )
        if self.beta < 0:
            raise NbalignError("%%rlhf: 'beta' must be 0 or more.", "use e.g. beta: 0.05.")
