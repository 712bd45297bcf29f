"""From a spec to a TRL config: nbalign's defaults for the run, the body's TRL fields checked and typed on
top, and the number of optimizer steps the run will take (what logging and checkpoints are sized by)."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

from ..errors import NbalignError, unknown_option
from ..runfolder import checkpoints_dir
from ..spec_fields import coerce
from ..specs import DEFAULT_BATCH, MIN_BATCH, MIN_STEPS, TrainSpec
from .launch import world_size

# Config fields nbalign sets from the run itself; a body that sets them would break the run folder.
RESERVED = {"output_dir", "resume_from_checkpoint", "push_to_hub", "hub_model_id"}


def common_defaults(spec: TrainSpec, device, steps: int) -> dict:
    """TRL config values every method shares: length, batch, device, logging, checkpoints."""
    return {
        "num_train_epochs": spec.epochs,
        "per_device_train_batch_size": spec.batch_size,
        "per_device_eval_batch_size": spec.batch_size,
        "learning_rate": spec.learning_rate or spec.default_learning_rate(),
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
        # Several processes (--launch accelerate) on CPUs talk through gloo; NCCL needs GPUs.
        **({"ddp_backend": "gloo"} if device.type == "cpu" and world_size() > 1 else {}),
    }


def checked_trl_fields(config_class, spec: TrainSpec) -> dict:
    """The body's TRL fields, checked against the method's TRL config and typed; unknown fields are
    rejected with the nearest valid name."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    extra = {}
    for key, value in spec.trl.items():
        if key in RESERVED:
            raise NbalignError(f"{spec.where}: '{key}' is set by nbalign from --out.", "remove it from the cell body.")
        if key not in fields:
            raise unknown_option(key, fields | spec.field_names() - {"trl"}, spec.where)
        extra[key] = coerce(key, value, hints.get(key, Any), spec.where)
    return extra


def trl_config(config_class, spec: TrainSpec, out: Path, defaults: dict, extra: dict):
    """The method's TRL config: nbalign's defaults for this run, then the body's (checked) TRL fields."""
    values = {**defaults, **extra, "output_dir": str(checkpoints_dir(out))}
    try:
        return config_class(**values)
    except (ValueError, TypeError) as exc:
        raise NbalignError(
            f"{spec.where}: TRL's {config_class.__name__} refused these settings: {exc}",
            f"change the setting it names in the cell body (`{spec.where} --help` lists nbalign's own options).",
        ) from None


def with_batch_size(spec: TrainSpec, n_examples: int, extra: dict) -> TrainSpec:
    """The spec with its batch_size decided when the cell gave none: DEFAULT_BATCH, or MIN_BATCH on small data for
    the methods that ask for it, where the run would take fewer than MIN_STEPS optimizer steps at DEFAULT_BATCH
    (specs.DEFAULT_BATCH says why). Recorded in spec.json, so a replay trains at the same batch. A run with
    max_steps or gradient accumulation in its body keeps DEFAULT_BATCH: the cell chose its own step count."""
    if spec.batch_size is not None:
        return spec
    small = (spec.small_data_batches and not extra.get("max_steps") and not extra.get("gradient_accumulation_steps")
             and planned_steps(spec.replace(batch_size=DEFAULT_BATCH), n_examples, extra) < MIN_STEPS)
    return spec.replace(batch_size=MIN_BATCH if small else DEFAULT_BATCH)


def planned_steps(spec: TrainSpec, n_examples: int, extra: dict) -> int:
    """Optimizer steps the run will take: what logging and checkpoint intervals are sized against.
    (Packing can lower it; the intervals only need the right order of magnitude.)"""
    if (extra.get("max_steps") or -1) > 0:
        return extra["max_steps"]
    accumulation = max(1, extra.get("gradient_accumulation_steps") or 1)
    per_epoch = -(-n_examples // (spec.batch_size * accumulation))
    return max(1, math.ceil(per_epoch * spec.epochs))  # transformers' Trainer rounds a fraction of an epoch up
