"""%%dpo: preference optimisation from pairs. DPO and its loss family through TRL's DPOTrainer; SimPO
through TRL's CPOTrainer and ORPO through its ORPOTrainer (both reference-free).

Defaults make generations move, not only the implicit reward: an SFT term on the chosen answers
(`sft_weight`, as in RPO) is added to the preference loss, because off-policy pairs otherwise let DPO win
every pair by pushing the rejected answers down while its answers do not change (../shared/notes).
With an adapter the reference is the adapter switched off: no second copy of the model is loaded.
"""

from __future__ import annotations

from ..data import to_pairs
from ..specs import DPOSpec
from . import base
from .preference import PreferenceMethod

# The reference-free losses have their own TRL trainers.
TRL_CLASSES = {"simpo": ("trl.experimental.cpo", "CPO"), "orpo": ("trl.experimental.orpo", "ORPO")}


class DPO(PreferenceMethod):
    name = "dpo"

    def _trl(self, kind: str):
        """TRL's Config or Trainer class for the chosen loss: DPO's, or CPO's (SimPO) / ORPO's."""
        import importlib
        import warnings

        module, prefix = TRL_CLASSES.get(self.spec.reference_free, ("trl", "DPO"))
        with warnings.catch_warnings():  # TRL marks CPO/ORPO experimental; nbalign pins the TRL it tests with
            warnings.filterwarnings("ignore", message=".*trl.experimental.*")
            return getattr(importlib.import_module(module), prefix + kind)

    @property
    def config_class(self):
        return self._trl("Config")

    def trainer_class(self):
        return self._trl("Trainer")

    def rows(self, records, what, held_out=False):
        return to_pairs(records, what)

    def beta(self, spec: DPOSpec) -> float:
        return spec.beta or (2.0 if spec.reference_free == "simpo" else 0.1)

    def config_defaults(self, spec: DPOSpec, device, adapter, steps: int) -> dict:
        values = {
            **super().config_defaults(spec, device, adapter, steps),
            "learning_rate": spec.learning_rate or (5e-6 if adapter.type == "full" else 2e-4),
            "max_length": spec.max_length,
            "beta": self.beta(spec),
        }
        free = spec.reference_free
        if free == "simpo":
            values.update(loss_type="simpo", cpo_alpha=spec.sft_weight)
        elif free == "orpo":
            pass  # ORPO's loss already holds the SFT term; beta weighs the odds-ratio term
        else:
            losses = dict(spec.loss)
            if spec.sft_weight > 0:
                losses["sft"] = losses.get("sft", 0.0) + spec.sft_weight
            if "exo_pair" in losses and "label_smoothing" not in spec.trl:
                values["label_smoothing"] = 1e-3  # EXO needs a positive value; its paper recommends 1e-3
            values.update(
                loss_type=list(losses),
                loss_weights=list(losses.values()),
                precompute_ref_log_probs=self.precompute(spec, adapter, steps),
            )
        return values


def dpo(spec: DPOSpec):
    return base.run(DPO(spec), spec)
