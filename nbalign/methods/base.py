"""The life of a training run, shared by every method.

Everything that can be checked is checked before the run folder is touched; then the folder is written
(spec first, status last), training runs under an interrupt guard, and the model is freed whatever
happens, with no traceback left holding tensors.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import shutil
import sys
import traceback
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import NbalignError, unknown_option
from ..runs import Run, default_out, latest_checkpoint, prepare_folder, read_status, set_status, write_json_atomic
from ..session import session
from ..specs import AdapterSpec, TrainSpec, coerce

# Config fields nbalign sets from the run itself; a body that sets them would break the run folder.
RESERVED = {"output_dir", "resume_from_checkpoint", "push_to_hub", "hub_model_id"}


@dataclass
class Plan:
    """A run fully checked and ready to start; nothing has been written yet."""

    spec: TrainSpec
    out: Path
    adapter: AdapterSpec
    ref: Any  # models.ModelRef
    device: Any  # models.Device
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    config: Any  # the TRL config
    n_examples: int
    steps: int


class Method:
    """What a method module provides: its spec and TRL config classes, data preparation, and trainer."""

    name: str = "train"
    config_class: Any = None

    def build_datasets(self, spec, tokenizer) -> tuple[Any, Any, int]:
        raise NotImplementedError

    def config_defaults(self, spec, device, adapter: AdapterSpec, steps: int) -> dict:
        raise NotImplementedError

    def trainer_class(self):
        """The TRL trainer class this method trains with."""
        raise NotImplementedError

    def build_trainer(self, plan: Plan, model, callbacks: list, **extra):
        return self.trainer_class()(
            model=model,
            args=plan.config,
            train_dataset=plan.train_dataset,
            eval_dataset=plan.eval_dataset,
            processing_class=plan.tokenizer,
            callbacks=callbacks,
            **extra,
        )

    def load_model(self, plan: Plan):
        """The model to train: the base (parents merged) with the session's adapter applied."""
        from ..models import apply_adapter, load_model

        model = load_model(plan.ref, plan.device, plan.adapter)
        return apply_adapter(model, plan.adapter, plan.spec.seed)

    def extra_callbacks(self, plan: Plan) -> list:
        """Method-specific callbacks (e.g. the evaluation watch); they see the trainer's model."""
        return []

    def finish(self, plan: Plan, trainer) -> dict:
        """After training, with the model still loaded: numbers for the summary (e.g. the evaluation)."""
        return {}

    def planned_steps(self, spec, n_examples: int, extra: dict) -> int:
        return planned_steps(spec, n_examples, extra)


def common_defaults(spec: TrainSpec, device, steps: int) -> dict:
    """TRL config values every method shares: length, batch, device, logging, checkpoints."""
    return {
        "num_train_epochs": spec.epochs,
        "per_device_train_batch_size": spec.batch_size,
        "per_device_eval_batch_size": spec.batch_size,
        "seed": spec.seed,
        # Checkpointing trades time (1.3x measured in fp32, bench/) for memory a model this size does not need.
        "activation_checkpointing": False,
        "bf16": device.train_bf16,
        "fp16": False,
        "use_cpu": device.type == "cpu",
        "dataloader_pin_memory": device.type == "cuda",
        # About 50 points on the loss curve, whatever the run length.
        "logging_steps": max(1, steps // 50),
        "eval_strategy": "epoch" if spec.eval_data is not None else "no",
        # Checkpoints for --resume after a crash; an interrupt saves one on its own.
        "save_strategy": "steps",
        "save_steps": max(25, steps // 4),
        "save_total_limit": 1,
        "report_to": "none",
        "dataset_num_proc": None,
    }


def resolve_adapter(override: Any, current: AdapterSpec) -> AdapterSpec:
    """The session's %%lora setting, changed by a cell's `lora:` override if it has one."""
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


def checked_trl_fields(method: Method, spec: TrainSpec) -> dict:
    """The body's TRL fields, checked against the method's TRL config and typed; unknown fields are
    rejected with the nearest valid name."""
    cls = method.config_class
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    where = f"%%{method.name}"
    extra = {}
    for key, value in spec.trl.items():
        if key in RESERVED:
            raise NbalignError(f"{where}: '{key}' is set by nbalign from --out.", "remove it from the cell body.")
        if key not in fields:
            raise unknown_option(key, fields | spec.field_names() - {"trl"}, where)
        extra[key] = coerce(key, value, hints.get(key, Any), where)
    return extra


def trl_config(method: Method, spec: TrainSpec, out: Path, device, adapter, steps: int, extra: dict):
    """The method's TRL config: nbalign's defaults for this model size and device, then the body's
    (checked) TRL fields on top."""
    values = method.config_defaults(spec, device, adapter, steps)
    values.update(extra)
    values["output_dir"] = str(out / "checkpoints")
    try:
        return method.config_class(**values)
    except (ValueError, TypeError) as exc:
        raise NbalignError(
            f"%%{method.name}: the TRL config rejected these settings: {exc}", "fix the named field."
        ) from None


def plan_run(method: Method, spec: TrainSpec) -> Plan:
    from ..models import check_targets, load_tokenizer, pick_device, resolve, skeleton

    out = Path(spec.out) if spec.out else default_out(method.name)
    prepare_folder(out, method.name, resume=spec.resume, overwrite=spec.overwrite)
    if spec.resume:
        spec = _resume_spec(spec, out)
    extra = checked_trl_fields(method, spec)  # before anything slow: a typo fails at once
    adapter = resolve_adapter(spec.lora, session.adapter)
    ref = resolve(spec.model)
    check_targets(skeleton(ref), adapter, spec.model)
    device = pick_device()
    tokenizer = load_tokenizer(ref)
    train_dataset, eval_dataset, n = method.build_datasets(spec, tokenizer)
    steps = method.planned_steps(spec, n, extra)
    config = trl_config(method, spec, out, device, adapter, steps, extra)
    return Plan(spec, out, adapter, ref, device, tokenizer, train_dataset, eval_dataset, config, n, steps)


def planned_steps(spec: TrainSpec, n_examples: int, extra: dict) -> int:
    """Optimizer steps the run will take: what logging and checkpoint intervals are sized against.
    (Packing can lower it; the intervals only need the right order of magnitude.)"""
    if (extra.get("max_steps") or -1) > 0:
        return extra["max_steps"]
    accumulation = max(1, extra.get("gradient_accumulation_steps") or 1)
    per_epoch = -(-n_examples // (spec.batch_size * accumulation))
    return max(1, int(per_epoch * spec.epochs))


def _resume_spec(spec: TrainSpec, out: Path) -> TrainSpec:
    stored = json.loads((out / "spec.json").read_text())["spec"]
    data = spec.data if spec.data is not None else stored.get("data")
    if isinstance(data, dict) or data is None:
        raise NbalignError(
            f"--resume: the run in '{out}' was trained on in-memory data, which was not saved with it.",
            "pass the same data again with --data.",
        )
    given = spec.to_dict()
    if given.get("data") != stored.get("data"):
        raise NbalignError(
            f"--resume: the data differs from the data the run in '{out}' started with.",
            "pass the same data, or start a new run with --overwrite.",
        )
    return spec.replace(data=data)


def run(method: Method, spec: TrainSpec) -> Run:
    """Check, write, train, save; return the Run (finished or interrupted). Failures raise NbalignError."""
    from ..models import quiet

    with quiet():
        return _run(method, spec)


def _run(method: Method, spec: TrainSpec) -> Run:
    plan = plan_run(method, spec)
    out = plan.out
    if plan.spec.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    session.release()  # the model kept for generation is not needed while training: free it first
    _write_spec(method, plan)
    set_status(out, "running")
    print(
        f"nbalign {method.name}: {plan.spec.model} on {plan.device} | {plan.adapter.describe()} | "
        f"{plan.n_examples} examples, {plan.steps} steps -> {out}",
        flush=True,
    )
    error = _train(method, plan)
    if error is not None:
        raise error
    return Run(out)


def _write_spec(method: Method, plan: Plan) -> None:
    import peft
    import torch
    import transformers
    import trl

    from .. import __version__

    previous = {}
    if plan.spec.resume:
        previous = json.loads((plan.out / "spec.json").read_text())
    payload = {
        "method": method.name,
        "spec": plan.spec.to_dict(),
        "adapter": plan.adapter.to_dict(),
        "adapter_description": plan.adapter.describe(),
        "trl_config": {k: v for k, v in plan.config.to_dict().items() if not k.startswith("_")},
        "base_model_path": plan.ref.base,
        "parent_runs": list(plan.ref.parents),
        "device": str(plan.device),
        "seed": plan.spec.seed,
        "examples": plan.n_examples,
        "started": previous.get("started") or _dt.datetime.now().isoformat(timespec="seconds"),
        "versions": {
            "nbalign": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
            "python": sys.version.split()[0],
        },
    }
    write_json_atomic(plan.out / "spec.json", payload)


def _train(method: Method, plan: Plan) -> NbalignError | None:
    """Train and save. Returns the error to raise, so the caller raises it after every frame that held the
    model is gone (a traceback kept by IPython would otherwise keep the weights alive)."""
    from ..callbacks import InterruptGuard, LiveProgress, MetricsWriter, StopOnInterrupt
    from ..models import free_memory

    out = plan.out
    guard = InterruptGuard()
    state = {"trainer": None, "model": None}
    outcome, message, summary, own_error = "failed", None, {}, False
    try:
        model = method.load_model(plan)
        state["model"] = model
        extras = method.extra_callbacks(plan)
        callbacks = [MetricsWriter(out), *extras, LiveProgress(f"{method.name} {out.name}"), StopOnInterrupt(guard)]
        trainer = method.build_trainer(plan, model, callbacks)
        for callback in extras:
            if hasattr(callback, "bind"):
                callback.bind(trainer)
        state["trainer"] = trainer
        _quiet_default_progress(trainer)
        resume_from = str(latest_checkpoint(out)) if plan.spec.resume else None
        with guard:
            result = trainer.train(resume_from_checkpoint=resume_from)
        summary = _summary(trainer, result)
        _save_weights(trainer, plan)
        if not guard.requested:
            try:
                summary.update(method.finish(plan, trainer))
            except KeyboardInterrupt:
                summary["evaluation"] = "skipped: interrupted"
            except Exception as exc:  # noqa: BLE001 - the trained weights are saved; the evaluation is extra
                summary["evaluation"] = f"failed: {type(exc).__name__}: {exc}"
                (out / "error.log").write_text(traceback.format_exc())
        outcome = "interrupted" if guard.requested else "finished"
        if outcome == "finished":
            _write_model_card(method, plan, summary)
        else:
            message = f"stopped by the user at step {trainer.state.global_step}; re-run the cell with --resume"
    except KeyboardInterrupt:
        # Stopped mid-step: the weights are saved as they are, but a checkpoint written now could catch the
        # optimizer half-way, so --resume goes back to the last checkpoint saved between steps.
        trainer = state["trainer"]
        if trainer is not None:
            _save_weights(trainer, plan)
        last = latest_checkpoint(out)
        outcome = "interrupted"
        message = (
            f"stopped by the user mid-step; --resume continues from {last.name}"
            if last is not None
            else "stopped by the user before any checkpoint; start again with --overwrite"
        )
    except NbalignError as exc:  # keep the message only: the exception's traceback holds the model
        outcome, message, own_error = "failed", exc.message, True
    except Exception as exc:  # noqa: BLE001 - recorded in the run folder and reported as one paragraph
        outcome, message = "failed", f"{type(exc).__name__}: {exc}"
        (out / "error.log").write_text(traceback.format_exc())
    finally:
        trainer = state["trainer"]
        if trainer is not None:
            trainer.accelerator.free_memory()
        state.clear()
        model = trainer = None
        # Status last: a folder that says "finished" has its weights and card.
        set_status(out, outcome, message, summary=summary)
        free_memory()
    if outcome == "failed":
        if own_error:
            return NbalignError(f"{message} The run in '{out}' is marked failed.")
        return NbalignError(
            f"Training failed: {message}. The full traceback is in {out / 'error.log'}; the run is marked failed.",
            "read the log; if memory ran out, lower batch_size or max_length, or use `%%lora quantize: 4bit`.",
        )
    if outcome == "interrupted":
        print(f"nbalign: the run in {out} was interrupted and saved: {message}.")
    return None


def _quiet_default_progress(trainer) -> None:
    """Drop transformers' own progress output: LiveProgress shows the same, once."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils.notebook import NotebookProgressCallback

    for cb in (ProgressCallback, PrinterCallback, NotebookProgressCallback):
        trainer.remove_callback(cb)


def _summary(trainer, result) -> dict:
    metrics = dict(result.metrics or {})
    logs = trainer.state.log_history
    tokens = next((r["num_tokens"] for r in reversed(logs) if "num_tokens" in r), None)
    summary = {
        "steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0), 3),
        "train_loss": metrics.get("train_loss"),
        "final_loss": next((r["loss"] for r in reversed(logs) if "loss" in r), None),
        "runtime_s": round(metrics.get("train_runtime", 0.0), 2),
    }
    eval_loss = next((r["eval_loss"] for r in reversed(logs) if "eval_loss" in r), None)
    if eval_loss is not None:
        summary["eval_loss"] = eval_loss
    if tokens and metrics.get("train_runtime"):
        summary["tokens"] = int(tokens)
        summary["tokens_per_s"] = round(tokens / metrics["train_runtime"], 1)
    return {k: v for k, v in summary.items() if v is not None}


def _save_weights(trainer, plan: Plan) -> None:
    """The adapter (or, for full fine-tuning, the whole model) plus the tokenizer, written atomically."""
    import os
    import tempfile

    target = plan.out / ("model" if plan.adapter.type == "full" else "adapter")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=plan.out))
    try:
        trainer.model.save_pretrained(tmp)
        plan.tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_model_card(method: Method, plan: Plan, summary: dict) -> None:
    spec = plan.spec
    data = spec.to_dict()["data"]
    lines = [
        f"# {plan.out.name}",
        "",
        f"Trained with nbalign `%%{method.name}` from `{spec.model}` ({plan.adapter.describe()}).",
        "",
        "| | |",
        "|---|---|",
        f"| method | {method.name} |",
        f"| base model | {spec.model} |",
        f"| adapter | {plan.adapter.describe()} |",
        f"| data | {json.dumps(data) if not isinstance(data, str) else data} ({plan.n_examples} examples) |",
        f"| epochs | {spec.epochs:g} |",
        f"| learning rate | {plan.config.learning_rate:g} |",
        f"| batch size | {spec.batch_size} |",
        f"| device | {plan.device} |",
    ]
    lines += [f"| {k} | {v} |" for k, v in summary.items()]
    rm = method.name == "reward_model"
    auto = "AutoModelForSequenceClassification" if rm else "AutoModelForCausalLM"
    kw = ", num_labels=1" if rm else ""
    if plan.adapter.type == "full":
        usage = f'model = {auto}.from_pretrained("{plan.out}/model")'
    else:
        usage = (
            f'base = {auto}.from_pretrained("{plan.ref.base}"{kw})  # merged with parent runs, if any\n'
            f'model = PeftModel.from_pretrained(base, "{plan.out}/adapter")'
        )
    notebook = (f'nbalign.RewardModel("{plan.out}").score(prompt, answer)' if rm
                else f'nbalign.Run("{plan.out}").generate("...")')
    lines += ["", "## Use", "", "```python", f"from transformers import {auto}",
              "from peft import PeftModel", usage, "```", "", f"Or in a notebook: `{notebook}`.", ""]
    (plan.out / "README.md").write_text("\n".join(lines), encoding="utf-8")
