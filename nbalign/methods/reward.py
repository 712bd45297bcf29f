"""%%reward_model: a Bradley-Terry reward model (a scalar score head on the base) trained with TRL's
RewardTrainer on (prompt, chosen, rejected) pairs, and RewardModel, the finished run that scores answers.

Scores are computed on exactly the text TRL trained on: for conversational pairs (what nbalign passes to
TRL) the model's chat template rendered over prompt + answer, `apply_chat_template(messages,
tokenize=True)`, no generation prompt, padded on the right; the score head reads the last token that is
not the pad token. GRPO and RLOO render a reward model's input the same way, so a RewardModel scores the
same in a notebook, in training, and as the reward of %%rlhf.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data import _as_messages, check_prompt_lengths, load_records, prompt_text, to_pairs
from ..errors import NbalignError
from ..runs import Run, read_status, write_json_atomic
from ..specs import RewardSpec
from . import base

WHERE = "%%reward_model"


# ----------------------------------------------------------------------------------------------------
# Rendering and scoring, shared by training-time evaluation and RewardModel.


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode(tokenizer, prompt: list[dict], answer: list[dict]) -> list[int]:
    """Token ids of one (prompt, answer) as TRL's RewardTrainer tokenizes a conversational pair: the chat
    template over prompt + answer. Without a chat template nbalign passes TRL plain text instead (prompt
    text, then the answer and EOS), tokenized with the tokenizer's special tokens, as TRL does."""
    if _has_template(tokenizer):
        return list(tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)["input_ids"])
    text = prompt_text(tokenizer, prompt) + _answer_text(answer)
    if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return list(tokenizer(text=text)["input_ids"])


def _answer_text(answer: list[dict]) -> str:
    return "".join(m["content"] for m in answer)


def score_ids(model, tokenizer, sequences: list[list[int]], batch_size: int = 8) -> list[float]:
    """The score head's output for each token sequence, batched and right-padded like TRL's collator."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        for i in range(0, len(sequences), batch_size):
            chunk = sequences[i : i + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[row, : len(seq)] = 1
            with torch.no_grad():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            scores.extend(float(v) for v in logits[:, 0].float().cpu())
    finally:
        model.train(was_training)
    return scores


def pair_metrics(model, tokenizer, pairs: list[dict], batch_size: int = 8) -> dict:
    """Pairwise accuracy (share of pairs where chosen scores above rejected) and the mean margin."""
    chosen = score_ids(model, tokenizer, [encode(tokenizer, p["prompt"], p["chosen"]) for p in pairs], batch_size)
    rejected = score_ids(model, tokenizer, [encode(tokenizer, p["prompt"], p["rejected"]) for p in pairs], batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]
    n = len(pairs)
    return {
        "pairs": n,
        "accuracy": sum(m > 0 for m in margins) / n,
        "margin": sum(margins) / n,
        "mean_chosen": sum(chosen) / n,
        "mean_rejected": sum(rejected) / n,
    }


# ----------------------------------------------------------------------------------------------------
# The training method.


class RewardMethod(base.Method):
    name = "reward_model"

    @property
    def config_class(self):
        from trl import RewardConfig

        return RewardConfig

    def __init__(self):
        self.pairs: dict[str, list[dict]] = {}  # conversational pairs as checked, for the final evaluation

    def build_datasets(self, spec: RewardSpec, tokenizer):
        from datasets import Dataset

        def prepare(data, what):
            rows = to_pairs(load_records(data, what), what)
            check_prompt_lengths(rows, tokenizer, spec.max_length, what, WHERE)
            _check_pair_lengths(rows, tokenizer, spec.max_length, what)
            self.pairs[what] = rows
            if not _has_template(tokenizer):
                # TRL needs a chat template for conversational pairs; a base model gets plain text.
                rows = [
                    {"prompt": prompt_text(tokenizer, r["prompt"]), "chosen": _answer_text(r["chosen"]),
                     "rejected": _answer_text(r["rejected"])}
                    for r in rows
                ]
            return Dataset.from_list(rows), len(rows)

        train, n = prepare(spec.data, "training data")
        evals = prepare(spec.eval_data, "eval data")[0] if spec.eval_data is not None else None
        return train, evals, n

    def config_defaults(self, spec: RewardSpec, device, adapter, steps: int) -> dict:
        return {
            **base.common_defaults(spec, device, steps),
            # LoRA on the built-in model and style_pairs (measured): 2e-4 triples the held-out margin in one epoch.
            "learning_rate": spec.learning_rate or (1e-5 if adapter.type == "full" else 2e-4),
            "max_length": spec.max_length,
            "center_rewards_coefficient": spec.center_rewards,
        }

    def load_model(self, plan: base.Plan):
        """The base with a fresh one-output score head; with an adapter, PEFT's SEQ_CLS task trains (and saves,
        as modules_to_save) the head next to the LoRA weights."""
        import torch

        from ..models import apply_adapter, load_model

        torch.manual_seed(plan.spec.seed)  # the new head is random: make it the same each run
        with _new_head_is_expected():
            model = load_model(plan.ref, plan.device, plan.adapter, head="score")
        return apply_adapter(model, plan.adapter, plan.spec.seed, task_type="SEQ_CLS")

    def trainer_class(self):
        from trl import RewardTrainer

        return RewardTrainer

    def finish(self, plan: base.Plan, trainer) -> dict:
        """Pairwise accuracy and margin of the trained model on the eval data, or on the training pairs (marked
        as such) when there is none; also written to <run>/evaluation.json."""
        heldout = plan.spec.eval_data is not None
        split = "heldout" if heldout else "train"
        pairs = self.pairs["eval data" if heldout else "training data"]
        # Without the mixed-precision wrapper: scored in the weights' own dtype, as RewardModel.score() does.
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        metrics = pair_metrics(model, plan.tokenizer, pairs, batch_size=plan.spec.batch_size)
        payload = {
            "split": split,
            "note": None if heldout else "no eval_data was given: these are the training pairs, not held-out ones",
            **metrics,
        }
        write_json_atomic(plan.out / "evaluation.json", {k: v for k, v in payload.items() if v is not None})
        return {f"{split}_accuracy": round(metrics["accuracy"], 4), f"{split}_margin": round(metrics["margin"], 4)}


def _check_pair_lengths(rows: list[dict], tokenizer, max_length: int, what: str) -> None:
    """TRL silently drops pairs longer than max_length; say so instead."""
    def longest(r: dict) -> int:
        return max(len(encode(tokenizer, r["prompt"], r["chosen"])), len(encode(tokenizer, r["prompt"], r["rejected"])))

    long = [i for i, r in enumerate(rows) if longest(r) > max_length]
    if len(long) == len(rows):
        raise NbalignError(
            f"{WHERE}: every pair of the {what} is longer than max_length {max_length} tokens, and TRL skips those.",
            "raise --max-length, or shorten the answers.",
        )
    if long:
        print(f"nbalign: {len(long)} of {len(rows)} pairs of the {what} are longer than max_length {max_length} "
              "tokens and are skipped (raise --max-length to keep them).")


# ----------------------------------------------------------------------------------------------------
# A finished reward model run.


def check_reward_run(path: str | Path, what: str = "reward model") -> Path:
    """The folder of a finished %%reward_model run; anything else is an error that names the fix."""
    from ..models import is_run_folder

    folder = Path(path).expanduser()
    if not folder.exists():
        raise NbalignError(
            f"The {what} '{path}' does not exist.", "pass the folder of a %%reward_model run (its --out)."
        )
    if not folder.is_dir():
        raise NbalignError(
            f"The {what} '{path}' is a file, not a run folder.", "pass the --out folder of a %%reward_model run."
        )
    if not is_run_folder(folder):
        raise NbalignError(
            f"The {what} '{path}' is not an nbalign run folder (no spec.json/status.json).",
            "pass the --out folder of a %%reward_model run.",
        )
    method = json.loads((folder / "spec.json").read_text()).get("method")
    if method != "reward_model":
        raise NbalignError(
            f"The {what} '{path}' is a %%{method} run, not a reward model: it has no score head.",
            "train one with %%reward_model on preference pairs and pass its --out folder.",
        )
    status = read_status(folder)
    if status.get("status") != "finished":
        raise NbalignError(
            f"The reward model run '{path}' is {status.get('status', 'unknown')}, not finished, so it has no final "
            "weights.",
            f"finish it first (re-run its cell with --resume --out {path}), or pick a finished run.",
        )
    return folder


def load_reward_model(path: str | Path, device=None):
    """(model, tokenizer) of a finished reward model run: its base (parents merged) with the trained adapter
    and score head merged in, in eval mode with no gradients. One plain SequenceClassification model."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..models import load_model, pick_device, quiet, resolve

    folder = check_reward_run(path)
    device = device or pick_device()
    with quiet():
        if (folder / "model" / "config.json").is_file():  # full fine-tuning saved the whole model
            weights = folder / "model"
            model = AutoModelForSequenceClassification.from_pretrained(weights, dtype=device.dtype).to(device.type)
        else:
            weights = folder / "adapter"
            base_name = json.loads((folder / "spec.json").read_text())["spec"]["model"]
            with _new_head_is_expected():  # the trained head comes with the adapter
                model = load_model(resolve(base_name), device, head="score")
            model = PeftModel.from_pretrained(model, weights).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(weights)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def _new_head_is_expected():
    """Silence transformers' load report about the new score head (and the unused LM head), as TRL does."""
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    return suppress_seqcls_warning()


def _is_single(value: Any) -> bool:
    """A string or one message list (not a list of prompts)."""
    return isinstance(value, str) or (isinstance(value, list) and bool(value) and isinstance(value[0], dict))


class RewardEvaluation(dict):
    """evaluation.json of a reward model run, shown as a small table in a notebook."""

    LABELS = {
        "accuracy": "pairwise accuracy (chosen scored above rejected)",
        "margin": "mean margin score(chosen) - score(rejected)",
        "mean_chosen": "mean score of chosen answers",
        "mean_rejected": "mean score of rejected answers",
        "pairs": "pairs",
    }

    def _repr_html_(self) -> str:
        import html

        where = "held-out pairs" if self.get("split") == "heldout" else "training pairs (no eval_data was given)"
        rows = "".join(
            f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(label)}</th>"
            f"<td style='text-align:left'>{self[key]:.4g}</td></tr>"
            for key, label in self.LABELS.items()
            if isinstance(self.get(key), (int, float))
        )
        return f"<div><b>reward model evaluation</b> on {html.escape(where)}<table>{rows}</table></div>"


class RewardModel(Run):
    """A finished %%reward_model run: `score(prompt, response)` rates answers, `accuracy(pairs)` checks it on
    held-out pairs. The model is loaded once and kept (one model at a time, shared with generation)."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        if self.method != "reward_model":
            raise NbalignError(
                f"'{self.path}' is a %%{self.method} run, not a %%reward_model run: it has no score head.",
                f"use nbalign.Run('{self.path}') for it, or pass the folder of a %%reward_model run.",
            )

    def _loaded(self):
        from ..session import session

        check_reward_run(self.path)
        status = self.path / "status.json"
        key = f"reward:{self.path.resolve()}@{status.stat().st_mtime_ns}"
        return session.cached_model(key, lambda: load_reward_model(self.path))

    def score(self, prompt: Any, response: Any, batch_size: int = 8) -> float | list[float]:
        """The reward of `response` to `prompt`. Each may be a string or a message list; pass lists of them to
        score many at once (one prompt with a list of responses scores each response to that prompt)."""
        single = _is_single(prompt) and _is_single(response)
        prompts = [prompt] if _is_single(prompt) else list(prompt)
        responses = [response] if _is_single(response) else list(response)
        if len(prompts) == 1 and len(responses) > 1:
            prompts = prompts * len(responses)
        if len(prompts) != len(responses):
            raise NbalignError(
                f"score() got {len(prompts)} prompts and {len(responses)} responses.",
                "pass one response per prompt, or one prompt with a list of responses.",
            )
        if not prompts:
            return []
        model, tokenizer = self._loaded()
        ids = [
            encode(tokenizer, _as_messages(p, "user", i, "prompts"), _as_messages(r, "assistant", i, "responses"))
            for i, (p, r) in enumerate(zip(prompts, responses))
        ]
        scores = score_ids(model, tokenizer, ids, batch_size)
        return scores[0] if single else scores

    def accuracy(self, pairs: Any, batch_size: int = 8) -> dict:
        """Pairwise accuracy and mean margin (score(chosen) - score(rejected)) on preference pairs in any
        format %%reward_model accepts."""
        rows = to_pairs(load_records(pairs, "pairs"), "pairs")
        model, tokenizer = self._loaded()
        return pair_metrics(model, tokenizer, rows, batch_size)

    @property
    def evaluation(self) -> RewardEvaluation | None:
        """What the run measured when it finished (evaluation.json): pairwise accuracy and margin."""
        try:
            return RewardEvaluation(json.loads((self.path / "evaluation.json").read_text()))
        except (OSError, ValueError):
            return None

    def __repr__(self) -> str:
        s = self.summary
        acc = next(((k, v) for k, v in s.items() if k.endswith("_accuracy")), None)
        extra = f", {acc[0]}={acc[1]:.3f}" if acc else ""
        return f"RewardModel({str(self.path)!r}, status={self.status!r}{extra})"


def reward_model(spec: RewardSpec) -> RewardModel:
    return RewardModel(base.run(RewardMethod(), spec).path)
