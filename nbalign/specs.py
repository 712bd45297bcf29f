"""Typed specs: what a training cell asks for, validated, JSON-serialisable.

Each field is documented once (its `help`), and the magics build their options from these fields, so a
new field is a new option everywhere. Keys a spec does not own are kept in `trl` and checked against the
method's TRL config when the run is built (see methods/), so any TRL field can be passed through.
"""

from __future__ import annotations

import math
import typing
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from .errors import NbalignError, unknown_option
from .spec_fields import BOOL_WORDS, Spec, choice, coerce, opt

BUILTIN_MODEL = "smollm2-135m"
# TrainSpec fields that may hold in-memory data: saved into the run folder, so spec.json replays, and checked
# against that copy on --resume.
DATA_FIELDS = ("data", "eval_data")


PADDING_FREE_HELP = ("batches flattened into one row without padding (same loss and gradients): auto (each batch "
                     "padded or flattened, whichever computes less), true (always), false (always padded, as TRL does)")


def checked_padding_free(value: Any, where: str) -> Any:
    """The padding_free option as given: "auto", true or false (a magic line's words for them included)."""
    if isinstance(value, str) and value.strip().lower() != "auto":
        value = coerce("padding_free", value, bool, where)
    choice("padding_free", value, ("auto", True, False), where)
    return value


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


def _lr(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-")


# Adapters that learn far fewer parameters than LoRA train at higher rates, in the ratios their papers and peft's
# examples use with AdamW (LoRA 2e-4; IA3 3e-3, T-Few; prefix tuning 1e-2; prompt tuning 3e-2).
FEW_PARAMETER_LR = {"ia3": 15, "prefix": 50, "prompt": 150}

# Rows per step when a spec gives no batch_size. Methods with `small_data_batches` take MIN_BATCH instead where the
# run would take fewer than MIN_STEPS optimizer steps at DEFAULT_BATCH: a small data set at 8 rows per step gives too
# few updates to learn a long target (measured on the built-in model, 3 epochs: the demo's reasoning-first JSON, 51
# rows, 21 steps at 8 -> 0/16 held-out answers in the form, 39 steps at 4 -> 16/16; the refusal data, 48 rows: 18
# steps -> 17% of the harmful prompts refused and a degenerate answer, 36 steps at 4 -> 100%). The same epochs, so the
# same rows and tokens, in more steps; not below 4, which is what was measured (a first version went down to 2: the
# suite's merge test, whose 2-epoch refusal run then took 48 steps of 2 instead of 12 of 8, ran 153 s instead of 115).
DEFAULT_BATCH, MIN_BATCH, MIN_STEPS = 8, 4, 30


@dataclass
class TrainSpec(Spec):
    """Options every training method shares. Method specs add their own."""

    method: typing.ClassVar[str] = "train"
    # The learning rate when none is given: (with an adapter, full fine-tuning). Defined here once per method,
    # shown by --help, used by the run.
    learning_rates: typing.ClassVar[tuple[float, float]] = (2e-4, 2e-5)
    # TRL config fields that mean a spec field: mapped onto it, so the step plan and TRL agree.
    trl_aliases: typing.ClassVar[dict] = {"num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size"}
    # Whether a spec without batch_size gets fewer rows per step on small data (DEFAULT_BATCH above).
    small_data_batches: typing.ClassVar[bool] = False
    # TRL config fields nbalign sets from a spec field of another shape: refused with the field to use.
    trl_refused: typing.ClassVar[dict] = {}

    model: str = opt(BUILTIN_MODEL, "base model: smollm2-135m, a hub id, a local folder, or a run folder")
    data: Any = opt(None, "training data: a notebook variable (list, DataFrame, Dataset) or a file path")
    out: str | None = opt(None, "run folder; default runs/<method>-<date>-<time>")
    eval_data: Any = opt(None, "held-out data in the same format, evaluated each epoch")
    epochs: float = opt(3.0, "passes over the data")
    learning_rate: float | None = opt(None, "peak learning rate; default {lr}")
    batch_size: int | None = opt(None, "examples per step (per device); default {batch}")
    max_length: int = opt(1024, "tokens per example; longer ones are truncated")
    seed: int = opt(42, "random seed for the adapter init and data order")
    intended_use: str | None = opt(None, "a line for the model card: what the model is for (and not for)")
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
    launch: str = opt(
        "here",
        "where training runs: here (this process), subprocess (its own process: the memory is back when it ends), "
        "or accelerate (accelerate launch, --num-processes of them: DDP, or FSDP/DeepSpeed from --accelerate-config)",
    )
    num_processes: int = opt(1, "processes for --launch accelerate (batch_size is per process)")
    accelerate_config: str | None = opt(None, "an accelerate config file for --launch accelerate (multi-node, FSDP, "
                                              "DeepSpeed)")

    @classmethod
    def help_values(cls) -> dict:
        adapter, full = cls.learning_rates
        batch = (f"{DEFAULT_BATCH}, or {MIN_BATCH} where the data would give fewer than {MIN_STEPS} optimizer steps at "
                 f"{DEFAULT_BATCH}" if cls.small_data_batches else str(DEFAULT_BATCH))
        return {"lr": f"{_lr(adapter)} with an adapter, {_lr(full)} for full fine-tuning", "batch": batch}

    def default_learning_rate(self) -> float:
        adapter, full = self.learning_rates
        return full if self.lora.type == "full" else adapter * FEW_PARAMETER_LR.get(self.lora.type, 1)

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
        from .adapters import resolve_adapter

        self.lora = resolve_adapter(self.lora)
        if self.data is None and not self.resume:
            raise NbalignError(
                f"%%{self.method}: no training data was given.",
                "pass --data NAME (a notebook variable) or --data path/to/file.jsonl.",
            )
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise NbalignError(f"%%{self.method}: 'epochs' must be positive, got {self.epochs}.", "use e.g. 3.")
        if self.batch_size is not None and self.batch_size < 1:
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
        self.launch = str(self.launch).strip().lower()
        if self.launch not in LAUNCHES:
            raise NbalignError(
                f"%%{self.method}: --launch must be one of {', '.join(LAUNCHES)}, got {self.launch!r}.",
                "use --launch subprocess for one process of its own, or --launch accelerate --num-processes 2.",
            )
        if self.num_processes < 1 or (self.num_processes > 1 and self.launch != "accelerate"):
            raise NbalignError(
                f"%%{self.method}: --num-processes {self.num_processes} needs --launch accelerate"
                + ("." if self.num_processes >= 1 else " and a count of 1 or more."),
                "add --launch accelerate, or drop --num-processes.",
            )
        if self.accelerate_config is not None and (self.launch != "accelerate"
                                                   or not Path(self.accelerate_config).is_file()):
            raise NbalignError(
                f"%%{self.method}: --accelerate-config '{self.accelerate_config}' "
                + ("needs --launch accelerate." if self.launch != "accelerate" else "is not a file."),
                "write one with `accelerate config --config_file FILE`, and add --launch accelerate.",
            )
        if not 0 <= self.replay < 1:
            raise NbalignError(
                f"%%{self.method}: 'replay' is the share of the training rows that are general replay rows, from 0 "
                f"up to (not including) 1; got {self.replay}.",
                "use e.g. replay: 0.2 (a fifth of the rows), or 0 for none.",
            )


# Where a run trains (TrainSpec.launch): in the notebook's process, or in processes of its own.
LAUNCHES = ("here", "subprocess", "accelerate")


@dataclass
class WatchSpec(TrainSpec):
    """Options of the methods that show what training changed and what it cost (the evaluation watch), and that
    train a causal LM on padded batches (SFT, DPO, KTO)."""

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
    padding_free: Any = opt("auto", PADDING_FREE_HELP)

    def __post_init__(self):
        super().__post_init__()
        self.padding_free = checked_padding_free(self.padding_free, self.where)
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
    small_data_batches: typing.ClassVar[bool] = True

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
