"""The result of an evaluation, as users see it: the before/after table with its warnings (Evaluation), a
reward model's pairwise accuracy (RewardEvaluation), and their evaluation.json in the run folder."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from . import runfolder
from .text import joined

# Metric name -> (label, format)
METRICS = {
    "accuracy": ("preference accuracy", "{:.2f}"),
    "margin": ("reward margin (chosen - rejected)", "{:.3f}"),
    "chosen_logp_change": ("chosen answers' log-likelihood change per token", "{:+.3f}"),
    "like_chosen": ("answers closer to chosen than rejected", "{:.2f}"),
    "length": ("mean answer length (characters)", "{:.0f}"),
    "kl": ("KL to the reference (per answer)", "{:.3f}"),
    "perplexity": ("perplexity on general text", "{:.2f}"),
    "label_accuracy": ("thumbs label accuracy", "{:.2f}"),
}



@dataclass
class Evaluation:
    """Before (the reference) and after (the tuned model), with the warnings a user should read."""

    before: dict
    after: dict
    source: str = "held-out"
    prompts: list = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        b, a, notes = self.before, self.after, []
        acc = a.get("accuracy")
        moved = a.get("like_chosen", 0) - b.get("like_chosen", 0)
        room = 1.0 - b.get("like_chosen", 0)  # answers already like the chosen ones cannot move further
        if acc is not None and acc >= 0.8 and "like_chosen" in a and room > 0.1 and moved < min(0.25, room / 2):
            notes.append(
                f"Preference accuracy is {acc:.2f}, but the answers barely moved towards the chosen style "
                f"({b.get('like_chosen', 0):.2f} -> {a['like_chosen']:.2f}): the model learnt to rank the pairs, "
                "not to answer like the chosen ones. Train longer (epochs, learning rate) or, for %%dpo, raise sft_weight."
            )
        if a.get("chosen_logp_change", 0) < -0.05:
            notes.append(
                f"The chosen answers became less likely than under the reference ({a['chosen_logp_change']:+.2f} "
                "nats per token): the margin comes from pushing the rejected ones down. For %%dpo, raise sft_weight."
            )
        if b.get("length") and a.get("length") and a["length"] > 1.5 * b["length"]:
            notes.append(
                f"Answers got {a['length'] / b['length']:.1f}x longer ({b['length']:.0f} -> {a['length']:.0f} "
                "characters): check that the preference is not rewarding length (reward hacking)."
            )
        if b.get("perplexity") and a.get("perplexity") and a["perplexity"] > 1.2 * b["perplexity"]:
            notes.append(
                f"Perplexity on general text rose {a['perplexity'] / b['perplexity']:.2f}x "
                f"({b['perplexity']:.1f} -> {a['perplexity']:.1f}): the model is forgetting. Lower the learning "
                "rate or epochs, or raise beta."
            )
        return notes

    def to_dict(self) -> dict:
        strip = lambda d: {k: v for k, v in d.items() if k != "answers"}  # noqa: E731
        return {"source": self.source, "before": strip(self.before), "after": strip(self.after),
                "warnings": self.warnings}

    def summary(self) -> dict:
        """Flat numbers for a run's summary: `<metric>` after, `<metric>_before` before."""
        out = {}
        for key in METRICS:
            if key in self.after:
                out[key] = round(self.after[key], 4)
                if key in self.before:
                    out[f"{key}_before"] = round(self.before[key], 4)
        return out

    def examples(self, n: int = 4) -> list[tuple[str, str, str]]:
        """(prompt, answer before, answer after) for the first `n` held-out prompts."""
        before, after = self.before.get("answers", []), self.after.get("answers", [])
        return [(joined(p), b, a) for p, b, a in zip(self.prompts, before, after)][:n]

    def __repr__(self) -> str:
        lines = [f"Evaluation on {self.source} data:"]
        for key, (label, fmt) in METRICS.items():
            if key in self.after:
                before = fmt.format(self.before[key]) if key in self.before else "-"
                lines.append(f"  {label:<50} {before:>8} -> {fmt.format(self.after[key])}")
        lines += [f"  ! {w}" for w in self.warnings]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(label)}</td><td>{fmt.format(self.before[key]) if key in self.before else '-'}</td>"
            f"<td><b>{fmt.format(self.after[key])}</b></td></tr>"
            for key, (label, fmt) in METRICS.items()
            if key in self.after
        )
        warn = "".join(f"<li>{html.escape(w)}</li>" for w in self.warnings)
        shown = "".join(
            f"<tr><td>{html.escape(p)}</td><td>{html.escape(b)}</td><td>{html.escape(a)}</td></tr>"
            for p, b, a in self.examples()
        )
        return (
            f"<div><b>Evaluation</b> on {html.escape(self.source)} data<table><tr><th>metric</th><th>before</th>"
            f"<th>after</th></tr>{rows}</table>"
            + (f"<ul style='color:#a60'>{warn}</ul>" if warn else "")
            + (f"<table><tr><th>prompt</th><th>before</th><th>after</th></tr>{shown}</table>" if shown else "")
            + "</div>"
        )


class RewardEvaluation(dict):
    """evaluation.json of a reward model run: pairwise accuracy and margin, shown as a small table."""

    LABELS = {
        "accuracy": "pairwise accuracy (chosen scored above rejected)",
        "margin": "mean margin score(chosen) - score(rejected)",
        "mean_chosen": "mean score of chosen answers",
        "mean_rejected": "mean score of rejected answers",
        "pairs": "pairs",
    }

    def _repr_html_(self) -> str:
        where = "held-out pairs" if self.get("split") == "heldout" else "training pairs (no eval_data was given)"
        rows = "".join(
            f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(label)}</th>"
            f"<td style='text-align:left'>{self[key]:.4g}</td></tr>"
            for key, label in self.LABELS.items()
            if isinstance(self.get(key), (int, float))
        )
        return f"<div><b>reward model evaluation</b> on {html.escape(where)}<table>{rows}</table></div>"


def save(evaluation: Evaluation, folder: Path) -> None:
    payload = evaluation.to_dict()
    payload["examples"] = [{"prompt": p, "before": b, "after": a} for p, b, a in evaluation.examples(n=100)]
    runfolder.save_evaluation(Path(folder), payload)


def load(folder: Path) -> Evaluation | RewardEvaluation | None:
    payload = runfolder.read_evaluation(folder)
    if payload is None:
        return None
    if "before" not in payload:  # a reward model's pairwise accuracy
        return RewardEvaluation(payload)
    examples = payload.get("examples", [])
    before = {**payload["before"], "answers": [e["before"] for e in examples]}
    after = {**payload["after"], "answers": [e["after"] for e in examples]}
    prompts = [[{"role": "user", "content": e["prompt"]}] for e in examples]
    return Evaluation(before, after, payload.get("source", "held-out"), prompts)
