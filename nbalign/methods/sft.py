"""%%sft: supervised fine-tuning with TRL's SFTTrainer on pre-tokenised, loss-masked conversations."""

from __future__ import annotations

from ..data import load_records, to_conversations
from ..tokens import check_sft_lengths, tokenize_sft
from ..specs import SFTSpec
from . import base


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

        def prepare(data, what):
            rows = to_conversations(load_records(data, what), what)
            tokens = tokenize_sft(rows, tokenizer, spec.completion_only_loss)
            check_sft_lengths(tokens, spec.max_length, what)
            return Dataset.from_dict(tokens), len(rows)

        train, n = prepare(spec.data, "training data")
        evals = prepare(spec.eval_data, "eval data")[0] if spec.eval_data is not None else None
        return base.Prepared(train, evals, n)

    def config_defaults(self, spec: SFTSpec, device, steps: int, prepared) -> dict:
        return {
            **super().config_defaults(spec, device, steps, prepared),
            "max_length": spec.max_length,
            "packing": spec.packing,
            "completion_only_loss": spec.completion_only_loss,
        }


def sft(spec: SFTSpec):
    return base.run(SFT(), spec)
