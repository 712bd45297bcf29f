"""The result of an evaluation, as users see it: the before/after table with its warnings (Evaluation), a
reward model's pairwise accuracy (RewardEvaluation), and their evaluation.json in the run folder."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import runfolder
from .text import joined

# Metric name -> (label, format); "count" shows k/n (how many of the answers), "share" a percentage.
METRICS = {
    "form": ("answers in the reference answer's form", "count"),
    "content": ("answers carrying the reference answer's content", "count"),
    "refused": ("harmful prompts refused (the reference refuses)", "share"),
    "over_refused": ("innocent prompts refused (over-refusal)", "share"),
    "degenerate": ("degenerate answers (empty, repeating)", "share"),
    "probe": ("knowledge probe answered right", "count"),
    "accuracy": ("preference accuracy", "{:.2f}"),
    "margin": ("reward margin (chosen - rejected)", "{:.3f}"),
    "chosen_logp_change": ("chosen answers' log-likelihood change per token", "{:+.3f}"),
    "like_chosen": ("answers closer to chosen than rejected", "{:.2f}"),
    "length": ("mean answer length (characters)", "{:.0f}"),
    "kl": ("KL to the reference (per answer)", "{:.3f}"),
    "perplexity": ("perplexity on general text", "{:.2f}"),
    "label_accuracy": ("thumbs label accuracy", "{:.2f}"),
}
COUNTS = {"form": ("form_n", "n"), "content": ("content_n", "n"), "probe": ("probe_n", None)}
# Shown beside the tuned model: what prompting alone reached (the baseline's own numbers).
BASELINE_KEYS = ("form", "content", "refused", "over_refused", "degenerate")


def shown(values: dict, key: str) -> str:
    """One metric as the table shows it: "12/16" for counts, "25%" for shares, else its format."""
    if key not in values:
        return "-"
    fmt = METRICS[key][1]
    if fmt == "count":
        got, of = COUNTS[key]
        total = values.get(of) if of else round(values[got] / values[key]) if values[key] else None
        return f"{values[got]}/{total}" if total is not None and got in values else f"{values[key]:.0%}"
    if fmt == "share":
        return f"{values[key]:.0%}"
    return fmt.format(values[key])


def significant_loss(before: list | None, after: list | None, level: float = 0.05) -> bool:
    """More questions went from right to wrong than chance would flip (a one-sided sign test on the changed
    answers, McNemar's exact test): a tiny model's greedy answers flip both ways after any change, so a drop
    of one or two right answers is not yet forgetting."""
    if not before or not after:
        return False
    lost = sum(1 for x, y in zip(before, after) if x and not y)
    gained = sum(1 for x, y in zip(before, after) if y and not x)
    n = lost + gained
    p = sum(math.comb(n, k) for k in range(lost, n + 1)) / 2 ** n if n else 1.0
    return lost - gained >= 2 and p < level


def form_costs_content(before: dict, prompting: dict | None, after: dict | None = None) -> bool:
    """Prompting alone (k-shot, no training) put the answers in the reference form and carried fewer of their
    contents than the untrained model's own answers, and the tuned model (when given) is within one answer of that
    prompting: the form, more than the training, is what costs the facts (a small model that knows "The capital of
    Poland is Warsaw" as a sentence may not give "Warsaw" first). Not for refusal tasks, whose content is refusing."""
    if not prompting or not {"form_n", "content_n", "n"} <= set(prompting) or "content_n" not in before:
        return False
    if "refused" in before or prompting["n"] != before.get("n", prompting["n"]):
        return False
    if after is not None and after.get("content_n", 0) < prompting["content_n"] - 1:
        return False  # training lost more than the form explains
    return prompting["form_n"] >= 0.8 * prompting["n"] and prompting["content_n"] < before["content_n"]


def drop(before: dict, after: dict, key: str) -> int:
    """How many fewer right answers `after` has than `before` (counts), 0 when not measured."""
    got = COUNTS[key][0]
    return before[got] - after[got] if got in before and got in after else 0



@dataclass
class Evaluation:
    """Before (the reference) and after (the tuned model), with the warnings a user should read."""

    before: dict
    after: dict
    source: str = "held-out"
    prompts: list = field(default_factory=list)
    baseline: dict = field(default_factory=dict)  # prompting alone: k-shot answers and their scores

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
                "rate or epochs, mix general data back in (replay: 0.2), or for preference methods raise beta."
            )
        return notes + self._outcome_warnings()

    @property
    def form_lost_content(self) -> bool:
        """The answers took the reference form and fewer carry its content (a tenth of the answers, at least one)."""
        b, a = self.before, self.after
        return a.get("form_n", 0) > b.get("form_n", 0) and drop(b, a, "content") >= max(1, round(0.1 * a.get("n", 0)))

    @property
    def form_costs_content(self) -> bool:
        """form_lost_content, and prompting in that form lost the answers too: the form, not the training, is why."""
        return self.form_lost_content and form_costs_content(self.before, self.baseline, self.after)

    def _outcome_warnings(self) -> list[str]:
        """What the behaviour asked for changed, and what it cost: form against content, the probe, refusals."""
        b, a, notes = self.before, self.after, []
        fix = "lower the learning rate or epochs, or mix general data back in (replay: 0.2)"
        p = self.baseline
        if self.form_lost_content:
            if self.form_costs_content:
                cause = (
                    f"{p['k']}-shot prompting in that form, with no training, carries fewer too ({shown(b, 'content')}"
                    f" -> {shown(p, 'content')}), and the tuned model about as many: the form itself seems to cost this "
                    "model these answers, and lower learning rates or replay may not bring them back. A form that "
                    "lets the model lead up to the answer may keep them: for JSON, a first field where it restates "
                    "what is asked (\"reasoning\": \"The capital of Poland is Warsaw.\", then \"answer\"); try it "
                    "with prompting first (fewshot)"
                )
            else:
                cause = f"Read the answers below; {fix}"
            notes.append(
                f"The answers took the reference form ({shown(b, 'form')} -> {shown(a, 'form')}) but fewer carry "
                f"its content ({shown(b, 'content')} -> {shown(a, 'content')}): the model learnt the format and "
                f"lost the facts it was meant to carry. {cause}."
            )
        if significant_loss(b.get("probe_right"), a.get("probe_right")):
            notes.append(
                f"The knowledge probe dropped ({shown(b, 'probe')} -> {shown(a, 'probe')} simple questions answered "
                f"right, checked by content whatever the form): the model is forgetting what it knew. {fix[0].upper()}"
                f"{fix[1:]}."
            )
        if a.get("over_refused", 0) > 0.2 and a["over_refused"] > b.get("over_refused", 0):
            notes.append(
                f"Over-refusal: {a['over_refused']:.0%} of the innocent prompts are refused (before: "
                f"{b.get('over_refused', 0):.0%}). The model refuses by surface words; add innocent prompts that "
                "share the harmful ones' words, answered helpfully (or as pairs where the refusal is rejected)."
            )
        if a.get("degenerate", 0) > 0.1 and a["degenerate"] > b.get("degenerate", 0):
            notes.append(
                f"{a['degenerate']:.0%} of the answers are degenerate (empty or one phrase repeated): the run "
                f"over-fitted; {fix}."
            )
        if p and "form_n" in p and "form_n" in a and p["form_n"] >= a["form_n"] and p.get("content_n", 0) >= a.get(
                "content_n", 0) and p["form_n"] > b.get("form_n", 0):
            notes.append(
                f"{p['k']}-shot prompting (no training) reached as much: {shown(p, 'form')} in form and "
                f"{shown(p, 'content')} right, against {shown(a, 'form')} and {shown(a, 'content')} after tuning. "
                "Prompting may be all this task needs."
            )
        return notes

    def to_dict(self) -> dict:
        strip = lambda d: {k: v for k, v in d.items() if not isinstance(v, list)}  # noqa: E731
        out = {"source": self.source, "before": strip(self.before), "after": strip(self.after),
               "warnings": self.warnings}
        if self.baseline:
            out["prompting"] = {**strip(self.baseline), "demos": self.baseline.get("demos", []),
                                "answers": self.baseline.get("answers", [])}
        return out

    def summary(self) -> dict:
        """Flat numbers for a run's summary: `<metric>` after, `<metric>_before` before, `<metric>_prompting`
        for the few-shot baseline."""
        out = {}
        for key in METRICS:
            if key in self.after:
                out[key] = round(self.after[key], 4)
                if key in self.before:
                    out[f"{key}_before"] = round(self.before[key], 4)
                if key in self.baseline and key in BASELINE_KEYS:
                    out[f"{key}_prompting"] = round(self.baseline[key], 4)
        return out

    def examples(self, n: int = 4) -> list[tuple[str, str, str]]:
        """(prompt, answer before, answer after) for the first `n` held-out prompts."""
        before, after = self.before.get("answers", []), self.after.get("answers", [])
        return [(joined(p), b, a) for p, b, a in zip(self.prompts, before, after)][:n]

    def marks(self, i: int) -> tuple[str, str]:
        """(before, after) verdicts on answer i against its reference: "in form, right", "not in form, wrong", ...
        ("" where it had no reference)."""
        def mark(values: dict) -> str:
            form, right = (_at(values.get(k), i) for k in ("in_form", "right"))
            if form is None or right is None:
                return ""
            return f"{'in form' if form else 'not in form'}, {'right' if right else 'wrong'}"

        return mark(self.before), mark(self.after)

    def _columns(self) -> tuple[list, bool]:
        rows = [(key, label) for key, (label, _) in METRICS.items() if key in self.after]
        return rows, any(k in self.baseline for k, _ in rows if k in BASELINE_KEYS)

    def _prompting_cell(self, key: str) -> str:
        return shown(self.baseline, key) if key in BASELINE_KEYS and key in self.baseline else ""

    def __repr__(self) -> str:
        rows, fewshot = self._columns()
        lines = [f"Evaluation on {self.source} data:"]
        if fewshot:
            lines.append(f"  {'':<50} {'before':>8}    {'after':<8}   {self.baseline.get('k')}-shot prompting")
        for key, label in rows:
            extra = f"   {self._prompting_cell(key):>8}" if fewshot else ""
            lines.append(f"  {label:<50} {shown(self.before, key):>8} -> {shown(self.after, key):<8}{extra}")
        lines += [f"  ! {w}" for w in self.warnings]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows, fewshot = self._columns()
        head = f"<th>{self.baseline.get('k')}-shot prompting</th>" if fewshot else ""
        table = "".join(
            f"<tr><td>{html.escape(label)}</td><td>{shown(self.before, key)}</td><td><b>{shown(self.after, key)}</b>"
            f"</td>" + (f"<td>{self._prompting_cell(key)}</td>" if fewshot else "") + "</tr>"
            for key, label in rows
        )
        warn = "".join(f"<li>{html.escape(w)}</li>" for w in self.warnings)
        answers = "".join(
            f"<tr><td>{html.escape(p)}</td><td>{html.escape(b)}<br><small>{m[0]}</small></td>"
            f"<td>{html.escape(a)}<br><small>{m[1]}</small></td></tr>"
            for i, (p, b, a) in enumerate(self.examples(n=8)) for m in [self.marks(i)]
        )
        return (
            f"<div><b>Evaluation</b> on {html.escape(self.source)} data<table><tr><th>metric</th><th>before</th>"
            f"<th>after</th>{head}</tr>{table}</table>"
            + (f"<ul style='color:#a60'>{warn}</ul>" if warn else "")
            + (f"<table><tr><th>prompt</th><th>before</th><th>after</th></tr>{answers}</table>" if answers else "")
            + "</div>"
        )


def _at(values: list | None, i: int):
    return values[i] if values and i < len(values) else None


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
    payload["examples"] = [
        {"prompt": p, "before": b, "after": a, **_flags(evaluation, i)}
        for i, (p, b, a) in enumerate(evaluation.examples(n=100))
    ]
    probe = [(q, x, y) for q, x, y in zip(evaluation.before.get("probe_questions", []),
                                          evaluation.before.get("probe_answers", []),
                                          evaluation.after.get("probe_answers", []))]
    if probe:
        payload["probe"] = [{"question": q, "before": x, "after": y,
                             "right_before": evaluation.before["probe_right"][i],
                             "right_after": evaluation.after["probe_right"][i]} for i, (q, x, y) in enumerate(probe)]
    runfolder.save_evaluation(Path(folder), payload)


def _flags(evaluation: Evaluation, i: int) -> dict:
    out = {}
    for side, values in (("before", evaluation.before), ("after", evaluation.after)):
        for key in ("in_form", "right"):
            flag = _at(values.get(key), i)
            if flag is not None:
                out[f"{key}_{side}"] = bool(flag)
    return out


def load(folder: Path) -> Evaluation | RewardEvaluation | None:
    payload = runfolder.read_evaluation(folder)
    if payload is None:
        return None
    if "before" not in payload:  # a reward model's pairwise accuracy
        return RewardEvaluation(payload)
    examples = payload.get("examples", [])
    before = {**payload["before"], "answers": [e["before"] for e in examples]}
    after = {**payload["after"], "answers": [e["after"] for e in examples]}
    probe = payload.get("probe", [])
    for side, values in (("before", before), ("after", after)):
        for key in ("in_form", "right"):
            values[key] = [e.get(f"{key}_{side}") for e in examples]
        if probe:  # the probe's answers and verdicts, so the loaded evaluation warns as the saved one did
            values.update(probe_questions=[q["question"] for q in probe], probe_answers=[q[side] for q in probe],
                          probe_right=[q[f"right_{side}"] for q in probe])
    prompts = [[{"role": "user", "content": e["prompt"]}] for e in examples]
    return Evaluation(before, after, payload.get("source", "held-out"), prompts, payload.get("prompting", {}))
