"""%%reward_model: a Bradley-Terry reward model (a scalar score head on the base) trained with TRL's
RewardTrainer on (prompt, chosen, rejected) pairs. The finished run is a runs.RewardModel; its scores are
computed (scoring.py) on exactly the text TRL trained on."""

from __future__ import annotations

from .. import memory, mixing, runfolder
from ..data import load_records
from ..errors import NbalignError
from ..preference_data import check_prompt_lengths, to_pairs
from ..preference_specs import RewardSpec
from ..runs import RewardModel
from ..scoring import pair_metrics, reward_input_ids
from ..text import has_template, joined, prompt_text
from . import base


class RewardMethod(base.Method):
    name = "reward_model"

    def config_class(self, spec):
        from trl import RewardConfig

        return RewardConfig

    def trainer_class(self, spec):
        from trl import RewardTrainer

        return RewardTrainer

    def prepare(self, spec: RewardSpec, tokenizer) -> base.Prepared:
        from datasets import Dataset

        pairs, mixed = {}, []

        def prepare(data, what, replay: float = 0.0):
            rows = to_pairs(load_records(data, what), what)
            extra = mixing.mixed(spec.model, len(rows), replay, "pairs", spec.where)
            if extra:
                mixed.extend(extra)
                rows = rows + to_pairs(extra, "replay rows")
            check_prompt_lengths(rows, tokenizer, spec.max_length, what, spec.where)
            _check_pair_lengths(rows, tokenizer, spec, what)
            pairs[what] = rows
            if not has_template(tokenizer):
                # TRL needs a chat template for conversational pairs; a base model gets plain text.
                rows = [{"prompt": prompt_text(tokenizer, r["prompt"]), "chosen": joined(r["chosen"]),
                         "rejected": joined(r["rejected"])} for r in rows]
            return Dataset.from_list(rows), len(rows)

        train, n = prepare(spec.data, "training data", spec.replay)
        evals = prepare(spec.eval_data, "eval data")[0] if spec.eval_data is not None else None
        # The conversational pairs as checked, for the final evaluation.
        return base.Prepared(train, evals, n, {"pairs": pairs, "replay": mixed})

    def memory_shape(self, spec: RewardSpec, tokenizer, prepared: base.Prepared) -> dict:
        """Both answers of a pair are scored at once; the score head reads one position, not the vocabulary."""
        rows = prepared.state["pairs"]["training data"]
        units = [tuple(len(reward_input_ids(tokenizer, r["prompt"], r[k])) for k in ("chosen", "rejected"))
                 for r in rows]
        units = [u for u in units if max(u) <= spec.max_length]  # TRL drops longer pairs (_check_pair_lengths)
        return {"sequences": 2 * spec.batch_size, "length": max(max(u) for u in units), "units": units,
                "loss_tokens": 0, "kept": memory.PAIRS_KEPT}

    def config_defaults(self, spec: RewardSpec, device, steps: int, prepared) -> dict:
        return {
            **super().config_defaults(spec, device, steps, prepared),
            "max_length": spec.max_length,
            "center_rewards_coefficient": spec.center_rewards,
        }

    def load_model(self, plan: base.Plan):
        """The base with a fresh one-output score head; with an adapter, PEFT's SEQ_CLS task trains (and saves,
        as modules_to_save) the head next to the LoRA weights."""
        import torch

        from ..models import apply_adapter, load_model, new_head_is_expected

        torch.manual_seed(plan.spec.seed)  # the new head is random: make it the same each run
        with new_head_is_expected():
            model = load_model(plan.ref, plan.device, plan.adapter, head="score")
        return apply_adapter(model, plan.adapter, plan.spec.seed, task_type="SEQ_CLS")

    def build_trainer(self, plan: base.Plan, model, callbacks: list, **extra):
        """TRL's RewardTrainer, the model's forward flattening padded pairs where that computes less, its score read
        at each row's last token as transformers reads it (nbalign/batching.py)."""
        from ..batching import flatten_padded_forward, layer_costs, supports_flattening

        trainer = super().build_trainer(plan, model, callbacks, **extra)
        if plan.spec.padding_free is not False and supports_flattening(trainer.model):
            plan.state["flattener"] = flatten_padded_forward(trainer.model, layer_costs(trainer.model.config),
                                                             plan.spec.padding_free, pooled=True)
        return trainer

    def finish(self, plan: base.Plan, trainer) -> dict:
        """Pairwise accuracy and margin of the trained model on the eval data, or on the training pairs (marked
        as such) when there is none; also written to <run>/evaluation.json."""
        flattened = plan.state["flattener"].summary() if plan.state.get("flattener") else {}  # training's batches
        heldout = plan.spec.eval_data is not None
        split = "heldout" if heldout else "train"
        pairs = plan.state["pairs"]["eval data" if heldout else "training data"]
        # Without the mixed-precision wrapper: scored in the weights' own dtype, as RewardModel.score() does.
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        metrics = pair_metrics(model, plan.tokenizer, pairs, batch_size=plan.spec.batch_size)
        payload = {
            "split": split,
            "note": None if heldout else "no eval_data was given: these are the training pairs, not held-out ones",
            **metrics,
        }
        runfolder.save_evaluation(plan.out, {k: v for k, v in payload.items() if v is not None})
        return {f"{split}_accuracy": round(metrics["accuracy"], 4), f"{split}_margin": round(metrics["margin"], 4),
                **flattened}

    def card_usage(self, plan: base.Plan) -> tuple[str, str]:
        return "AutoModelForSequenceClassification", f'nbalign.RewardModel("{plan.out}").score(prompt, answer)'


def _check_pair_lengths(rows: list[dict], tokenizer, spec: RewardSpec, what: str) -> None:
    """TRL silently drops pairs longer than max_length; say so instead."""
    def longest(r: dict) -> int:
        return max(len(reward_input_ids(tokenizer, r["prompt"], r["chosen"])),
                   len(reward_input_ids(tokenizer, r["prompt"], r["rejected"])))

    long = [i for i, r in enumerate(rows) if longest(r) > spec.max_length]
    if len(long) == len(rows):
        raise NbalignError(
            f"{spec.where}: every pair of the {what} is longer than max_length {spec.max_length} tokens, and TRL "
            "skips those.",
            "raise --max-length, or shorten the answers.",
        )
    if long:
        print(f"nbalign: {len(long)} of {len(rows)} pairs of the {what} are longer than max_length "
              f"{spec.max_length} tokens and are skipped (raise --max-length to keep them).")


def reward_model(spec: RewardSpec) -> RewardModel:
    return RewardModel(base.run(RewardMethod(), spec).path)
