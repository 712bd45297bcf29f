"""Specs of the methods that learn from comparisons or rewards: %%dpo (and its family), %%kto,
%%reward_model and %%rlhf. Each field is documented once; defaults per method live on the class."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Any

from .errors import NbalignError, nearest
from .spec_fields import choice, coerce, opt
from .specs import PADDING_FREE_HELP, TrainSpec, WatchSpec, checked_padding_free


PRECOMPUTE = ("auto", True, False)
# How labels from a label store become training rows (labeling/store.py applies them).
LABELS_FROM = ("human", "judge", "any")
TIES = ("drop", "both_ways")
BOTH_BAD = ("drop", "down")
TIES_HELP = ("label-store data: drop ties, or both_ways (each tie as the pair in both orders, a half win each way, "
             "which pulls the margin to zero)")


@dataclass
class PreferenceSpec(WatchSpec):
    """Options shared by the methods that learn from comparisons: the evaluation they show, the reference."""

    trl_aliases: typing.ClassVar[dict] = {**TrainSpec.trl_aliases, "precompute_ref_log_probs": "precompute_ref"}

    precompute_ref: Any = opt("auto", "compute reference log-probs once before training: auto (when cheaper), true, false")
    labels_from: str = opt("human", "label-store data: whose labels train: human, judge (AI labels) or any "
                           "(a human's where given, else the judge's)")
    live: bool = opt(False, "with --data a labeller or label store: train in rounds in the background as labels arrive")
    live_every: int = opt(8, "--live: new labels that start a round of training")
    live_mode: str = opt("auto", "--live: background (a thread; the widget stays usable), rounds (between labels, "
                         "for front ends that cannot update widgets from a thread), or auto")

    def __post_init__(self):
        super().__post_init__()
        choice("labels_from", self.labels_from, LABELS_FROM, self.where)
        choice("live_mode", self.live_mode, ("auto", "background", "rounds"), self.where)
        if self.live_every < 1:
            raise NbalignError(f"{self.where}: 'live_every' must be 1 or more.", "use e.g. live_every: 8.")
        if isinstance(self.precompute_ref, str) and self.precompute_ref.lower() != "auto":
            self.precompute_ref = coerce("precompute_ref", self.precompute_ref, bool, self.where)
        choice("precompute_ref", self.precompute_ref, PRECOMPUTE, self.where)


DPO_LOSSES = (
    "sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft",
)
REFERENCE_FREE = ("simpo", "orpo")
# beta when none is given: DPO's usual 0.1; SimPO's reward is a length-normalised log-prob, on another scale.
DEFAULT_BETA = 0.1
BETAS = {"simpo": 2.0}


@dataclass
class DPOSpec(PreferenceSpec):
    """Direct preference optimisation and its family, from (prompt, chosen, rejected) pairs."""

    method: typing.ClassVar[str] = "dpo"
    where: typing.ClassVar[str] = "%%dpo"
    learning_rates: typing.ClassVar[tuple[float, float]] = (2e-4, 5e-6)
    trl_refused: typing.ClassVar[dict] = {"loss_type": "loss", "loss_weights": "loss", "cpo_alpha": "sft_weight"}

    loss: Any = opt(
        "sigmoid",
        "sigmoid (DPO), ipo, hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, "
        "apo_down, discopop, sigmoid_norm; a weighted mixture like {sigmoid: 0.8, bco_pair: 0.2}; or the "
        "reference-free simpo and orpo",
    )
    beta: float | None = opt(None, "how far from the reference the policy may move; default {beta}")
    sft_weight: float = opt(
        1.0,
        "weight of an SFT term on the chosen answers (RPO; for simpo TRL's cpo_alpha): keeps their likelihood "
        "rising so generations move, not only the margin; 0 for the pure loss; orpo's own SFT term is fixed",
    )
    ties: str = opt("drop", TIES_HELP)

    def __post_init__(self):
        super().__post_init__()
        choice("ties", self.ties, TIES, self.where)
        self.loss = self.loss_weights()  # normalised: {name: weight}
        if not self.sft_weight >= 0:
            raise NbalignError("%%dpo: 'sft_weight' must be 0 or more.", "use 1.0 (default) or 0 for the pure loss.")
        if self.reference_free == "orpo" and self.sft_weight != 1.0:
            raise NbalignError(
                f"%%dpo: loss orpo has its own SFT term with a fixed weight of 1, so sft_weight {self.sft_weight:g} "
                "cannot apply.",
                "drop sft_weight (beta weighs orpo's odds-ratio term), or use `loss: simpo` or DPO with sft_weight.",
            )
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta > 0):
            raise NbalignError("%%dpo: 'beta' must be positive.", "use e.g. beta: 0.1.")

    def loss_weights(self) -> dict:
        loss = self.loss
        if isinstance(loss, str):
            parts = [p.strip() for p in loss.replace("+", ",").split(",") if p.strip()]
            loss = {p: 1.0 for p in parts}
        elif isinstance(loss, (list, tuple)):
            loss = {str(p): 1.0 for p in loss}
        if not isinstance(loss, dict) or not loss:
            raise NbalignError(
                f"%%dpo: 'loss' must be a loss name, a list, or a mapping of name to weight, got {self.loss!r}.",
                "write e.g. `loss: ipo` or `loss: {sigmoid: 0.8, bco_pair: 0.2}`.",
            )
        names = {str(k).lower(): coerce(f"loss weight of {k}", v, float, self.where) for k, v in loss.items()}
        valid = DPO_LOSSES + REFERENCE_FREE
        for name in names:
            if name not in valid:
                guess = nearest(name, valid)
                raise NbalignError(
                    f"%%dpo: '{name}' is not a loss nbalign knows.",
                    f"did you mean '{guess}'?" if guess else f"pick from {', '.join(valid)}.",
                )
        bad = {n: w for n, w in names.items() if not math.isfinite(w) or w < 0}
        if bad or not any(names.values()):
            problem = (f"the loss weights {bad} are negative or not numbers" if bad
                       else "every loss weight is 0, so nothing would be learnt")
            raise NbalignError(
                f"%%dpo: {problem}; a negative weight trains away from the chosen answers.",
                "give positive weights, e.g. `loss: {sigmoid: 0.8, bco_pair: 0.2}`.",
            )
        free = [n for n in names if n in REFERENCE_FREE]
        if free and len(names) > 1:
            own = ("its SFT term is set by sft_weight" if free[0] == "simpo"
                   else "its loss holds its own SFT term; beta weighs the odds-ratio term")
            raise NbalignError(
                f"%%dpo: {free[0]} is its own trainer and cannot be mixed with other losses.",
                f"use `loss: {free[0]}` alone ({own}).",
            )
        return names

    @classmethod
    def help_values(cls) -> dict:
        others = ", ".join(f"{loss}: {beta:g}" for loss, beta in BETAS.items())
        return {**super().help_values(), "beta": f"{DEFAULT_BETA:g} ({others})"}

    def default_beta(self) -> float:
        return BETAS.get(self.reference_free, DEFAULT_BETA)

    @property
    def reference_free(self) -> str | None:
        name = next(iter(self.loss))
        return name if name in REFERENCE_FREE else None


@dataclass
class KTOSpec(PreferenceSpec):
    """Kahneman-Tversky optimisation from unpaired thumbs: (prompt, completion, label)."""

    method: typing.ClassVar[str] = "kto"
    where: typing.ClassVar[str] = "%%kto"
    # Measured on the built-in model (bf16 autocast, 85 thumbs, 3 epochs): 2e-4 left 6 of 16 held-out answers in
    # the old style, 5e-4 raised general-text perplexity 1.22x; 3e-4 gave 16/16 at 1.14x.
    learning_rates: typing.ClassVar[tuple[float, float]] = (3e-4, 5e-6)

    beta: float = opt(0.1, "how far from the reference the policy may move")
    unpair: bool = opt(False, "accept preference pairs: each becomes a thumbs-up (chosen) and a thumbs-down row")
    both_bad: str = opt("down", "label-store data: a pair labelled 'both bad' as two thumbs down, or drop")
    desirable_weight: float | None = opt(None, "loss weight of thumbs-up rows; default balances skewed classes")
    undesirable_weight: float | None = opt(None, "loss weight of thumbs-down rows; default balances skewed classes")

    def __post_init__(self):
        super().__post_init__()
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise NbalignError("%%kto: 'beta' must be positive.", "use e.g. beta: 0.1.")
        choice("both_bad", self.both_bad, BOTH_BAD, self.where)
        for name in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise NbalignError(f"%%kto: '{name}' must be positive.", "leave it unset to balance automatically.")


@dataclass
class RewardSpec(TrainSpec):
    """A Bradley-Terry reward model: a scalar head on the base, trained on (prompt, chosen, rejected) pairs."""

    method: typing.ClassVar[str] = "reward_model"
    where: typing.ClassVar[str] = "%%reward_model"
    # LoRA on the built-in model and style_pairs (measured): 2e-4 triples the held-out margin in one epoch.
    learning_rates: typing.ClassVar[tuple[float, float]] = (2e-4, 1e-5)
    trl_aliases: typing.ClassVar[dict] = {**TrainSpec.trl_aliases, "center_rewards_coefficient": "center_rewards"}

    center_rewards: float | None = opt(0.01, "pull scores towards zero mean (coefficient; null to turn off)")
    ties: str = opt("drop", TIES_HELP)
    labels_from: str = opt("human", "label-store data: whose labels train: human, judge (AI labels) or any")
    padding_free: Any = opt("auto", PADDING_FREE_HELP)

    def __post_init__(self):
        super().__post_init__()
        self.padding_free = checked_padding_free(self.padding_free, self.where)
        choice("ties", self.ties, TIES, self.where)
        choice("labels_from", self.labels_from, LABELS_FROM, self.where)


RL_ALGORITHMS = ("grpo", "rloo")


@dataclass
class RLHFSpec(TrainSpec):
    """Online RL: the model answers prompts, a reward model or Python functions score the answers, and the
    policy moves towards high reward with a KL penalty to the reference."""

    method: typing.ClassVar[str] = "rlhf"
    where: typing.ClassVar[str] = "%%rlhf"
    # LoRA on the built-in model (measured): 1e-4 barely moves it in 12 steps (KL 0.01), 3e-4 halves the answer
    # length for a brevity reward in 10 steps (KL < 0.3), 5e-4 starts to garble answers.
    learning_rates: typing.ClassVar[tuple[float, float]] = (1e-4, 1e-6)

    reward: Any = opt(None, "a %%reward_model run folder, or Python reward function(s) by notebook name")
    algorithm: str = opt("grpo", "grpo (group-relative advantages) or rloo (leave-one-out baseline)")
    beta: float = opt(0.05, "KL penalty to the reference: higher keeps the policy closer")
    num_generations: int = opt(4, "answers sampled per prompt; the advantage compares them")
    max_completion_length: int = opt(64, "tokens per sampled answer")
    temperature: float = opt(1.0, "sampling temperature of the answers")
    epochs: float = opt(1.0, "passes over the prompts")
    batch_size: int = opt(8, "answers per step (per device); a multiple of num_generations")

    def __post_init__(self):
        super().__post_init__()
        self.algorithm = str(self.algorithm).lower()
        choice("algorithm", self.algorithm, RL_ALGORITHMS, self.where)
        if self.reward is None:
            raise NbalignError(
                "%%rlhf: no reward was given.",
                "pass --reward runs/rm1 (a %%reward_model run) or --reward my_fn (a Python function in the notebook).",
            )
        if self.num_generations < 2:
            raise NbalignError("%%rlhf: 'num_generations' must be at least 2 to compare answers.", "use e.g. 4.")
        if self.batch_size % self.num_generations:
            raise NbalignError(
                f"%%rlhf: batch_size {self.batch_size} is not a multiple of num_generations {self.num_generations}.",
                f"use batch_size {self.num_generations * max(1, self.batch_size // self.num_generations)}.",
            )
        if not self.beta >= 0:
            raise NbalignError("%%rlhf: 'beta' must be 0 or more.", "use e.g. beta: 0.05.")
        if not self.temperature > 0:
            raise NbalignError(
                f"%%rlhf: 'temperature' must be above 0, got {self.temperature:g}: the answers are sampled, and "
                "sampling at temperature 0 is undefined (GRPO needs different answers to compare).",
                "use e.g. temperature: 0.7 (lower: answers closer to greedy; 1.0: the model's own distribution).",
            )
        if self.max_completion_length < 1:
            raise NbalignError("%%rlhf: 'max_completion_length' must be positive.", "use e.g. 64.")
        if self.replay:
            raise NbalignError(
                "%%rlhf: replay mixes general rows with answers into the training data, but online RL learns from "
                "answers it samples and scores with the reward, which knows nothing of general questions.",
                "keep the policy near the reference with a larger beta (the KL penalty, e.g. beta: 0.1), or replay "
                "in the %%sft run this one starts from.",
            )
