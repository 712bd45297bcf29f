"""Did alignment work, and what did it cost?

Measured on a model against its reference (for an adapter: the same model with the adapter switched off,
so no second copy is loaded), on held-out data:

- preference accuracy and margin of the implicit reward beta * (log p_policy - log p_ref), ties counted
  as half (so an untrained model scores chance, 0.5); for thumbs data, how often its sign matches the label;
- the change in the chosen answers' own likelihood (per token): a model can win every pair by making the
  rejected answers unlikely while the chosen ones get unlikely too, and then its answers do not move;
- greedy answers to the held-out prompts: how many read like the chosen answer rather than the rejected
  one, and their mean length (the reward-hacking watch);
- against a reference answer (an SFT row's answer, a pair's chosen one, an up-rated completion): how many
  answers take its form and how many carry its content (outcomes.py), and where some references refuse,
  the share refused that should be and the share of innocent prompts over-refused;
- KL from the reference along those answers, summed over their tokens (exact per token, over the vocabulary);
- what may have been lost: a knowledge probe (simple questions checked by content, whatever the form) and
  perplexity on general English (the forgetting watch);
- the prompting baseline: the same model with k training examples as demonstrations in the prompt.

`measure()` works on models in memory (the training watch uses it); `evaluate()` loads a run or model.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import runfolder
from .errors import NbalignError
from .preference_specs import DEFAULT_BETA
from .results import Evaluation, RewardEvaluation
from .scoring import accuracy_with_ties
from .text import assistant_text, completion_text, joined, last_user_text, plain_prompt, to_messages

@dataclass
class EvalData:
    """What the evaluation runs on: pairs or thumbs, their prompts, and general text."""

    pairs: list[dict] = field(default_factory=list)  # conversational {"prompt", "chosen", "rejected"}
    thumbs: list[dict] = field(default_factory=list)  # conversational {"prompt", "completion", "label"}
    general_text: list[str] = field(default_factory=list)
    source: str = "held-out"
    prompt_list: list = field(default_factory=list)  # prompts alone (online RL, SFT): answers, length, KL
    reference_of: dict = field(default_factory=dict)  # prompt (as JSON) -> the reference answer's text
    probe: list = field(default_factory=list)  # the knowledge probe: [(question, [accepted key words])]
    demos: list = field(default_factory=list)  # few-shot demonstrations: [(prompt messages, answer text)]

    @functools.cached_property
    def references(self) -> list:
        """outcomes.Reference of each prompt with a reference answer (None for the others): the chosen answer
        of a pair, an up-rated completion, or an SFT row's answer."""
        from .outcomes import references

        texts = dict(self.reference_of)
        for r in self.pairs:
            texts.setdefault(json.dumps(r["prompt"]), assistant_text(r["chosen"]))
        for r in self.thumbs:
            if r["label"]:
                texts.setdefault(json.dumps(r["prompt"]), assistant_text(r["completion"]))
        keys = [json.dumps(p) for p in self.prompts]
        known = [(i, k) for i, k in enumerate(keys) if k in texts]
        made = references([texts[k] for _, k in known], [last_user_text(self.prompts[i]) for i, _ in known])
        out: list = [None] * len(keys)
        for (i, _), ref in zip(known, made):
            out[i] = ref
        return out

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


def eval_data(data: Any, general_text: Any = None, source: str = "held-out", limit: int = 32,
              notes: bool = True, probe: Any = True, demos: list | None = None) -> EvalData:
    """Held-out pairs, thumbs or demonstrations (any format %%dpo / %%kto / %%sft accept), at most `limit` of
    them. `demos`: (prompt, answer text) demonstrations for the prompting baseline."""
    from .data import load_records, to_conversations
    from .preference_data import to_pairs, to_unpaired

    records = load_records(data, "evaluation data")[:limit]
    columns = {k for r in records for k in r}
    # `notes=False`: the run already said how it read these rows (a published form) when it prepared them.
    with contextlib.nullcontext() if notes else contextlib.redirect_stdout(io.StringIO()):
        if {"chosen", "rejected"} <= columns:
            result = EvalData(pairs=to_pairs(records, "evaluation data"), source=source)
        elif "label" in columns:
            result = EvalData(thumbs=to_unpaired(records, "evaluation data"), source=source)
        else:
            return sft_eval_data(to_conversations(records, "evaluation data"), general_text, source, limit, probe,
                                 demos)
    result.general_text = general_texts(general_text)
    result.probe, result.demos = probes(probe), list(demos or [])
    return result


def split_turns(row: dict) -> tuple[list[dict], str]:
    """(the prompt: every message before the last assistant turn, that turn's text) of a normalised SFT row."""
    messages = row["messages"] if "messages" in row else list(row["prompt"]) + list(row["completion"])
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    start = last
    while start > 0 and messages[start - 1]["role"] == "assistant":
        start -= 1
    return messages[:start], joined(messages[start:last + 1])


def sft_eval_data(rows: list[dict], general_text: Any = None, source: str = "held-out", limit: int = 32,
                  probe: Any = True, demos: list | None = None) -> EvalData:
    """What an SFT run is measured on: the prompts of normalised conversations (data.to_conversations) with
    their answers as references, general text, the knowledge probe, and few-shot demonstrations."""
    result = EvalData(source=source, general_text=general_texts(general_text), probe=probes(probe))
    for row in rows[:limit]:
        prompt, answer = split_turns(row)
        result.prompt_list.append(prompt)
        result.reference_of.setdefault(json.dumps(prompt), answer)
    result.demos = list(demos or [])
    return result


def demonstrations(rows: list, k: int) -> list:
    """k rows spread evenly over the training data (not the first k: data is often grouped by kind)."""
    if k <= 0 or not rows:
        return []
    k = min(k, len(rows))
    return [rows[((2 * i + 1) * len(rows)) // (2 * k)] for i in range(k)]  # the middle of each k-th


def probes(value: Any) -> list[tuple[str, list[str]]]:
    """The knowledge probe: the built-in questions, none (False), or the user's [{question, answer}] rows (the
    answer's key words must all be in a right answer; "|" separates accepted alternatives)."""
    from .specs import checked_probe

    value = checked_probe(value, "nbalign.evaluate")
    if not value:  # False, None or no rows
        return []
    if value is True:
        from .examples import KNOWLEDGE_PROBE

        return list(KNOWLEDGE_PROBE)
    return [(r["question"], [w for w in r["answer"].split() if w]) for r in value]


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


def measure(model, tokenizer, data: EvalData, reference, beta: float, max_new_tokens: int = 64,
            reference_cache: dict | None = None, same_as_reference: bool = False, known: dict | None = None) -> dict:
    """All metrics of `model` against `reference` (a context manager yielding the reference model, or None
    when none is in memory). `reference_cache` keeps the reference's own numbers between calls: they do not
    change while the policy trains. `same_as_reference`: the model is the reference (before the first step),
    so its log-probs are the reference's and its KL is zero, without computing either twice. `known`: the
    model's own measures (`model_measures`) taken earlier, used instead of measuring them again."""
    from .generation import generate_with
    from .scoring import answer_kl, sequence_logps

    cache = reference_cache if reference_cache is not None else {}
    out: dict[str, Any] = {}
    with _eval_mode(model):
        rows = data.pairs or data.thumbs
        if rows:
            heads, tails = [], []
            for r in rows:
                for answer in ((r["chosen"], r["rejected"]) if data.pairs else (r["completion"],)):
                    head, tail = completion_text(tokenizer, r["prompt"], answer)
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
                    out["accuracy"] = accuracy_with_ties(diffs)
                    out["margin"] = sum(diffs) / len(diffs)
                    chosen = [(pol[2 * i] - ref_logps[2 * i]) / max(counts[2 * i], 1) for i in range(len(rows))]
                    out["chosen_logp_change"] = sum(chosen) / len(chosen)
                else:
                    signs = [(r if row["label"] else -r) for r, row in zip(rewards, rows)]
                    out["label_accuracy"] = accuracy_with_ties(signs)
        prompts = data.prompts
        if prompts:
            answers = generate_with(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
            out["length"] = sum(len(a) for a in answers) / len(answers)
            out["answers"] = answers
            if data.pairs:
                by_prompt = {json.dumps(r["prompt"]): r for r in data.pairs}
                likes = [
                    _like(a, joined(by_prompt[json.dumps(p)]["chosen"]), joined(by_prompt[json.dumps(p)]["rejected"]))
                    for p, a in zip(prompts, answers)
                ]
                out["like_chosen"] = sum(likes) / len(likes)
            if same_as_reference:
                out["kl"] = 0.0
            elif reference is not None:
                heads, tails = zip(*[
                    completion_text(tokenizer, p, [{"role": "assistant", "content": a}]) for p, a in zip(prompts, answers)
                ])
                kls = answer_kl(model, reference, tokenizer, list(heads), list(tails))
                out["kl"] = sum(kls) / len(kls)
            out.update(answer_scores(answers, data.references))
    out.update(known if known is not None else model_measures(model, tokenizer, data))
    return out


def model_measures(model, tokenizer, data: EvalData) -> dict:
    """What depends on the model alone, not on the run's data or settings: the knowledge probe (answers and
    score) and perplexity on the general text. An untrained model's are the same for every run that starts
    from it, so they are kept apart in the evaluation cache (callbacks.AlignmentWatch.untrained)."""
    from .generation import generate_with
    from .outcomes import probe_score
    from .scoring import perplexity

    out: dict[str, Any] = {}
    with _eval_mode(model):
        if data.probe:
            asked = generate_with(model, tokenizer, [q for q, _ in data.probe], max_new_tokens=PROBE_TOKENS)
            out.update(probe_score(asked, data.probe), probe_answers=asked, probe_questions=[q for q, _ in data.probe])
        if data.general_text:
            out["perplexity"] = perplexity(model, tokenizer, data.general_text)
    return out


# The probe's answers are short facts: they come early in an answer.
PROBE_TOKENS = 40


def answer_scores(answers: list[str], refs: list) -> dict:
    """outcomes.scores over the answers that have a reference, with per-answer flags for every answer."""
    from .outcomes import scores

    have = [(a, r) for a, r in zip(answers, refs) if r is not None]
    if not have:
        return {}
    out = scores([a for a, _ in have], [r for _, r in have])
    flags = iter(zip(out.pop("right"), out.pop("in_form")))
    per = [next(flags) if r is not None else (None, None) for r in refs]
    out["right"], out["in_form"] = [p[0] for p in per], [p[1] for p in per]
    return out


def prompting_baseline(model, tokenizer, data: EvalData, max_new_tokens: int = 64) -> dict:
    """What prompting alone reaches on the held-out prompts: the same model answering with the demonstrations
    as earlier turns of the conversation (k-shot). Zero-shot is the evaluation's "before"."""
    from .generation import generate_with

    if not data.demos or not any(r is not None for r in data.references):
        return {}
    prompts = [fewshot_prompt(data.demos, p) for p in data.prompts]
    with _eval_mode(model):  # k + 1 turns per prompt: 8 at a time keeps their cache near one batch's of 32
        answers = generate_with(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=8)
    scored = answer_scores(answers, data.references)
    return {"k": len(data.demos), **scored, "answers": answers,
            "demos": [{"prompt": plain_prompt(p), "answer": a} for p, a in data.demos]}


def fewshot_prompt(demos: list, prompt: Any) -> list[dict]:
    """`prompt` after the demonstrations as earlier turns: [user, assistant] * k, then the prompt's turns."""
    turns = [m for p, a in demos for m in (*to_messages(p), {"role": "assistant", "content": a})]
    return [*turns, *to_messages(prompt)]


# ----------------------------------------------------------------------------------------------------
# The public function


def evaluate(model: str, data: Any, reference: str | None = None, beta: float | None = None,
             general_text: Any = None, max_new_tokens: int = 64, limit: int = 32, probe: Any = True) -> Evaluation:
    """Evaluate a run (or any model) against its reference on held-out pairs, thumbs or demonstrations (SFT
    rows): answers before and after, their form and content against the reference answers, the knowledge
    probe, perplexity on general text, and for preference data the implicit reward's accuracy and margin.

    For a run trained with an adapter the reference is the model it started from, obtained by switching the
    adapter off; pass `reference=` to compare with another model (it is then loaded as a second model).
    A reward model run is evaluated by its scores instead.
    """
    from .devices import free_memory, quiet

    run = Path(str(model)) if runfolder.is_run_folder(str(model)) else None
    spec = runfolder.read_spec(run) if run is not None else {}
    if spec.get("method") == "reward_model":
        return reward_accuracy(run, data)
    if beta is None:
        beta = spec.get("trl_config", {}).get("beta") or DEFAULT_BETA
    data_ = eval_data(data, general_text, limit=limit, probe=probe)
    with quiet():
        policy, ref_ctx, tokenizer, holder = _load_pair(model, run, spec, reference)
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


def reward_accuracy(run: str | Path, pairs: Any, batch_size: int = 8, cache=None) -> RewardEvaluation:
    """Pairwise accuracy and mean margin of a finished reward model run on pairs in any format
    %%reward_model accepts. `cache` (a generation.ModelCache) keeps the scoring model between calls."""
    from .generation import cache_key
    from .models import load_reward_model
    from .preference_data import to_pairs
    from .scoring import pair_metrics
    from .data import load_records

    rows = to_pairs(load_records(pairs, "pairs"), "pairs")
    if cache is None:
        model, tokenizer = load_reward_model(run)
    else:
        model, tokenizer = cache.get(cache_key(run, "reward"), lambda: load_reward_model(run))
    return RewardEvaluation({"split": "given", **pair_metrics(model, tokenizer, rows, batch_size)})


def _load_pair(model: str, run: Path | None, spec: dict, reference: str | None):
    """(policy, reference context, tokenizer, holder of every loaded model)."""
    from .devices import pick_device
    from .generation import load_for_inference
    from .models import load_model, load_tokenizer, resolve

    holder: dict = {}
    adapter = runfolder.weights_dir(run) if run is not None else None
    if run is not None and reference is None and adapter.name == runfolder.ADAPTER and adapter.is_dir():
        from peft import PeftModel

        ref = resolve(str(run))
        device = pick_device()
        base = load_model(resolve_parent(ref), device)
        policy = PeftModel.from_pretrained(base, adapter).eval()
        holder["policy"] = policy
        return policy, adapter_off(policy), load_tokenizer(ref), holder
    policy, tokenizer = load_for_inference(model)
    if reference is None:
        if run is None:
            raise NbalignError(
                f"evaluate: '{model}' is not a run folder, so nbalign does not know its reference.",
                "pass reference='smollm2-135m' (or the model it was tuned from).",
            )
        reference = spec["spec"]["model"]
    ref_model, _ = load_for_inference(reference)
    holder.update(policy=policy, ref=ref_model)
    return policy, separate(ref_model), tokenizer, holder


def resolve_parent(ref):
    """The ModelRef of what a run started from: its base with every earlier run merged, but not itself."""
    from dataclasses import replace

    return replace(ref, parents=tuple(ref.parents[:-1]))
