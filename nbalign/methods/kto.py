"""%%kto: Kahneman-Tversky optimisation from unpaired thumbs (TRL's KTOTrainer). Pairs become thumbs on
request (--unpair). Skewed classes are balanced by the loss weights, as the KTO paper advises
(desirable_weight * n_up / (undesirable_weight * n_down) in [1, 4/3]), and the run says so."""

from __future__ import annotations

from ..errors import NbalignError
from ..preference_data import to_unpaired
from ..preference_specs import KTOSpec
from . import base
from .preference import PreferenceMethod


def balance(n_up: int, n_down: int, spec: KTOSpec) -> tuple[float, float, str | None]:
    """(desirable_weight, undesirable_weight, a line saying what was chosen, or None)."""
    up, down = spec.desirable_weight, spec.undesirable_weight
    if up is not None or down is not None:
        return up or 1.0, down or 1.0, None
    ratio = n_up / n_down
    if 1.0 <= ratio <= 4 / 3:
        return 1.0, 1.0, None
    if ratio > 4 / 3:  # more thumbs up: weigh each thumbs-down more
        up, down = 1.0, round(ratio, 3)
    else:
        up, down = round(1 / ratio, 3), 1.0
    note = (
        f"nbalign kto: {n_up} thumbs up vs {n_down} down; balanced with desirable_weight {up:g}, "
        f"undesirable_weight {down:g} (set them to override)."
    )
    return up, down, note


class KTO(PreferenceMethod):
    name = "kto"
    min_micro_batch = 2  # KTO's KL estimate pairs each prompt with another row's answer in the same step
    replay_kind = "thumbs"

    def config_class(self, spec):
        from trl import KTOConfig

        return KTOConfig

    def trainer_class(self, spec):
        from trl import KTOTrainer

        return KTOTrainer

    def rows(self, spec, records, what, held_out=False):
        # Held-out pairs are welcome: the evaluation measures preference accuracy on them.
        return to_unpaired(records, what, unpair=spec.unpair or held_out)

    def prepare(self, spec: KTOSpec, tokenizer) -> base.Prepared:
        prepared = super().prepare(spec, tokenizer)
        n_up = sum(bool(r["label"]) for r in prepared.state["rows"])
        n_down = prepared.n_examples - n_up
        if not n_up or not n_down:
            which = "thumbs-down" if not n_down else "thumbs-up"
            raise NbalignError(
                f"%%kto: the training data has no {which} rows, so there is nothing to contrast.",
                "label some answers the other way (or use %%sft on the thumbs-up rows alone).",
            )
        prepared.state.update(n_up=n_up, n_down=n_down)
        return prepared

    def config_defaults(self, spec: KTOSpec, device, steps: int, prepared) -> dict:
        up, down, note = balance(prepared.state["n_up"], prepared.state["n_down"], spec)
        if note:
            print(note, flush=True)
        return {
            **super().config_defaults(spec, device, steps, prepared),
            "beta": spec.beta,
            "desirable_weight": up,
            "undesirable_weight": down,
            "precompute_ref_log_probs": self.precompute(spec, steps, prepared.n_examples),
        }


def kto(spec: KTOSpec):
    return base.run(KTO(), spec)
