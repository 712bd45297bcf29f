"""%%sft: supervised fine-tuning with TRL's SFTTrainer on pre-tokenised, loss-masked conversations.

Every run says what it changed and what it cost: the evaluation watch answers held-out prompts (--eval-data, or
a slice of the training rows held out and not trained on) before, during and after training, and measures how
many answers take the reference answers' form and how many carry their content, the knowledge probe, and
perplexity on general text; before training it measures what prompting alone reaches (few-shot)."""

from __future__ import annotations

import random

from .. import mixing
from ..data import load_records, to_conversations
from ..tokens import check_sft_lengths, tokenize_sft
from ..specs import SFTSpec
from . import base, watching

# Held-out slices are taken from data sets of at least this many rows, and hold at most this many.
SPLIT_FROM, SPLIT_MAX = 20, 32
TRAINING_SAMPLE = "training data (seen in training: no eval_data given)"


class SFT(base.Method):
    name = "sft"

    def config_class(self, spec):
        from trl import SFTConfig

        return SFTConfig

    def trainer_class(self, spec):
        from trl import SFTTrainer

        return SFTTrainer

    def prepare(self, spec: SFTSpec, tokenizer) -> base.Prepared:
        from datasets import Dataset

        def tokenized(rows, what):
            tokens = tokenize_sft(rows, tokenizer, spec.completion_only_loss)
            check_sft_lengths(tokens, spec.max_length, what)
            return Dataset.from_dict(tokens)

        rows = to_conversations(load_records(spec.data, "training data"), "training data")
        n_given = len(rows)
        if spec.eval_data is not None:
            held = to_conversations(load_records(spec.eval_data, "eval data"), "eval data")
            source = "held-out"
        elif spec.eval_split > 0 and len(rows) >= SPLIT_FROM:
            k = min(SPLIT_MAX, max(2, round(len(rows) * spec.eval_split)))
            chosen = set(random.Random(spec.seed).sample(range(len(rows)), k))
            held = [r for i, r in enumerate(rows) if i in chosen]
            rows = [r for i, r in enumerate(rows) if i not in chosen]
            source = f"held-out slice of the training data ({k} of {n_given} rows, not trained on)"
            print(f"nbalign: {k} of the {n_given} training rows are held out for the evaluation and not trained on "
                  "(eval_split); pass --eval-data to evaluate on your own rows, or eval_split: 0 to train on all.",
                  flush=True)
        else:
            held = rows[:16] if spec.watch else None
            source = TRAINING_SAMPLE
        replay = mixing.mixed(spec.model, len(rows), spec.replay, "sft", spec.where)
        train = tokenized(rows + replay, "training data")
        unseen = held is not None and source != TRAINING_SAMPLE
        evals = tokenized(held, "eval data") if unseen else None  # TRL's eval loss per epoch, on unseen rows
        state = {"held": held, "source": source, "demos": watching.demos(rows, spec.fewshot), "replay": replay}
        return base.Prepared(train, evals, len(rows) + len(replay), state)

    def config_defaults(self, spec: SFTSpec, device, steps: int, prepared) -> dict:
        values = {
            **super().config_defaults(spec, device, steps, prepared),
            "max_length": spec.max_length,
            "packing": spec.packing,
            "completion_only_loss": spec.completion_only_loss,
        }
        if prepared.eval is not None:
            values["eval_strategy"] = "epoch"
        return values

    def build_trainer(self, plan: base.Plan, model, callbacks: list, **extra):
        """TRL's SFTTrainer; unless the rows are packed, with a collator that flattens a batch instead of padding
        it where that computes less (nbalign/batching.py), and reports how often it did in the summary."""
        from ..batching import PadOrFlatten, layer_costs, supports_flattening

        spec = plan.spec
        if not spec.packing and spec.padding_free is not False and supports_flattening(model):
            tokenizer = plan.tokenizer
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            plan.state["collator"] = PadOrFlatten(pad, layer_costs(model.config), spec.padding_free)
            extra.setdefault("data_collator", plan.state["collator"])
        return super().build_trainer(plan, model, callbacks, **extra)

    def extra_callbacks(self, plan: base.Plan) -> list:
        from ..callbacks import AlignmentWatch
        from ..evaluation import sft_eval_data

        spec, state = plan.spec, plan.state
        if not spec.watch or not state["held"]:
            return []
        data = sft_eval_data(state["held"], spec.general_text, state["source"], probe=spec.probe,
                             demos=state["demos"])
        state["watch"] = AlignmentWatch(data, plan.tokenizer, 0.0, spec.eval_points, spec.eval_max_new_tokens,
                                        folder=plan.out, start_model=watching.start_model(plan))
        return [state["watch"]]

    def finish(self, plan: base.Plan, trainer) -> dict:
        summary = watching.watch_summary(plan.state.get("watch"), plan.out)
        if plan.state.get("collator") is not None:
            summary.update(plan.state["collator"].summary())
        return summary


def sft(spec: SFTSpec):
    return base.run(SFT(), spec)
