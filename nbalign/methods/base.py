"""The life of a training run, shared by every method.

Everything that can be checked is checked before the run folder is touched; then the folder is written
(spec first, status last), training runs under an interrupt guard, and the model is freed whatever
happens, with no traceback left holding tensors. A method object holds no per-run state: what one run
learns while it is prepared (counts, held-out rows, rewards, the evaluation watch) travels in its Plan.
"""

from __future__ import annotations

import datetime as _dt
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import memory, runfolder
from ..errors import NbalignError
from ..generation import CACHE
from ..memory import MiB, PeakMeter
from ..clock import Clock, describe_times
from ..runs import Run
from ..adapters import AdapterSpec
from ..spec_fields import describe_data
from ..specs import DATA_FIELDS, TrainSpec
from .card import model_card
from .config import checked_trl_fields, common_defaults, planned_steps, trl_config, with_batch_size
from .inputs import check_overwrite, in_memory_records, resume_spec
from .launch import finished_run, is_main_process, launch, launched_here, world_size


@dataclass
class Prepared:
    """A method's datasets, and what it learnt about the data while preparing them."""

    train: Any
    eval: Any
    n_examples: int
    state: dict = field(default_factory=dict)  # per-run values: class counts, held-out rows, rewards, ...


@dataclass
class Plan:
    """A run fully checked and ready to start; nothing has been written yet. The one copy of its spec."""

    spec: TrainSpec
    out: Path
    ref: Any  # models.ModelRef
    device: Any  # devices.Device
    tokenizer: Any
    data: Prepared
    config: Any  # the TRL config
    steps: int
    records: dict = field(default_factory=dict)  # in-memory data as rows, saved with the run
    clock: Clock = field(default_factory=Clock)
    memory: Any = None  # memory.Estimate, made before loading

    @property
    def adapter(self) -> AdapterSpec:
        return self.spec.lora

    @property
    def state(self) -> dict:
        return self.data.state


class Method:
    """What a method module provides: its TRL config and trainer classes, data preparation, defaults."""

    name: str = "train"
    # The smallest rows per step a batch that does not fit in memory may be split into (None: never split).
    min_micro_batch: int | None = 1

    def config_class(self, spec):
        raise NotImplementedError

    def trainer_class(self, spec):
        raise NotImplementedError

    def prepare(self, spec, tokenizer) -> Prepared:
        raise NotImplementedError

    def config_defaults(self, spec, device, steps: int, prepared: Prepared) -> dict:
        return common_defaults(spec, device, steps)

    def memory_shape(self, spec, tokenizer, prepared: Prepared) -> dict:
        """The largest batch the run trains on, for the memory estimate: sequences at once and their length (the
        longest row, within max_length), each example's sequence lengths (`units`), the tokens the loss reads, a
        separate reference copy, generated tokens."""
        columns = prepared.train.column_names
        lengths = [len(ids) for ids in prepared.train["input_ids"]] if "input_ids" in columns else [spec.max_length]
        packed = getattr(spec, "packing", False)  # packed rows fill max_length
        longest = spec.max_length if packed else min(max(lengths), spec.max_length)
        units = None if packed else [(min(n, spec.max_length),) for n in lengths]
        return {"sequences": spec.batch_size, "length": longest, "units": units}

    def planned_steps(self, spec, n_examples: int, extra: dict) -> int:
        return planned_steps(spec, n_examples, extra)

    def build_trainer(self, plan: Plan, model, callbacks: list, **extra):
        return self.trainer_class(plan.spec)(
            model=model,
            args=plan.config,
            train_dataset=plan.data.train,
            eval_dataset=plan.data.eval,
            processing_class=plan.tokenizer,
            callbacks=callbacks,
            **extra,
        )

    def load_model(self, plan: Plan):
        """The model to train: the base (parents merged) with the run's adapter applied."""
        from ..models import apply_adapter, load_model

        model = load_model(plan.ref, plan.device, plan.adapter)
        if hasattr(model, "peft_config"):
            raise NbalignError(
                f"The model '{plan.spec.model}' ends in a prefix or prompt tuning run: its virtual tokens cannot be "
                "merged into the weights another run starts from.",
                "train from that run's base model, or use LoRA or IA3 for a run to build on.")
        return apply_adapter(model, plan.adapter, plan.spec.seed)

    def extra_callbacks(self, plan: Plan) -> list:
        """Method-specific callbacks (e.g. the evaluation watch); they see the trainer's model."""
        return []

    def finish(self, plan: Plan, trainer) -> dict:
        """After training, with the model still loaded: numbers for the summary (e.g. the evaluation)."""
        return {}

    def stored_values(self, spec) -> dict:
        """Spec fields spec.json records in another form than spec.to_dict() gives (e.g. functions by name)."""
        return {}

    def card_usage(self, plan: Plan) -> tuple[str, str]:
        """(the transformers Auto class that loads the weights, a notebook line that uses the run)."""
        return "AutoModelForCausalLM", f'nbalign.Run("{plan.out}").generate("...")'


def plan_run(method: Method, spec: TrainSpec) -> Plan:
    from ..devices import pick_device
    from ..models import check_targets, load_tokenizer, resolve, skeleton

    out = Path(spec.out) if spec.out else runfolder.default_out(method.name)
    if not launched_here(out):  # a launched process trains the folder its launcher checked and wrote
        runfolder.prepare_folder(out, resume=spec.resume, overwrite=spec.overwrite)
    if spec.resume:
        spec = resume_spec(spec, out)
    config_class = method.config_class(spec)
    extra = checked_trl_fields(config_class, spec)  # before anything slow: a typo fails at once
    ref = resolve(spec.model)
    skel = skeleton(ref)
    check_targets(skel, spec.lora, spec.model)
    device = pick_device()
    check_overwrite(spec, out, ref)
    tokenizer = load_tokenizer(ref)
    prepared = method.prepare(spec, tokenizer)
    records = in_memory_records(spec)  # after prepare(), whose errors name the rows and the fix
    spec = with_batch_size(spec, prepared.n_examples, extra)
    steps = method.planned_steps(spec, prepared.n_examples, extra)
    defaults = method.config_defaults(spec, device, steps, prepared)
    fields = config_class.__dataclass_fields__  # the order the trainer draws its batches in, for the estimate
    sampling = "unknown" if extra.get("shuffle_dataset") else \
        extra.get("train_sampling_strategy", fields["train_sampling_strategy"].default)
    need, micro, checkpointing = memory.needed_for(method, spec, skel, device, tokenizer, prepared, extra, steps,
                                                   sampling)
    if micro < spec.batch_size:  # the same effective batch: fewer rows per step, accumulated
        defaults.update(per_device_train_batch_size=micro, per_device_eval_batch_size=micro)
        extra = {**extra, "gradient_accumulation_steps": spec.batch_size // micro}
    defaults["activation_checkpointing"] = checkpointing
    config = trl_config(config_class, spec, out, defaults, extra)
    return Plan(spec, out, ref, device, tokenizer, prepared, config, steps, records, memory=need)


def run(method: Method, spec: TrainSpec) -> Run:
    """Check, write, train, save; return the Run (finished or interrupted). Failures raise NbalignError."""
    from ..devices import quiet

    with quiet():
        return _run(method, spec)


def _run(method: Method, spec: TrainSpec) -> Run:
    clock = Clock()
    with clock.phase("data"):  # the checks, the tokenizer and the data, before anything is written
        plan = plan_run(method, spec)
    plan.clock = clock
    out = plan.out
    if plan.spec.launch != "here":
        launch(method.name, plan, lambda: _write_spec(method, plan))
        return finished_run(out)
    main = is_main_process()
    if not launched_here(out):
        runfolder.start(out, overwrite=plan.spec.overwrite)
        CACHE.release()  # the model kept for generation is not needed while training: free it first
        _write_spec(method, plan)
    if main:
        runfolder.set_status(out, "running")
        processes = f" x {world_size()} processes" if world_size() > 1 else ""
        print(
            f"nbalign {method.name}: {plan.spec.model} on {plan.device}{processes} | {plan.adapter.describe()} | "
            f"{plan.data.n_examples} examples, {plan.steps} steps of {plan.spec.batch_size} rows | "
            f"memory {plan.memory} -> {out}",
            flush=True,
        )
    error = _train(method, plan, main)
    if error is not None:
        raise error
    return Run(out)


def spec_payload(spec: TrainSpec, saved: dict) -> dict:
    """spec.to_dict() with in-memory data replaced by where it was saved in the run folder."""
    values = spec.to_dict()
    for name, rel in saved.items():
        values[name] = {**describe_data(getattr(spec, name)), "saved": rel}
    return values


def _write_spec(method: Method, plan: Plan) -> None:
    import peft
    import torch
    import transformers
    import trl

    from ..version import __version__

    previous = runfolder.read_spec(plan.out) if plan.spec.resume else {}
    saved = {name: runfolder.save_data(plan.out, name, rows) for name, rows in plan.records.items()}
    if plan.data.state.get("replay"):  # what replay mixed in: the base's own answers, as trained on
        runfolder.save_data(plan.out, "replay", plan.data.state["replay"])
    values = {**spec_payload(plan.spec, saved), **method.stored_values(plan.spec)}
    if previous:  # a resumed run keeps the record of the data it started from
        values.update({k: previous["spec"][k] for k in DATA_FIELDS if k in previous.get("spec", {})})
    values.update(resume=False, overwrite=False)  # how this cell was run, not what the run is
    payload = {
        "method": method.name,
        "spec": values,
        "adapter_description": plan.adapter.describe(),
        "trl_config": {k: v for k, v in plan.config.to_dict().items() if not k.startswith("_")},
        "base_model_path": plan.ref.base,
        "parent_runs": list(plan.ref.parents),
        "device": str(plan.device),
        "seed": plan.spec.seed,
        "examples": plan.data.n_examples,
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
    runfolder.write_spec(plan.out, payload)


def _train(method: Method, plan: Plan, main: bool = True) -> NbalignError | None:
    """Train and save. Returns the error to raise, so the caller raises it after every frame that held the
    model is gone (a traceback kept by IPython would otherwise keep the weights alive). Only the main process
    (`main`) of a distributed run writes to the run folder, measures and shows; the others only train."""
    from ..callbacks import InterruptGuard, LiveProgress, MetricsWriter, StopOnInterrupt
    from ..devices import free_memory
    from ..fastpaths import cast_frozen_once, forget_casts, install_head, use_segment_attention

    out = plan.out
    guard = InterruptGuard()
    state = {"trainer": None, "model": None}
    outcome, message, summary, own_error = "failed", None, {}, False
    clock = plan.clock
    meter = PeakMeter(plan.device)
    try:
        with clock.phase("loading"):
            install_head()  # on a CPU, TRL's fused LM head scores only the read positions (fastpaths.py)
            model = state["model"] = method.load_model(plan)
            use_segment_attention(model, plan.device)  # a flattened row's examples attend each on its own
            cast_frozen_once(model)  # under autocast, frozen weights cast to bf16 once, not at every pass
            extras = method.extra_callbacks(plan) if main else []
            shown = [MetricsWriter(out), *extras, LiveProgress(f"{method.name} {out.name}")] if main else []
            callbacks = [*shown, StopOnInterrupt(guard)]
        with clock.phase("data"):  # TRL's trainer tokenises the preference methods' rows as it is built
            trainer = method.build_trainer(plan, model, callbacks)
        for callback in extras:
            if hasattr(callback, "bind"):
                callback.bind(trainer)
        state["trainer"] = trainer
        _quiet_default_progress(trainer)
        checkpoint = runfolder.latest_checkpoint(out) if plan.spec.resume else None
        if checkpoint is not None and _trained_to_the_end(checkpoint):
            # Killed after the last step but before the weights were saved: nothing is left to train.
            result = _restore(trainer, checkpoint)
        else:
            with guard, clock.phase("training"):
                result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        for callback in extras:  # the evaluation measured during training is the evaluation's time
            clock.moved(getattr(callback, "seconds", 0.0), "training", "evaluation")
        summary = _summary(trainer, result)
        with clock.phase("saving"):
            if main:
                runfolder.save_weights(out, trainer.model, plan.tokenizer, full=plan.adapter.type == "full")
        if main and not guard.requested:
            try:
                with clock.phase("evaluation"):
                    forget_casts()  # the training steps' bf16 copies: the evaluation runs in fp32
                    summary.update(method.finish(plan, trainer))
            except KeyboardInterrupt:
                summary["evaluation"] = "skipped: interrupted"
            except NbalignError:  # the method found the run itself failed (e.g. no finite reward): not the evaluation
                raise
            except Exception as exc:  # noqa: BLE001 - the trained weights are saved; the evaluation is extra
                summary["evaluation"] = f"failed: {type(exc).__name__}: {exc}"
                runfolder.write_error_log(out, traceback.format_exc())
        outcome = "interrupted" if guard.requested else "finished"
        if outcome == "finished" and main:
            with clock.phase("saving"):
                timed = {"time_s": clock.summary(), **summary}  # so far: the card is the last thing saved
                runfolder.write_card(out, model_card(method.name, plan, timed, *method.card_usage(plan)))
        else:
            message = f"stopped by the user at step {trainer.state.global_step}; re-run the cell with --resume"
    except KeyboardInterrupt:
        # Stopped mid-step: the weights are saved as they are, but a checkpoint written now could catch the
        # optimizer half-way, so --resume goes back to the last checkpoint saved between steps.
        trainer = state["trainer"]
        if trainer is not None and main:
            runfolder.save_weights(out, trainer.model, plan.tokenizer, full=plan.adapter.type == "full")
        last = runfolder.latest_checkpoint(out)
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
        if main:
            runfolder.write_error_log(out, traceback.format_exc())
    finally:
        trainer = state["trainer"]
        if trainer is not None:
            trainer.accelerator.free_memory()
        forget_casts()
        state.clear()
        model = trainer = None
        try:
            with clock.phase("saving"):  # freeing the model (a garbage collection) is part of the run's time
                free_memory()
        finally:
            # Status last: a folder that says "finished" has its weights and card. Where the time went comes first.
            summary = {"time_s": clock.summary(), **summary, **_memory_summary(plan.memory, meter)}
            if main:
                runfolder.set_status(out, outcome, message, summary=summary)
    if not main:
        return None  # the main process reports the run
    print(f"nbalign {method.name}: {outcome} after {describe_times(summary['time_s'])}.", flush=True)
    if outcome == "failed":
        if own_error:
            return NbalignError(f"{message} The run in '{out}' is marked failed.")
        return NbalignError(
            f"Training failed: {message}. The full traceback is in {out / runfolder.ERROR_LOG}; the run is marked "
            "failed.",
            "read the log; if memory ran out, lower batch_size or max_length, or use `%%lora quantize: 4bit`.",
        )
    if outcome == "interrupted":
        print(f"nbalign: the run in {out} was interrupted and saved: {message}.")
    return None


def _memory_summary(estimate, meter) -> dict:
    """The estimate made before loading beside the peak measured while the run ran, in MiB."""
    peak = meter.peak()
    out = {"memory_estimate_mib": round(estimate.total / MiB)} if estimate is not None else {}
    return {**out, "memory_peak_mib": round(peak / MiB)} if peak is not None else out


def _trained_to_the_end(checkpoint: Path) -> bool:
    state = runfolder.checkpoint_state(checkpoint)
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]


def _restore(trainer, checkpoint: Path):
    """The trainer as it was at a checkpoint taken after the last step: its weights and logged history."""
    from transformers.trainer_callback import TrainerState

    trainer._load_from_checkpoint(str(checkpoint))  # what trainer.train(resume_from_checkpoint=...) loads first
    trainer.state = TrainerState.load_from_json(str(runfolder.checkpoint_state_path(checkpoint)))
    return None


def _quiet_default_progress(trainer) -> None:
    """Drop transformers' own progress output: LiveProgress shows the same, once."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils.notebook import NotebookProgressCallback

    for cb in (ProgressCallback, PrinterCallback, NotebookProgressCallback):
        trainer.remove_callback(cb)


def _summary(trainer, result) -> dict:
    logs = trainer.state.log_history
    metrics = dict(result.metrics or {}) if result is not None else next(
        (r for r in reversed(logs) if "train_runtime" in r), {})
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
