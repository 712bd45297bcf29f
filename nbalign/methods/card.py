"""The model card (README.md) of a finished run, written from the run itself.

The Hugging Face model-card metadata block first (base model, library, pipeline, tags), then what a reader needs
before using the model: what it is for, what it was trained from and on (with a few rows), how, what the
evaluation found before and after (the run's own table and warnings), its limitations, and how to load it.
"""

from __future__ import annotations

import json
from typing import Any

from .. import runfolder
from ..clock import describe_times

HUB_NAMES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
SETTINGS = ("num_train_epochs", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
            "max_length", "lr_scheduler_type", "warmup_ratio", "weight_decay", "beta", "loss_type", "bf16", "seed")


def model_card(method: str, plan, summary: dict, auto: str, notebook: str) -> str:
    """README.md of a finished run (`auto`: the transformers class that loads it; `notebook`: a line that uses
    the run)."""
    spec, out = plan.spec, plan.out
    stored = runfolder.read_spec(out)
    data = stored.get("spec", {}).get("data")
    full = plan.adapter.type == "full"
    base = HUB_NAMES.get(str(spec.model).lower(), str(spec.model))
    tags = ["nbalign", "trl", method, plan.adapter.type]
    meta = metadata_block(base, "transformers" if full else "peft",
                          "text-classification" if auto.endswith("SequenceClassification") else "text-generation", tags)
    intended = getattr(spec, "intended_use", None)
    config = plan.config.to_dict()
    lines = meta + [
        f"# {out.name}", "",
        f"Trained with nbalign `%%{method}` from `{spec.model}` ({plan.adapter.describe()}).", "",
        "## Intended use", "",
        intended or "_Not stated. Say what this model is for (and what it is not for) with `intended_use: ...` in "
                    "the cell that trains it._", "",
        "## Model", "",
        "| | |", "|---|---|",
        f"| base model | `{spec.model}` ({plan.ref.base}) |",
        *([f"| continued from | {', '.join(f'`{p}`' for p in plan.ref.parents)} |"] if plan.ref.parents else []),
        f"| weights changed | {plan.adapter.describe()} |",
        f"| method | {method} (TRL) |", "",
        "## Training data", "",
        *_data_section(out, data, plan.data.n_examples),
        "## Training settings", "",
        "| setting | value |", "|---|---|",
        *(f"| {k} | {config[k]} |" for k in SETTINGS if k in config), "",
        *_evaluation_section(out),
        "## Limitations", "",
        f"- Trained on {plan.data.n_examples} examples; behaviour outside what they show is not measured here.",
        "- The evaluation above covers the held-out rows and probes listed, nothing else: check your own use.",
        f"- A {'small ' if 'smollm2' in str(spec.model).lower() else ''}language model states wrong facts fluently;"
        " do not rely on its answers without checking them.", "",
        "## Time and hardware", "",
        "| | |", "|---|---|", f"| hardware | {plan.device} |",
        *(f"| {'time' if k == 'time_s' else k} | {describe_times(v) if k == 'time_s' else v} |"
          for k, v in summary.items() if k in ("time_s", "steps", "train_loss", "memory_estimate_mib",
                                                "memory_peak_mib")), "",
        *_usage(plan, auto, notebook, full),
    ]
    return "\n".join(lines)


def metadata_block(base: str, library: str, pipeline: str, tags: list[str], relation: str | None = None) -> list[str]:
    """The Hugging Face model-card metadata block (YAML between --- lines) that opens a card."""
    return ["---", f"base_model: {json.dumps(base)}", *([f"base_model_relation: {relation}"] if relation else []),
            f"library_name: {library}", f"pipeline_tag: {pipeline}", "tags:", *(f"- {t}" for t in tags), "---", ""]


def _data_section(out, data: Any, n: int) -> list[str]:
    if isinstance(data, dict) and data.get("saved"):
        where = f"in-memory {data.get('in_memory') or data.get('kind') or 'rows'}, saved with the run as `{data['saved']}`"
        path = out / data["saved"]
    elif isinstance(data, dict) and data.get("store"):
        where = f"the label store `{data['store']}`" + (f" (labelled by {', '.join(data['labellers'])})"
                                                         if data.get("labellers") else "")
        path = None
    else:
        where, path = f"`{data}`", None
    lines = [f"{n} examples from {where}.", ""]
    rows = _first_rows(path, 3)
    if rows:
        lines += ["A few of them:", "", "```json", *rows, "```", ""]
    return lines


def _first_rows(path, n: int) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            rows = [line.strip() for _, line in zip(range(n), f) if line.strip()]
    except (OSError, TypeError):
        return []
    return [r if len(r) <= 300 else r[:297] + "..." for r in rows]


def _evaluation_section(out) -> list[str]:
    from ..results import METRICS, load

    evaluation = load(out)
    if evaluation is None or not hasattr(evaluation, "after"):
        return ["## Evaluation", "", "_No evaluation was run (give `eval_data` to measure before and after)._", ""]
    lines = ["## Evaluation", "", f"On {evaluation.source} data, before (the base) and after training:", "",
             "| measure | before | after |", "|---|---|---|"]
    for key, (label, _) in METRICS.items():
        if key in evaluation.after and not isinstance(evaluation.after[key], list):
            before = evaluation.before.get(key)
            lines.append(f"| {label} | {_num(before)} | {_num(evaluation.after[key])} |")
    warnings = evaluation.warnings
    lines += ["", "### Warnings", ""] + ([f"- {w}" for w in warnings] if warnings else ["None raised."]) + [""]
    return lines


def _num(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _usage(plan, auto: str, notebook: str, full: bool) -> list[str]:
    kw = ", num_labels=1" if auto == "AutoModelForSequenceClassification" else ""
    weights = plan.out / (runfolder.MODEL if full else runfolder.ADAPTER)
    if full:
        usage = f'model = {auto}.from_pretrained("{weights}")'
    else:
        usage = (f'base = {auto}.from_pretrained("{plan.ref.base}"{kw})  # merged with parent runs, if any\n'
                 f'model = PeftModel.from_pretrained(base, "{weights}")')
    return ["## Use", "", "```python", f"from transformers import {auto}", "from peft import PeftModel", usage, "```",
            "", f"Or in a notebook: `{notebook}`; `run.export(...)` writes merged safetensors or GGUF.", ""]
