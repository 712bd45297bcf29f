"""Typed specs: what a training cell asks for, validated, JSON-serialisable.

Each field is documented once (its `help`), and the magics build their options from these fields, so a
new field is a new option everywhere. Keys a spec does not own are kept in `trl` and checked against the
method's TRL config when the run is built (see methods/), so any TRL field can be passed through.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import NbalignError, unknown_option

BUILTIN_MODEL = "smollm2-135m"
# TrainSpec fields that may hold in-memory data: saved into the run folder, so spec.json replays, and checked
# against that copy on --resume.
DATA_FIELDS = ("data", "eval_data")


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


# How a YAML body or a magic line writes a boolean.
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def checked_probe(value: Any, where: str) -> Any:
    """The knowledge probe option as given: true, false, or [{question, answer}] rows (a magic line's 'false'
    is False); anything else is refused with the fix."""
    if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
        return BOOL_WORDS[value.strip().lower()]
    if value is None or isinstance(value, bool) or (isinstance(value, (list, tuple)) and all(
            isinstance(r, dict) and isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)
            for r in value)):
        return value
    raise NbalignError(
        f"{where}: 'probe' must be true, false, or a list of {{question, answer}} rows, got {value!r:.80}.",
        "write e.g. `probe: [{question: 'What is the capital of France?', answer: Paris}]`, or `probe: false` "
        "(`--probe false` on the line).",
    )


def coerce(name: str, value: Any, tp, where: str, example: Any = None) -> Any:
    """Turn a YAML or command-line value into the field's type; PyYAML reads `2e-4` as a string."""
    base, optional = _base_type(tp)
    if value is None or base is None:
        return value
    if isinstance(value, str) and optional and value.strip().lower() in ("none", "null", "~"):
        return None
    try:
        if base is bool:
            if isinstance(value, str):
                if value.strip().lower() in BOOL_WORDS:
                    return BOOL_WORDS[value.strip().lower()]
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
            f"write e.g. `{name}: {_example(base, example)}`.",
        ) from None


def _example(base: type, example: Any = None) -> str:
    """A value of the right type to show in a fix: the field's own default when it has one."""
    if example is not None and isinstance(example, bool) == (base is bool):
        return str(example).lower() if base is bool else f"{example:g}" if base is float else str(example)
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
        known, extra = {}, dict(values.pop("trl", None) or {})
        for key, value in values.items():
            key = str(key).replace("-", "_")
            (known if key in own else extra)[key] = value
        if extra and not passthrough:
            raise unknown_option(next(iter(extra)), own, cls.where)
        if extra:
            known["trl"] = extra
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in known and f.name != "trl":
                default = f.default if f.default is not dataclasses.MISSING else None
                known[f.name] = coerce(f.name, known[f.name], hints[f.name], cls.where, example=default)
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
    described = {"in_memory": kind, "rows": rows, "fingerprint": fingerprint}
    if isinstance(getattr(data, "provenance", None), dict):  # rows made from a label store (labeling/store.py)
        described.update(labels=data.provenance, summary=data.summary)
    return described


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


def _lr(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-")


@dataclass
class TrainSpec(Spec):
    """Options every training method shares. Method specs add their own."""

    method: typing.ClassVar[str] = "train"
    # The learning rate when none is given: (with an adapter, full fine-tuning). Defined here once per method,
    # shown by --help, used by the run.
    learning_rates: typing.ClassVar[tuple[float, float]] = (2e-4, 2e-5)
    # TRL config fields that mean a spec field: mapped onto it, so the step plan and TRL agree.
    trl_aliases: typing.ClassVar[dict] = {"num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size"}
    # TRL config fields nbalign sets from a spec field of another shape: refused with the field to use.
    trl_refused: typing.ClassVar[dict] = {}

    model: str = opt(BUILTIN_MODEL, "base model: smollm2-135m, a hub id, a local folder, or a run folder")
    data: Any = opt(None, "training data: a notebook variable (list, DataFrame, Dataset) or a file path")
    out: str | None = opt(None, "run folder; default runs/<method>-<date>-<time>")
    eval_data: Any = opt(None, "held-out data in the same format, evaluated each epoch")
    epochs: float = opt(3.0, "passes over the data")
    learning_rate: float | None = opt(None, "peak learning rate; default {lr}")
    batch_size: int = opt(8, "examples per step (per device)")
    max_length: int = opt(1024, "tokens per example; longer ones are truncated")
    seed: int = opt(42, "random seed for the adapter init and data order")
    resume: bool = opt(False, "continue an interrupted run in --out from its last checkpoint")
    overwrite: bool = opt(False, "replace a finished run in --out")
    lora: Any = opt(
        None,
        "the adapter for this run: a mapping of %%lora fields or 'full', applied over the session's %%lora "
        "setting (spec.json records the whole adapter)",
    )
    replay: float = opt(
        0.0,
        "share of the training rows that are general questions answered by the base model itself (built in, "
        "offline), mixed in against forgetting; e.g. 0.2",
    )
    trl: dict = opt(None, "extra TRL config fields, passed through unchanged", line=False, factory=dict)

    @classmethod
    def help_values(cls) -> dict:
        adapter, full = cls.learning_rates
        return {"lr": f"{_lr(adapter)} with an adapter, {_lr(full)} for full fine-tuning"}

    def default_learning_rate(self) -> float:
        adapter, full = self.learning_rates
        return full if self.lora.type == "full" else adapter

    @classmethod
    def from_dict(cls, values: dict | None, *, passthrough: bool = False):
        values = dict(values or {})
        trl = dict(values.pop("trl", None) or {})
        for key in [k for k in values if str(k).replace("-", "_") not in cls.field_names()]:
            trl[str(key).replace("-", "_")] = values.pop(key)
        for key in list(trl):
            if key in cls.trl_refused:
                raise NbalignError(
                    f"{cls.where}: '{key}' is a TRL field that nbalign sets from `{cls.trl_refused[key]}`.",
                    f"set `{cls.trl_refused[key]}` instead (see `{cls.where} --help`).",
                )
            if key in cls.trl_aliases:
                field_name = cls.trl_aliases[key]
                value = trl.pop(key)
                if field_name in values and coerce(field_name, values[field_name], typing.get_type_hints(cls)[
                        field_name], cls.where) != coerce(field_name, value, typing.get_type_hints(cls)[field_name],
                                                          cls.where):
                    raise NbalignError(
                        f"{cls.where}: '{key}: {value}' (a TRL field) and '{field_name}: {values[field_name]}' "
                        "disagree; they set the same thing.",
                        f"keep only `{field_name}`.",
                    )
                values[field_name] = value
        if trl:
            if not passthrough:
                raise unknown_option(next(iter(trl)), cls.field_names() - {"trl"}, cls.where)
            values["trl"] = trl
        return super().from_dict(values, passthrough=passthrough)

    def __post_init__(self):
        self.lora = resolve_adapter(self.lora)
        if self.data is None and not self.resume:
            raise NbalignError(
                f"%%{self.method}: no training data was given.",
                "pass --data NAME (a notebook variable) or --data path/to/file.jsonl.",
            )
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise NbalignError(f"%%{self.method}: 'epochs' must be positive, got {self.epochs}.", "use e.g. 3.")
        if self.batch_size < 1:
            raise NbalignError(f"%%{self.method}: 'batch_size' must be at least 1.", "use e.g. 8.")
        if self.max_length < 8:
            raise NbalignError(f"%%{self.method}: 'max_length' {self.max_length} is too small.", "use e.g. 1024.")
        if self.learning_rate is not None and not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise NbalignError(f"%%{self.method}: 'learning_rate' must be positive.", "use e.g. 2.0e-4.")
        if not 0 <= self.seed < 2**32:
            raise NbalignError(
                f"%%{self.method}: 'seed' must be a whole number from 0 to 2**32 - 1, got {self.seed}.",
                "use e.g. seed: 42.",
            )
        if self.resume and self.overwrite:
            raise NbalignError(
                f"%%{self.method}: --resume and --overwrite contradict each other.",
                "use --resume to continue the run in --out, or --overwrite to start it again.",
            )
        if self.out is not None and not str(self.out).strip():
            raise NbalignError(f"%%{self.method}: --out is empty.", "give a folder, e.g. --out runs/run1.")
        if not 0 <= self.replay < 1:
            raise NbalignError(
                f"%%{self.method}: 'replay' is the share of the training rows that are general replay rows, from 0 "
                f"up to (not including) 1; got {self.replay}.",
                "use e.g. replay: 0.2 (a fifth of the rows), or 0 for none.",
            )


@dataclass
class WatchSpec(TrainSpec):
    """Options of the methods that show what training changed and what it cost (the evaluation watch)."""

    watch: bool = opt(True, "measure the evaluation before, during and after training (shown at the end)")
    general_text: Any = opt(None, "text for the forgetting watch (perplexity before/after); default: built-in English")
    eval_points: int = opt(2, "evaluations during training, for the curves (0: only before and after)")
    eval_max_new_tokens: int = opt(64, "tokens generated per held-out prompt (answers, their form, content, length, KL)")
    probe: Any = opt(
        True,
        "the knowledge probe: simple factual and arithmetic questions the base answers right, checked by content "
        "before and after (the forgetting watch); false to skip, or your own [{question, answer}] rows",
    )
    fewshot: int = opt(
        3,
        "the prompting baseline: before training, answer the held-out prompts with this many training examples as "
        "demonstrations in the prompt (0: skip); shown beside the tuned result",
    )

    def __post_init__(self):
        super().__post_init__()
        if self.eval_points < 0:
            raise NbalignError(f"{self.where}: 'eval_points' must be 0 or more.", "use e.g. 4.")
        if self.eval_max_new_tokens < 1:
            raise NbalignError(f"{self.where}: 'eval_max_new_tokens' must be positive.", "use e.g. 64.")
        if self.fewshot < 0:
            raise NbalignError(f"{self.where}: 'fewshot' must be 0 or more.", "use e.g. fewshot: 3, or 0 to skip.")
        self.probe = checked_probe(self.probe, self.where)


@dataclass
class SFTSpec(WatchSpec):
    """Supervised fine-tuning on demonstrations (messages, prompt/completion, or Alpaca columns)."""

    method: typing.ClassVar[str] = "sft"
    where: typing.ClassVar[str] = "%%sft"

    completion_only_loss: bool = opt(True, "loss on assistant/completion tokens only (false: every token)")
    packing: bool = opt(False, "pack several short examples into one max_length row")
    eval_split: float = opt(
        0.1,
        "without --eval-data: the share of the training rows held out (not trained on) for the evaluation, when "
        "there are 20 rows or more; 0 trains on every row and evaluates on a sample of them, labelled as such",
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.eval_split <= 0.5:
            raise NbalignError(
                f"%%sft: 'eval_split' must be from 0 to 0.5, got {self.eval_split}.",
                "use e.g. eval_split: 0.1, or 0 to train on every row.",
            )
