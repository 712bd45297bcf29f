"""AI labels (RLAIF): a judge with written principles pre-labels pairs for a person to confirm or overturn.

A judge is a %%reward_model run (the higher score wins), a Python function, or a causal LM prompted with the
principles. The LM judge reads its next-token probability of "A" against "B" with the answers shown in both
orders and averages the two, because small models prefer whichever answer comes first (or, pointwise, of
"Yes" against "No" for each answer alone). It uses the process's one model cache: call it from the main
thread. Its agreement with people is in agreement.py; the principles and the constitutional revise step in
constitution.py.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NamedTuple

from ..errors import NbalignError
from ..text import plain_prompt
from .constitution import DEFAULT_CONSTITUTION, open_store, principles_of


class Verdict(NamedTuple):
    """One judgement: choice "A" | "B" | "tie"; score > 0 favours A (its scale is the judge's own); why."""

    choice: str
    score: float
    reason: str


def _choice(score: float, margin: float) -> str:
    return "tie" if abs(score) <= margin else "A" if score > 0 else "B"


def _conversation(prompt: Any) -> str:
    plain = plain_prompt(prompt)
    if not isinstance(plain, list):
        return plain or ""
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content') or ''}" for m in prompt)


class Judge:
    """Compares two answers to one prompt. `compare(prompt, a, b)` -> Verdict(choice, score, reason);
    `compare_many([(prompt, a, b), ...])` does many at once (batched where the judge can)."""

    kind = "judge"
    principles: tuple[str, ...] | None = None

    def __init__(self, name: str):
        self.name = name

    @property
    def labeller(self) -> str:
        return f"judge:{self.name}"

    def compare(self, prompt: Any, a: str, b: str) -> Verdict:
        return self.compare_many([(prompt, a, b)])[0]

    def compare_many(self, triples: list[tuple]) -> list[Verdict]:
        raise NotImplementedError

    def __repr__(self) -> str:
        extra = f", {len(self.principles)} principles" if self.principles else ""
        return f"{type(self).__name__}({self.name!r}{extra})"


class FunctionJudge(Judge):
    """A Python function: f(prompt, a, b) -> "A" | "B" | "tie" or a number (> 0 prefers A), optionally with a
    reason as (value, reason); or f(prompt, answer) -> a score, the higher answer winning."""

    kind = "function"

    def __init__(self, fn: Callable, margin: float = 0.0):
        super().__init__(getattr(fn, "__name__", type(fn).__name__).strip("<>") or "function")
        self.fn, self.margin = fn, margin
        self.pointwise = _positional_arity(fn) == 2

    def compare_many(self, triples):
        out = []
        for prompt, a, b in triples:
            try:
                if self.pointwise:
                    sa, sb = _number(self.fn(prompt, a), self.name), _number(self.fn(prompt, b), self.name)
                    out.append(Verdict(_choice(sa - sb, self.margin), sa - sb, f"{self.name}: A {sa:.4g}, B {sb:.4g}"))
                else:
                    out.append(self._verdict(self.fn(prompt, a, b)))
            except NbalignError:
                raise
            except Exception as exc:  # noqa: BLE001 - the user's function: say which one failed, and on what
                raise NbalignError(f"The judge function {self.name} failed: {type(exc).__name__}: {exc}",
                                   "fix the function; it is called as f(prompt, a, b) or f(prompt, answer).") from exc
        return out

    def _verdict(self, value: Any) -> Verdict:
        reason = self.name
        if isinstance(value, tuple) and len(value) == 2:
            value, reason = value[0], str(value[1])
        if isinstance(value, str) and value.strip().lower() in ("a", "b", "tie"):
            choice = {"a": "A", "b": "B", "tie": "tie"}[value.strip().lower()]
            return Verdict(choice, {"A": 1.0, "B": -1.0, "tie": 0.0}[choice], reason)
        score = _number(value, self.name, 'or "A", "B", "tie"')
        return Verdict(_choice(score, self.margin), score, reason)


def _positional_arity(fn: Callable) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 3
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 3
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    n = len(required) if len(required) in (2, 3) else len(positional)
    if n not in (2, 3):
        raise NbalignError(f"The judge function {getattr(fn, '__name__', fn)} takes {n} positional arguments.",
                           "write f(prompt, a, b) returning 'A'/'B'/'tie' or a number, or f(prompt, answer) -> score.")
    return n


def _number(value: Any, name: str, alternatives: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise NbalignError(f"The judge function {name} returned {value!r}.",
                           f"return a number {alternatives} (> 0 prefers A)".replace("  ", " ") + ".")
    value = float(value)
    if not math.isfinite(value):
        raise NbalignError(f"The judge function {name} returned {value}.", "return a finite number.")
    return value


class RewardJudge(Judge):
    """A finished %%reward_model run: scores both answers; the higher wins, a tie within `margin`."""

    kind = "reward model"

    def __init__(self, run: Any, margin: float = 1e-3, batch_size: int = 8):
        from ..runs import RewardModel

        self.run = run if isinstance(run, RewardModel) else RewardModel(run)
        super().__init__(str(run.path if isinstance(run, RewardModel) else run))
        self.margin, self.batch_size = margin, batch_size

    def compare_many(self, triples):
        if not triples:
            return []
        prompts = [p for p, _, _ in triples] * 2
        answers = [a for _, a, _ in triples] + [b for _, _, b in triples]
        scores = self.run.score(prompts, answers, batch_size=self.batch_size)
        n = len(triples)
        return [Verdict(_choice(sa - sb, self.margin), sa - sb, f"reward A {sa:.3f}, B {sb:.3f}")
                for sa, sb in zip(scores[:n], scores[n:])]


class LMJudge(Judge):
    """A causal LM (a name, a run folder, or a loaded (model, tokenizer)) prompted with the principles; it never
    generates: its next-token probabilities are read.

    mode="pairwise" (default, the usual RLAIF form): both answers, "Which follows the principles better? A or
    B", asked with each answer shown first; the two are averaged, which cancels a pure position bias;
    score = 2 P(A better) - 1. mode="pointwise": each answer alone, "Does this answer follow these
    principles? Yes or No"; score = P(yes | A) - P(yes | B). Measured on the built-in 135M model: it answers
    pairwise mostly by position (P(first) about 0.9 in either order), yet what is left after averaging
    picked the terse answer over a rambling one in 32 of 32 pairs under the default constitution, and was at
    chance on a wrong fact against the right one (11 of 22); pointwise picked the right fact 16 of 22 but not
    the terse answer (8 of 16). `margin`: |score| within it is a tie (default 0: a small model's margins are
    small, and still carry what signal there is)."""

    kind = "language model"
    MODES = ("pairwise", "pointwise")

    def __init__(self, model: Any = None, principles: Any = None, margin: float = 0.0, batch_size: int = 8,
                 mode: str = "pairwise"):
        from ..models import resolve
        from ..specs import BUILTIN_MODEL

        if mode not in self.MODES:
            raise NbalignError(f"mode={mode!r} is not a way to ask a language-model judge.",
                               f"use one of {', '.join(self.MODES)}.")
        self.loaded = model if isinstance(model, tuple) else None
        model = BUILTIN_MODEL if model is None else model
        if self.loaded is None:
            resolve(str(model))  # fails now, with the fix, rather than when the first batch is judged
        self.model, self.principles, self.mode = model, principles_of(principles), mode
        # Judges that ask differently label under different names, so one never replaces another's labels.
        tags = ["pointwise"] * (mode == "pointwise") + [
            hashlib.sha1("\n".join(self.principles).encode()).hexdigest()[:6]] * (self.principles != DEFAULT_CONSTITUTION)
        super().__init__("/".join([getattr(self.loaded[0], "name_or_path", "model") if self.loaded else str(model), *tags]))
        self.margin, self.batch_size = margin, batch_size

    def _model(self):
        if self.loaded is not None:
            return self.loaded
        from ..generation import CACHE, cache_key, load_for_inference

        # The process's one model cache: judging after generating with the same model does not load it twice.
        return CACHE.get(cache_key(str(self.model)), lambda: load_for_inference(str(self.model)))

    def _rules(self) -> str:
        return "\n".join(f"{i}. {p}" for i, p in enumerate(self.principles, 1))

    def pair_message(self, prompt: Any, first: str, second: str) -> list[dict]:
        return [{"role": "user", "content": (
            f"Compare two answers to the same request.\n\nPrinciples:\n{self._rules()}\n\nRequest:\n"
            f"{_conversation(prompt)}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n"
            "Which answer follows the principles better? Reply with one letter, A or B.")}]

    def answer_message(self, prompt: Any, answer: str) -> list[dict]:
        # The principles after the answer: measured on the built-in model, slightly better than before it.
        return [{"role": "user", "content": (
            f"Request: {_conversation(prompt)}\nAnswer: {answer}\n\nDoes this answer follow these principles?\n"
            f"{self._rules()}\nReply Yes or No.")}]

    def compare_many(self, triples):
        if not triples:
            return []
        model, tokenizer = self._model()
        n, out = len(triples), []
        if self.mode == "pointwise":
            asked = [self.answer_message(p, a) for p, a, _ in triples] + [self.answer_message(p, b) for p, _, b in triples]
            yes = next_token_odds(model, tokenizer, asked, "Yes", "No", self.batch_size)
            for ya, yb in zip(yes[:n], yes[n:]):
                out.append(Verdict(_choice(ya - yb, self.margin), ya - yb, f"P(yes): A {ya:.3f}, B {yb:.3f}"))
            return out
        shown = [self.pair_message(p, a, b) for p, a, b in triples] + [self.pair_message(p, b, a) for p, a, b in triples]
        first = next_token_odds(model, tokenizer, shown, "A", "B", self.batch_size)
        for p_ab, p_ba in zip(first[:n], first[n:]):
            p_a = (p_ab + (1.0 - p_ba)) / 2  # A better: A shown first and chosen, or shown second and chosen
            bias = " (it preferred whichever came first)" if p_ab > 0.5 and p_ba > 0.5 else (
                " (it preferred whichever came second)" if p_ab < 0.5 and p_ba < 0.5 else "")
            out.append(Verdict(_choice(2 * p_a - 1, self.margin), 2 * p_a - 1,
                               f"P(A better) {p_a:.3f}: {p_ab:.3f} with A shown first, {1 - p_ba:.3f} with A shown "
                               f"second{bias}"))
        return out

    def __repr__(self) -> str:
        return f"LMJudge({self.name!r}, {self.mode}, {len(self.principles)} principles)"


def _word_ids(tokenizer, word: str) -> list[int]:
    """The first token of the word, with and without a leading space (either may start the reply)."""
    return sorted({tokenizer.encode(v, add_special_tokens=False)[0] for v in (word, " " + word)})


def next_token_odds(model, tokenizer, conversations: list[list[dict]], yes: str, no: str,
                    batch_size: int = 8) -> list[float]:
    """For each conversation, P(reply starts with `yes`) / (P(`yes`) + P(`no`)) at the assistant's first token.
    Left-padded batches (position ids from the mask, so padding changes nothing), sorted by length to pad
    little, and only the last position's logits computed: a vocabulary row per token would not fit."""
    import torch

    from ..text import pad_id, prompt_text

    seqs = [tokenizer(prompt_text(tokenizer, c), add_special_tokens=False)["input_ids"] for c in conversations]
    yes_ids, no_ids = _word_ids(tokenizer, yes), _word_ids(tokenizer, no)
    device = next(model.parameters()).device
    out: list[float] = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id(tokenizer), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(seqs[i]):] = torch.tensor(seqs[i])
            mask[row, width - len(seqs[i]):] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        inputs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device))
        with torch.no_grad():
            try:
                logits = model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]
            except TypeError:  # a model class without logits_to_keep
                logits = model(**inputs, use_cache=False).logits[:, -1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        odds = torch.sigmoid(torch.logsumexp(logp[:, yes_ids], -1) - torch.logsumexp(logp[:, no_ids], -1))
        for row, i in enumerate(idx):
            out[i] = float(odds[row])
    return out


def make_judge(judge: Any = None, principles: Any = None, margin: float | None = None, batch_size: int = 8,
               mode: str = "pairwise", name: str | None = None) -> Judge:
    """A Judge from: None (the built-in model prompted with the principles), a model name or run folder (a
    causal LM, prompted likewise; `mode` "pairwise" or "pointwise", see LMJudge), a loaded (model, tokenizer),
    a %%reward_model run folder or RewardModel, a Python function, or a Judge (returned as it is).
    `principles`: a list of sentences (default DEFAULT_CONSTITUTION); they steer a language-model judge
    only. `margin`: a score difference within it is a tie (default: 1e-3 for a reward model, else 0). `name`:
    the judge's labels are stored under "judge:<name>" (default: the model, with "/pointwise" and a tag of the
    principles when not the default ones; the run folder; the function's name)."""
    made = _make_judge(judge, principles, margin, batch_size, mode)
    if name and name != made.name:
        made = copy.copy(made)  # a Judge passed in keeps its own name
        made.name = name
    return made


def _make_judge(judge: Any, principles: Any, margin: float | None, batch_size: int, mode: str) -> Judge:
    from ..runs import RewardModel, Run

    if isinstance(judge, Judge) and principles is None:
        return judge
    if isinstance(judge, Run) and not isinstance(judge, RewardModel):
        judge = judge.path
    rewards = isinstance(judge, RewardModel) or _is_reward_run(judge)
    if principles is not None and not (judge is None or isinstance(judge, (str, Path, tuple, LMJudge))) or (
            principles is not None and rewards):
        raise NbalignError(f"principles only steer a language-model judge; {judge!r} judges by its own scores.",
                           "drop principles=, or pass a causal LM (e.g. 'smollm2-135m') as the judge.")
    if isinstance(judge, LMJudge):
        return LMJudge(judge.loaded or judge.model, principles, judge.margin, judge.batch_size, judge.mode)
    if rewards:
        return RewardJudge(judge, 1e-3 if margin is None else margin, batch_size)
    if judge is None or isinstance(judge, (str, Path, tuple)):
        return LMJudge(judge, principles, margin or 0.0, batch_size, mode)
    if callable(judge):
        return FunctionJudge(judge, margin or 0.0)
    raise NbalignError(f"{judge!r} ({type(judge).__name__}) cannot judge.",
                       "pass a model name or run folder, a %%reward_model run, or a function f(prompt, a, b).")


def _is_reward_run(judge: Any) -> bool:
    from ..runfolder import is_run_folder, read_spec

    if not isinstance(judge, (str, Path)) or not Path(judge).expanduser().is_dir():
        return False
    folder = Path(judge).expanduser()
    return is_run_folder(folder) and read_spec(folder).get("method") == "reward_model"


def prelabel(store: Any, judge: Any = None, principles: Any = None, items: Any = None, overwrite: bool = False,
             batch_size: int = 8, **judge_options) -> dict:
    """Pre-label the store's pairs with a judge: one label row per item, origin "judge", labeller
    "judge:<name>", note {"reason", "score", "principles"}. Human labels are never changed (a person's
    decision always wins over a judge's). Items any judge has labelled already (the constitution's revisions
    included) are skipped unless `overwrite`, which adds this judge's label (a judge's newer label replaces
    its own older one). `items`: item ids or Items (default: every pair). Returns counts."""
    store, judge = open_store(store), make_judge(judge, principles, batch_size=batch_size, **judge_options)
    wanted = None if items is None else {getattr(i, "id", i) for i in items}
    pairs = [it for it in store.items("pair") if wanted is None or it.id in wanted]
    judged = store.votes("judge")
    todo = [it for it in pairs if overwrite or it.id not in judged]
    counts = Counter({"judged": 0, "A": 0, "B": 0, "tie": 0})
    counts["already judged (skipped)"] = len(pairs) - len(todo)
    if wanted is not None and len(wanted - {it.id for it in pairs}):
        counts["not pair items (skipped)"] = len(wanted - {it.id for it in pairs})
    principles_note = list(judge.principles) if judge.principles else []
    for start in range(0, len(todo), batch_size):  # written chunk by chunk: an interrupt keeps what was judged
        chunk = todo[start:start + batch_size]
        for it, v in zip(chunk, judge.compare_many([(it.prompt, it.a, it.b) for it in chunk])):
            store.label(it.id, v.choice, labeller=judge.labeller, origin="judge",
                        note={"reason": v.reason, "score": v.score, "judge": judge.kind, "principles": principles_note})
            counts["judged"] += 1
            counts[v.choice] += 1
    return dict(counts)
