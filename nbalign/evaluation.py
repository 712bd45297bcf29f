"""Did alignment work, and what did it cost?

Measured on a model against its reference (for an adapter: the same model with the adapter switched off,
so no second copy is loaded), on held-out data:

- preference accuracy and margin of the implicit reward beta * (log p_policy - log p_ref), ties counted
  as half (so an untrained model scores chance, 0.5); for thumbs data, how often its sign matches the label;
- the change in the chosen answers' own likelihood (per token): a model can win every pair by making the
  rejected answers unlikely while the chosen ones get unlikely too, and then its answers do not move;
- greedy answers to the held-out prompts: how many read like the chosen answer rather than the rejected
  one, and their mean length (the reward-hacking watch);
- KL from the reference along those answers, summed over their tokens (exact per token, over the vocabulary);
- perplexity on general English (the forgetting watch).

`measure()` works on models in memory (the training watch uses it); `evaluate()` loads a run or model.
"""

from __future__ import annotations

import contextlib
import difflib
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import NbalignError

# Metric name -> (label, format, which direction is "good" for the summary arrows)
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
class EvalData:
    """What the evaluation runs on: pairs or thumbs, their prompts, and general text."""

    pairs: list[dict] = field(default_factory=list)  # conversational {"prompt", "chosen", "rejected"}
    thumbs: list[dict] = field(default_factory=list)  # conversational {"prompt", "completion", "label"}
    general_text: list[str] = field(default_factory=list)
    source: str = "held-out"
    prompt_list: list = field(default_factory=list)  # prompts alone (online RL): answers, length, KL

    @property
    def prompts(self) -> list[list[dict]]:
        rows = self.pairs or self.thumbs or [{"prompt": p} for p in self.prompt_list]
        seen, out = set(), []
        for r in rows:
            key = json.dumps(r["prompt"])
            if key not in seen:
                seen.add(key)
                out.append(r["prompt"])
        return out


def eval_data(data: Any, general_text: Any = None, source: str = "held-out", limit: int = 32) -> EvalData:
    """Held-out pairs or thumbs (any format %%dpo / %%kto accept), at most `limit` of them."""
    from .data import load_records, to_pairs, to_unpaired

    records = load_records(data, "evaluation data")[:limit]
    columns = {k for r in records for k in r}
    if {"chosen", "rejected"} <= columns:
        result = EvalData(pairs=to_pairs(records, "evaluation data"), source=source)
    else:
        result = EvalData(thumbs=to_unpaired(records, "evaluation data"), source=source)
    result.general_text = general_texts(general_text)
    return result


def general_texts(value: Any) -> list[str]:
    if value is None:
        from .examples import GENERAL_TEXT

        return list(GENERAL_TEXT)
    if isinstance(value, str):
        path = Path(value).expanduser()
        if len(value) < 400 and path.is_file():
            value = path.read_text(encoding="utf-8")
        return [p.strip() for p in value.split("\n\n") if p.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise NbalignError(
        f"'general_text' must be text, a text file, or a list of strings, got {type(value).__name__}.",
        "pass a few paragraphs of ordinary text unrelated to the tuning data, or leave it unset.",
    )


# ----------------------------------------------------------------------------------------------------
# Log-probabilities


def _completion_text(tokenizer, prompt: list[dict], completion: list[dict]) -> tuple[str, str]:
    """(prompt as the model sees it, the completion with its end-of-turn) rendered by the chat template."""
    from .data import prompt_text

    head = prompt_text(tokenizer, prompt)
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if full.startswith(head):
            return head, full[len(head) :].rstrip("\n")
    return head, "".join(m["content"] for m in completion) + (tokenizer.eos_token or "")


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _encode(tokenizer, heads: list[str], tails: list[str]):
    """Right-padded ids with a mask over the tail tokens only."""
    import torch

    seqs, masks = [], []
    for head, tail in zip(heads, tails):
        h = tokenizer(head, add_special_tokens=False)["input_ids"]
        t = tokenizer(tail, add_special_tokens=False)["input_ids"]
        seqs.append(h + t)
        masks.append([0] * len(h) + [1] * len(t))
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    target = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    return ids, attention, target


def _forward_logprobs(model, ids, attention):
    import torch

    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device), attention_mask=attention.to(model.device)).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def sequence_logps(model, tokenizer, heads: list[str], tails: list[str], batch_size: int = 8):
    """Summed log-probability of each tail given its head, and the tail's token count."""
    import torch

    sums, counts = [], []
    for idx in _batches(list(range(len(heads))), batch_size):
        ids, attention, target = _encode(tokenizer, [heads[i] for i in idx], [tails[i] for i in idx])
        logp = _forward_logprobs(model, ids, attention)
        labels = ids[:, 1:].to(logp.device)
        mask = target[:, 1:].to(logp.device).float()
        picked = torch.gather(logp, 2, labels.unsqueeze(-1)).squeeze(-1)
        sums.extend((picked * mask).sum(-1).tolist())
        counts.extend(mask.sum(-1).tolist())
    return sums, counts


def answer_kl(policy, reference, tokenizer, heads: list[str], tails: list[str], batch_size: int = 8) -> list[float]:
    """KL(policy || reference) summed over each answer's tokens, exact over the vocabulary at each step."""
    kls = []
    for idx in _batches(list(range(len(heads))), batch_size):
        ids, attention, target = _encode(tokenizer, [heads[i] for i in idx], [tails[i] for i in idx])
        p = _forward_logprobs(policy, ids, attention)
        with reference() as ref:
            q = _forward_logprobs(ref, ids, attention)
        per_token = (p.exp() * (p - q)).sum(-1)
        mask = target[:, 1:].to(per_token.device).float()
        kls.extend((per_token * mask).sum(-1).clamp_min(0).tolist())
    return kls


def perplexity(model, tokenizer, texts: list[str], batch_size: int = 8) -> float:
    import torch

    total, count = 0.0, 0
    bos = tokenizer.bos_token or ""
    for chunk in _batches(texts, batch_size):
        ids, attention, target = _encode(tokenizer, [bos] * len(chunk), chunk)
        logp = _forward_logprobs(model, ids, attention)
        labels = ids[:, 1:].to(logp.device)
        mask = target[:, 1:].to(logp.device).float()
        # The first text token has no context when there is no BOS: leave it out.
        if not bos:
            first = mask.cumsum(-1) == 1
            mask = mask * (~first).float()
        picked = torch.gather(logp, 2, labels.unsqueeze(-1)).squeeze(-1)
        total -= float((picked * mask).sum())
        count += int(mask.sum())
    return math.exp(total / max(count, 1))


# ----------------------------------------------------------------------------------------------------
# One measurement


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def adapter_off(model):
    """A context giving the reference: the same model with its adapter switched off."""

    @contextlib.contextmanager
    def reference():
        with model.disable_adapter():
            yield model

    return reference


def separate(ref_model):
    @contextlib.contextmanager
    def reference():
        yield ref_model

    return reference


def _like(text: str, a: str, b: str) -> float:
    ra = difflib.SequenceMatcher(None, text, a).ratio()
    rb = difflib.SequenceMatcher(None, text, b).ratio()
    return 1.0 if ra > rb else 0.5 if ra == rb else 0.0


def _accuracy(diffs: list[float], eps: float = 1e-6) -> float:
    return sum(1.0 if d > eps else 0.5 if abs(d) <= eps else 0.0 for d in diffs) / max(len(diffs), 1)


def measure(model, tokenizer, data: EvalData, reference, beta: float, max_new_tokens: int = 64,
            reference_cache: dict | None = None, same_as_reference: bool = False) -> dict:
    """All metrics of `model` against `reference` (a context manager yielding the reference model, or None
    when none is in memory). `reference_cache` keeps the reference's own numbers between calls: they do not
    change while the policy trains. `same_as_reference`: the model is the reference (before the first step),
    so its log-probs are the reference's and its KL is zero, without computing either twice."""
    from .generation import generate_with

    cache = reference_cache if reference_cache is not None else {}
    out: dict[str, Any] = {}
    with _eval_mode(model):
        rows = data.pairs or data.thumbs
        if rows:
            heads, tails = [], []
            for r in rows:
                for answer in ((r["chosen"], r["rejected"]) if data.pairs else (r["completion"],)):
                    head, tail = _completion_text(tokenizer, r["prompt"], answer)
                    heads.append(head)
                    tails.append(tail)
            pol, counts = sequence_logps(model, tokenizer, heads, tails)
            if same_as_reference:
                cache.setdefault("ref_logps", pol)
            if "ref_logps" not in cache and reference is not None:
                with reference() as ref:
                    cache["ref_logps"] = sequence_logps(ref, tokenizer, heads, tails)[0]
            ref_logps = cache.get("ref_logps")
            if ref_logps is not None:
                rewards = [beta * (p - q) for p, q in zip(pol, ref_logps)]
                if data.pairs:
                    diffs = [rewards[2 * i] - rewards[2 * i + 1] for i in range(len(rows))]
                    out["accuracy"] = _accuracy(diffs)
                    out["margin"] = sum(diffs) / len(diffs)
                    chosen = [(pol[2 * i] - ref_logps[2 * i]) / max(counts[2 * i], 1) for i in range(len(rows))]
                    out["chosen_logp_change"] = sum(chosen) / len(chosen)
                else:
                    signs = [(r if row["label"] else -r) for r, row in zip(rewards, rows)]
                    out["label_accuracy"] = _accuracy(signs)
        prompts = data.prompts
        if prompts:
            answers = generate_with(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=16)
            out["length"] = sum(len(a) for a in answers) / len(answers)
            out["answers"] = answers
            if data.pairs:
                by_prompt = {json.dumps(r["prompt"]): r for r in data.pairs}
                likes = [
                    _like(a, _flat(by_prompt[json.dumps(p)]["chosen"]), _flat(by_prompt[json.dumps(p)]["rejected"]))
                    for p, a in zip(prompts, answers)
                ]
                out["like_chosen"] = sum(likes) / len(likes)
            if same_as_reference:
                out["kl"] = 0.0
            elif reference is not None:
                heads, tails = zip(*[
                    _completion_text(tokenizer, p, [{"role": "assistant", "content": a}]) for p, a in zip(prompts, answers)
                ])
                kls = answer_kl(model, reference, tokenizer, list(heads), list(tails))
                out["kl"] = sum(kls) / len(kls)
        if data.general_text:
            out["perplexity"] = perplexity(model, tokenizer, data.general_text)
    return out


def _flat(messages: list[dict]) -> str:
    return "".join(m["content"] for m in messages)


# ----------------------------------------------------------------------------------------------------
# The result users see


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
        return [(_flat(p), b, a) for p, b, a in zip(self.prompts, before, after)][:n]

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


def save(evaluation: Evaluation, folder: Path) -> None:
    from .runs import write_json_atomic

    payload = evaluation.to_dict()
    payload["examples"] = [{"prompt": p, "before": b, "after": a} for p, b, a in evaluation.examples(n=100)]
    write_json_atomic(Path(folder) / "evaluation.json", payload)


def load(folder: Path) -> Evaluation | None:
    try:
        payload = json.loads((Path(folder) / "evaluation.json").read_text())
    except (OSError, ValueError):
        return None
    if "before" not in payload:  # a reward model's pairwise accuracy (methods/reward.py)
        from .methods.reward import RewardEvaluation

        return RewardEvaluation(payload)
    examples = payload.get("examples", [])
    before = {**payload["before"], "answers": [e["before"] for e in examples]}
    after = {**payload["after"], "answers": [e["after"] for e in examples]}
    prompts = [[{"role": "user", "content": e["prompt"]}] for e in examples]
    return Evaluation(before, after, payload.get("source", "held-out"), prompts)


# ----------------------------------------------------------------------------------------------------
# The public function


def evaluate(model: str, data: Any, reference: str | None = None, beta: float | None = None,
             general_text: Any = None, max_new_tokens: int = 64, limit: int = 32) -> Evaluation:
    """Evaluate a run (or any model) against its reference on held-out pairs or thumbs.

    For a run trained with an adapter the reference is the model it started from, obtained by switching the
    adapter off; pass `reference=` to compare with another model (it is then loaded as a second model).
    A reward model run is evaluated by its scores instead.
    """
    from .models import free_memory, quiet
    from .runs import Run

    run = Run(model) if Path(str(model), "spec.json").is_file() else None
    if run is not None and run.method == "reward_model":
        from .methods.reward import RewardModel

        return RewardModel(run.path).accuracy(data)
    if beta is None:
        beta = (run.spec.get("trl_config", {}).get("beta") if run is not None else None) or 0.1
    data_ = eval_data(data, general_text, limit=limit)
    with quiet():
        policy, ref_ctx, tokenizer, holder = _load_pair(model, run, reference)
        try:
            cache: dict = {}
            before = measure(holder["ref"], tokenizer, data_, None, beta, max_new_tokens) if holder.get("ref") else None
            if before is None:
                with ref_ctx() as ref:
                    before = measure(ref, tokenizer, data_, None, beta, max_new_tokens)
            after = measure(policy, tokenizer, data_, ref_ctx, beta, max_new_tokens, cache)
            if data_.pairs:
                before.update(accuracy=0.5, margin=0.0, chosen_logp_change=0.0)
            elif data_.thumbs:
                before.update(label_accuracy=0.5)
            before["kl"] = 0.0
        finally:
            policy = ref_ctx = None
            holder.clear()
            free_memory()
    return Evaluation(before, after, data_.source, data_.prompts)


def _load_pair(model: str, run, reference: str | None):
    """(policy, reference context, tokenizer, holder of every loaded model)."""
    from .generation import load_for_inference
    from .models import load_model, load_tokenizer, pick_device, resolve

    holder: dict = {}
    if run is not None and reference is None and (run.path / "adapter").is_dir():
        from peft import PeftModel

        ref = resolve(str(run.path))
        device = pick_device()
        base = load_model(resolve_parent(ref), device)
        policy = PeftModel.from_pretrained(base, run.path / "adapter").eval()
        holder["policy"] = policy
        return policy, adapter_off(policy), load_tokenizer(ref), holder
    policy, tokenizer = load_for_inference(model)
    if reference is None:
        if run is None:
            raise NbalignError(
                f"evaluate: '{model}' is not a run folder, so nbalign does not know its reference.",
                "pass reference='smollm2-135m' (or the model it was tuned from).",
            )
        reference = run.spec["spec"]["model"]
    ref_model, _ = load_for_inference(reference)
    holder.update(policy=policy, ref=ref_model)
    return policy, separate(ref_model), tokenizer, holder


def resolve_parent(ref):
    """The ModelRef of what a run started from: its base with every earlier run merged, but not itself."""
    from dataclasses import replace

    return replace(ref, parents=tuple(ref.parents[:-1]))
