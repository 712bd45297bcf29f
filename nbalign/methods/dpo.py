"""%%dpo: preference optimisation from pairs. DPO and its loss family through TRL's DPOTrainer; SimPO
through TRL's CPOTrainer and ORPO through its ORPOTrainer (both reference-free).

Defaults make generations move, not only the implicit reward: an SFT term on the chosen answers
(`sft_weight`, as in RPO) is added to the preference loss, because off-policy pairs otherwise let DPO win
every pair by pushing the rejected answers down while its answers do not change (../shared/notes).
With an adapter the reference is the adapter switched off: no second copy of the model is loaded.
"""

from __future__ import annotations

from ..preference_data import to_pairs
from ..preference_specs import DPOSpec
from . import base
from .preference import PreferenceMethod

# The reference-free losses have their own TRL trainers.
TRL_CLASSES = {"simpo": ("trl.experimental.cpo", "CPO"), "orpo": ("trl.experimental.orpo", "ORPO")}


def _trl(spec: DPOSpec, kind: str):
    """TRL's Config or Trainer class for the chosen loss: DPO's, or CPO's (SimPO) / ORPO's."""
    import importlib
    import warnings

    module, prefix = TRL_CLASSES.get(spec.reference_free, ("trl", "DPO"))
    with warnings.catch_warnings():  # TRL marks CPO/ORPO experimental; nbalign pins the TRL it tests with
        warnings.filterwarnings("ignore", message=".*trl.experimental.*")
        return getattr(importlib.import_module(module), prefix + kind)


class DPO(PreferenceMethod):
    name = "dpo"

    def config_class(self, spec: DPOSpec):
        return _trl(spec, "Config")

    def trainer_class(self, spec: DPOSpec):
        return _trl(spec, "Trainer")

    def rows(self, spec, records, what, held_out=False):
        return to_pairs(records, what)

    def beta(self, spec: DPOSpec) -> float:
        return spec.beta or spec.default_beta()

    def config_defaults(self, spec: DPOSpec, device, steps: int, prepared) -> dict:
        values = {**super().config_defaults(spec, device, steps, prepared), "beta": self.beta(spec)}
        free = spec.reference_free
        if free == "simpo":
            values.update(loss_type="simpo", cpo_alpha=spec.sft_weight)
        elif free == "orpo":
            pass  # ORPO's loss already holds the SFT term (weight 1); beta weighs the odds-ratio term
        else:
            losses = dict(spec.loss)
            if spec.sft_weight > 0:
                losses["sft"] = losses.get("sft", 0.0) + spec.sft_weight
            if "exo_pair" in losses and "label_smoothing" not in spec.trl:
                values["label_smoothing"] = 1e-3  # EXO needs a positive value; its paper recommends 1e-3
            values.update(
                loss_type=list(losses),
                loss_weights=list(losses.values()),
                precompute_ref_log_probs=self.precompute(spec, steps, prepared.n_examples),
            )
        return values


def dpo(spec: DPOSpec):
    return base.run(DPO(), spec)
