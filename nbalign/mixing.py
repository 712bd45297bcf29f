"""Replay against forgetting (`replay: 0.2`): general questions the base model answers well, answered by that
base model itself, mixed into a run's training rows.

Rehearsing a share of general data while tuning is the standard remedy for catastrophic forgetting and the
alignment tax (experience replay; InstructGPT's pretraining mix). nbalign's general data is built in
(examples.GENERAL_QUESTIONS), so replay works offline, and its answers are the base model's own greedy answers,
kept only where they hold the right key words: the replay asks the model to keep answering as it already did
where it was right (self-distillation), never in a style or with facts that the base did not have.

As rows per method: SFT conversations; DPO pairs whose chosen answer is the base's own and whose rejected answer
is the base's answer to another question (keep answering the question asked); KTO thumbs-up rows; reward-model
pairs like DPO's. The answers are cached per base model in ~/.cache/nbalign/replay and saved with each run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import NbalignError

REPLAY_TOKENS = 64


def count(n_task: int, share: float) -> int:
    """Replay rows so that they are `share` of the mixed rows: n / (n + r) = 1 - share."""
    if share <= 0 or n_task <= 0:
        return 0
    return max(1, round(share * n_task / (1 - share)))


def base_answers(model: str) -> list[tuple[str, str]]:
    """(question, the base model's answer) for the general questions it answers right."""
    from .examples import GENERAL_QUESTIONS
    from .models import cache_dir, resolve
    from .outcomes import probe_score

    ref = resolve(model)
    key = hashlib.sha256(json.dumps([ref.base, list(ref.parents), _stamp(ref), GENERAL_QUESTIONS,
                                     REPLAY_TOKENS]).encode()).hexdigest()[:20]
    path = cache_dir() / "replay" / f"{key}.json"
    if path.is_file():
        try:
            return [tuple(p) for p in json.loads(path.read_text(encoding="utf-8"))]
        except (ValueError, OSError):
            pass  # a damaged cache file is made again
    from .generation import generate

    questions = [q for q, _ in GENERAL_QUESTIONS]
    answers = generate(model, questions, max_new_tokens=REPLAY_TOKENS)
    right = probe_score(answers, GENERAL_QUESTIONS)["probe_right"]
    kept = [(q, a) for q, a, ok in zip(questions, answers, right) if ok and a.strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(kept), encoding="utf-8")
    os.replace(tmp, path)
    return kept


def _stamp(ref) -> list:
    """When the weights behind a model last changed: a retrained parent run gives new answers."""
    stamps = []
    for folder in (ref.base, *ref.parents):
        files = [p for p in Path(folder).glob("**/*.safetensors")][:8]
        stamps.append(sorted((p.name, p.stat().st_mtime_ns) for p in files))
    return stamps


def rows(model: str, n: int, kind: str, where: str) -> list[dict]:
    """`n` replay rows for a method's data `kind`: "sft", "pairs" or "thumbs" (questions reused in turn when
    `n` is larger than the set)."""
    if n <= 0:
        return []
    answered = base_answers(model)
    if len(answered) < 2:
        raise NbalignError(
            f"{where}: replay needs general questions the base model answers right, and '{model}' answered only "
            f"{len(answered)} of them right.",
            "turn replay off (replay: 0) for this model, or mix your own general data into --data.",
        )
    out = []
    for i in range(n):
        q, a = answered[i % len(answered)]
        if kind == "sft":
            out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        elif kind == "pairs":
            other = answered[(i + 1 + i // len(answered)) % len(answered)][1]
            out.append({"prompt": q, "chosen": a, "rejected": other})
        else:
            out.append({"prompt": q, "completion": a, "label": True})
    return out


WHAT = {
    "sft": "general questions answered by the base model itself",
    "pairs": "pairs of the base model's own right answer to a general question against its answer to another one",
    "thumbs": "general questions with the base model's own answer, rated up",
}


def mixed(model: str, n_task: int, share: float, kind: str, where: str) -> list[dict]:
    """The replay rows for a run of `n_task` training rows with `replay: share` (none for 0), said in one line."""
    extra = rows(model, count(n_task, share), kind, where)
    if extra:
        print(f"nbalign: replay: {len(extra)} {WHAT[kind]} are mixed into the {n_task} training rows "
              f"({share:.0%} of the rows).", flush=True)
    return extra
