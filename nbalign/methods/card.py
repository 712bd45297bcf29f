"""The model card (README.md) of a finished run, written from the run itself."""

from __future__ import annotations

from typing import Any

from .. import runfolder
from ..clock import describe_times


def model_card(method: str, plan, summary: dict, auto: str, notebook: str) -> str:
    """README.md of a finished run: what was trained from what, with which data and settings, the summary's
    numbers, and how to load it (`auto`: the transformers class; `notebook`: a line that uses the run)."""
    spec = plan.spec
    data = runfolder.read_spec(plan.out).get("spec", {}).get("data")
    lines = [
        f"# {plan.out.name}",
        "",
        f"Trained with nbalign `%%{method}` from `{spec.model}` ({plan.adapter.describe()}).",
        "",
        "| | |",
        "|---|---|",
        f"| method | {method} |",
        f"| base model | {spec.model} |",
        f"| adapter | {plan.adapter.describe()} |",
        f"| data | {data if isinstance(data, str) else _describe(data)} ({plan.data.n_examples} examples) |",
        f"| epochs | {spec.epochs:g} |",
        f"| learning rate | {plan.config.learning_rate:g} |",
        f"| batch size | {spec.batch_size} |",
        f"| device | {plan.device} |",
    ]
    lines += [f"| {'time' if k == 'time_s' else k} | {describe_times(v) if k == 'time_s' else v} |"
              for k, v in summary.items()]
    kw = ", num_labels=1" if auto == "AutoModelForSequenceClassification" else ""
    weights = plan.out / (runfolder.MODEL if plan.adapter.type == "full" else runfolder.ADAPTER)
    if plan.adapter.type == "full":
        usage = f'model = {auto}.from_pretrained("{weights}")'
    else:
        usage = (
            f'base = {auto}.from_pretrained("{plan.ref.base}"{kw})  # merged with parent runs, if any\n'
            f'model = PeftModel.from_pretrained(base, "{weights}")'
        )
    lines += ["", "## Use", "", "```python", f"from transformers import {auto}",
              "from peft import PeftModel", usage, "```", "", f"Or in a notebook: `{notebook}`.", ""]
    return "\n".join(lines)


def _describe(data: Any) -> str:
    if isinstance(data, dict) and data.get("saved"):
        return f"in-memory {data.get('in_memory')}, saved as {data['saved']}"
    return str(data)
