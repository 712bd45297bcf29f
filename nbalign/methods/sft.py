"""%%sft: supervised fine-tuning with TRL's SFTTrainer on pre-tokenised, loss-masked conversations."""

from __future__ import annotations

from ..data import load_records, to_conversations, tokenize_sft
from ..specs import SFTSpec
from . import base


class SFT(base.Method):
    name = "sft"

    @property
    def config_class(self):
        from trl import SFTConfig

        return SFTConfig

    def build_datasets(self, spec: SFTSpec, tokenizer):
        from datasets import Dataset

        def prepare(data, what):
            rows = to_conversations(load_records(data, what), what)
            return Dataset.from_dict(tokenize_sft(rows, tokenizer, spec.completion_only_loss)), len(rows)

        train, n = prepare(spec.data, "training data")
        evals = prepare(spec.eval_data, "eval data")[0] if spec.eval_data is not None else None
        return train, evals, n

    def config_defaults(self, spec: SFTSpec, device, adapter, steps: int) -> dict:
        return {
            **base.common_defaults(spec, device, steps),
            "learning_rate": spec.learning_rate or (2e-5 if adapter.type == "full" else 2e-4),
            "max_length": spec.max_length,
            "packing": spec.packing,
            "completion_only_loss": spec.completion_only_loss,
        }

    def trainer_class(self):
        from trl import SFTTrainer

        return SFTTrainer


def sft(spec: SFTSpec):
    return base.run(SFT(), spec)
