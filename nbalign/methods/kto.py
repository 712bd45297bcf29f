"""%%kto: Kahneman-Tversky optimisation from unpaired thumbs (TRL's KTOTrainer). Pairs become thumbs on
request (--unpair). Skewed classes are balanced by the loss weights, as the KTO paper advises
(desirable_weight * n_up / (undesirable_weight * n_down) in [1, 4/3]), and the run says so."""

from __future__ import annotations

from ..data import to_unpaired
from ..specs import KTOSpec
from . import base
from .preference import PreferenceMethod


class KTO(PreferenceMethod):
    name = "kto"

    @property
    def config_class(self):
        from trl import KTOConfig

        return KTOConfig

    def rows(self, records, what, held_out=False):
        # Held-out pairs are welcome: the evaluation measures preference accuracy on them.
        return to_unpaired(records, what, unpair=self.spec.unpair or held_out)

    def build_datasets(self, spec: KTOSpec, tokenizer):
        train, evals, n = super().build_datasets(spec, tokenizer)
        self.n_up = sum(bool(x) for x in train["label"])
        self.n_down = n - self.n_up
        if not self.n_up or not self.n_down:
            from ..errors import NbalignError

            which = "thumbs-down" if not self.n_down else "thumbs-up"
            raise NbalignError(
                f"%%kto: the training data has no {which} rows, so there is nothing to contrast.",
                "label some answers the other way (or use %%sft on the thumbs-up rows alone).",
            )
        return train, evals, n

    def weights(self, spec: KTOSpec) -> tuple[float, float, str | None]:
        up, down = spec.desirable_weight, spec.undesirable_weight
        if up is not None or down is not None:
            return up or 1.0, down or 1.0, None
        ratio = self.n_up / self.n_down
        if 1.0 <= ratio <= 4 / 3:
            return 1.0, 1.0, None
        if ratio > 4 / 3:  # more thumbs up: weigh each thumbs-down more
            up, down = 1.0, round(ratio, 3)
        else:
            up, down = round(1 / ratio, 3), 1.0
        note = (
            f"nbalign kto: {self.n_up} thumbs up vs {self.n_down} down; balanced with desirable_weight {up:g}, "
            f"undesirable_weight {down:g} (set them to override)."
        )
        return up, down, note

    def config_defaults(self, spec: KTOSpec, device, adapter, steps: int) -> dict:
        up, down, note = self.weights(spec)
        if note:
            print(note, flush=True)
        return {
            **super().config_defaults(spec, device, adapter, steps),
            # Measured on the built-in model (bf16 autocast, 85 thumbs, 3 epochs): 2e-4 left 6 of 16 held-out answers
            # in the old style, 5e-4 raised general-text perplexity 1.22x; 3e-4 gave 16/16 at 1.14x.
            "learning_rate": spec.learning_rate or (5e-6 if adapter.type == "full" else 3e-4),
            "max_length": spec.max_length,
            "beta": spec.beta,
            "desirable_weight": up,
            "undesirable_weight": down,
            "precompute_ref_log_probs": self.precompute(spec, adapter, steps),
        }

    def trainer_class(self):
        from trl import KTOTrainer

        return KTOTrainer


def kto(spec: KTOSpec):
    return base.run(KTO(spec), spec)
