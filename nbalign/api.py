"""The public, IPython-free API. Every magic is one call of a function here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pathlib import Path

from . import runfolder
from ._session import session
from .errors import NbalignError
from .preference_specs import DPOSpec, KTOSpec, RewardSpec, RLHFSpec
from .runs import Run
from .runs import list_runs as _list_runs
from .adapters import AdapterSpec, resolve_adapter
from .specs import BUILTIN_MODEL, DATA_FIELDS, SFTSpec, TrainSpec

# method name -> (spec class, module under methods/, function there)
METHODS = {
    "sft": (SFTSpec, "sft", "sft"),
    "dpo": (DPOSpec, "dpo", "dpo"),
    "kto": (KTOSpec, "kto", "kto"),
    "reward_model": (RewardSpec, "reward", "reward_model"),
    "rlhf": (RLHFSpec, "rlhf", "rlhf"),
}


@dataclass
class AdapterReport:
    """What a %%lora setting costs on a model: trainable parameters and the memory of the base weights."""

    adapter: AdapterSpec
    model: str
    trainable: int
    total: int
    base_bytes: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        dtype = "NF4 4-bit" if self.adapter.quantize else "fp32 on CPU/MPS, bf16 on CUDA halves it"
        return (
            f"nbalign: {self.adapter.describe()} for every later training cell (on {self.model}):\n"
            f"  trainable parameters {self.trainable:,} of {self.total:,} ({100 * self.share:.2f}%)\n"
            f"  base weights about {self.base_bytes / 2**20:,.0f} MiB ({dtype})"
        )

    __repr__ = __str__


def lora(
    r: int | None = None,
    alpha: int | None = None,
    dropout: float | None = None,
    target_modules: Any = None,
    quantize: str | None = None,
    type: str | None = None,
    virtual_tokens: int | None = None,
    model: str = BUILTIN_MODEL,
) -> AdapterReport:
    """Set how later training cells update the weights (what `%%lora` does), and report what it costs on
    `model`: trainable parameters, their share, and the memory the base weights take. The report is
    computed on the meta device (no weights are read), so it is instant. Unset arguments take AdapterSpec's
    defaults (`%%lora --help` lists them)."""
    given = {"type": type, "r": r, "alpha": alpha, "dropout": dropout, "target_modules": target_modules,
             "quantize": quantize, "virtual_tokens": virtual_tokens}
    spec = AdapterSpec.from_dict({k: v for k, v in given.items() if v is not None})
    report = adapter_report(spec, model)
    session.adapter = spec
    return report


def adapter_report(spec: AdapterSpec, model: str = BUILTIN_MODEL) -> AdapterReport:
    from .devices import quiet

    with quiet():
        return _adapter_report(spec, model)


def _adapter_report(spec: AdapterSpec, model: str) -> AdapterReport:
    from .models import apply_adapter, check_targets, resolve, skeleton

    ref = resolve(model)
    skel = skeleton(ref)
    check_targets(skel, spec, model)
    base_bytes = _base_bytes(skel, spec)
    total = sum(p.numel() for p in skel.parameters())
    wrapped = apply_adapter(skel, spec, seed=0) if spec.type != "full" else skel
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    if spec.type != "full":
        total = sum(p.numel() for p in wrapped.parameters())
    return AdapterReport(spec, model, trainable, total, base_bytes)


def _base_bytes(skel, spec: AdapterSpec) -> int:
    """Bytes of the frozen base: fp32 here (bf16 on CUDA), or NF4 linear layers with double-quantised
    absmax (0.5 byte per weight + 1/64 byte per block scale + fp32 second-level scales) for QLoRA."""
    import torch

    quantized = 0
    if spec.quantize:
        for name, module in skel.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                quantized += module.weight.numel()
    total = sum(p.numel() for p in skel.parameters())
    return int((total - quantized) * 4 + quantized * (0.5 + 1 / 64 + 4 / (64 * 256)))


API_PARAMETERS = ("data", "model", "out", "reward", "lora")


def build_spec(method: str, values: dict) -> TrainSpec:
    """The whole run as a spec: the values given (None: not given), with the session's %%lora setting
    (changed by a `lora:` override) written into it. Below this layer nothing reads the session.

    --resume continues the run as spec.json recorded it: the stored spec is the base, and a value the cell
    gives must agree with it (the data is checked against the saved copy when the run is planned)."""
    spec_class = METHODS[method][0]
    # The API's own parameters default to None for "not given"; other options keep an explicit None
    # (e.g. `center_rewards=None` turns centring off).
    values = {k: v for k, v in values.items() if v is not None or k not in API_PARAMETERS}
    stored = runfolder.read_spec(values["out"]).get("spec") if values.get("resume") and values.get("out") else None
    if stored:
        return from_labels(_resumed(spec_class, stored, values))
    values["lora"] = resolve_adapter(values.get("lora"), session.adapter)
    return from_labels(spec_class.from_dict(values, passthrough=True))


def from_labels(spec: TrainSpec) -> TrainSpec:
    """Data given as a labeller or a label store becomes the rows its labels make now (pairs; thumbs for
    %%kto), as the spec's options say to use ties and 'both bad'. A store keeps growing, so the run keeps
    these rows (saved with it, with the store's path and counts): it replays as it was trained."""
    from .labeling.store import label_source

    changes = {}
    for name in DATA_FIELDS:
        store = label_source(getattr(spec, name, None))
        if store is None or (name == "data" and getattr(spec, "live", False)):
            continue
        rows = label_rows(spec, store, name)
        if not rows:
            raise NbalignError(
                f"{spec.where}: the label store '{store.path}' gives no training rows yet: {rows.summary}.",
                "label some items first (or, for ties, set ties: both_ways; for AI labels, labels_from: any).",
            )
        print(f"nbalign {spec.method}: {rows.summary}", flush=True)
        changes[name] = rows
    return spec.replace(**changes) if changes else spec


def label_rows(spec: TrainSpec, store, name: str = "data"):
    """The store's labels as this method trains on them: thumbs for %%kto's data, pairs otherwise."""
    if spec.method == "kto" and name == "data":
        return store.unpaired(both_bad=spec.both_bad, labels_from=spec.labels_from)
    if spec.method in ("dpo", "kto", "reward_model"):
        return store.pairs(ties=getattr(spec, "ties", "drop"), labels_from=getattr(spec, "labels_from", "human"))
    raise NbalignError(
        f"{spec.where} cannot train on a label store ('{store.path}'): labels are pairs and thumbs.",
        "pass it to %%dpo, %%kto or %%reward_model; for %%sft export the chosen answers first.",
    )


def live(spec: TrainSpec):
    """--live: rounds of training in the background as labels arrive (labeling/live.py)."""
    from .labeling.live import LiveTraining, pick_mode
    from .labeling.store import LabelStore, label_source

    store = label_source(spec.data)
    if store is None:
        raise NbalignError(
            f"{spec.where} --live trains on labels as they arrive, so --data must be a labeller or a label store "
            f"(it is a {type(spec.data).__name__}).",
            "pass the labeller (labels = nbalign.label_pairs(...)) or its store's path, or drop --live.",
        )
    labeler = None if isinstance(spec.data, (str, Path, LabelStore)) else spec.data
    mode = pick_mode(spec.live_mode)
    return LiveTraining(spec, store, lambda: label_rows(spec, store), run_spec, labeler=labeler, mode=mode).start()


def _resumed(spec_class, stored: dict, given: dict) -> TrainSpec:
    from .methods.rewards import describe_rewards, import_rewards

    base = {k: v for k, v in stored.items() if k not in DATA_FIELDS}
    reward_changed = False
    if "reward" in base:  # recorded by name: compare names, and load it again when the cell gives none
        if "reward" in given:
            reward_changed = base["reward"] != describe_rewards(given["reward"])
            base["reward"] = given["reward"]
        else:
            base["reward"] = import_rewards(base["reward"])
    if "lora" in given:  # an override applies over the run's own adapter, as it did over the session's
        given = {**given, "lora": resolve_adapter(given["lora"], AdapterSpec.from_dict(stored["lora"]))}
    before = spec_class.from_dict({**base, "resume": True}, passthrough=True).to_dict()
    after = spec_class.from_dict({**base, **{k: v for k, v in given.items() if k != "reward"}, "resume": True},
                                 passthrough=True)
    changed = sorted(k for k, v in after.to_dict().items()
                     if k not in (*DATA_FIELDS, "resume", "overwrite", "out", "reward") and v != before[k])
    changed += ["reward"] if reward_changed else []
    if changed:
        shown = ", ".join(k if k == "reward" else f"{k} ({before[k]!r} -> {after.to_dict()[k]!r})" for k in changed)
        raise NbalignError(
            f"--resume: {shown} differ{'s' if len(changed) == 1 else ''} from the run in '{given['out']}', which "
            "continues with the settings it started with.",
            "drop them from the cell to resume as it was, or start again with --overwrite.",
        )
    return after


def run_spec(spec: TrainSpec):
    """Train a spec with its method (the methods layer); returns the Run (a RewardModel for reward models)."""
    import importlib

    if getattr(spec, "live", False):
        return live(spec)
    _, module, function = METHODS[spec.method]
    return getattr(importlib.import_module(f".methods.{module}", __package__), function)(spec)


def sft(data: Any = None, model: str | None = None, out: str | None = None, **options) -> Run:
    """Supervised fine-tuning (what `%%sft` does). `options` are SFTSpec fields or any TRL SFTConfig field."""
    return run_spec(build_spec("sft", {"data": data, "model": model, "out": out, **options}))


def dpo(data: Any = None, model: str | None = None, out: str | None = None, **options) -> Run:
    """Preference optimisation from pairs (what `%%dpo` does): DPO and its loss family, or SimPO / ORPO.
    `options` are DPOSpec fields or any TRL DPOConfig (CPOConfig, ORPOConfig) field."""
    return run_spec(build_spec("dpo", {"data": data, "model": model, "out": out, **options}))


def kto(data: Any = None, model: str | None = None, out: str | None = None, **options) -> Run:
    """KTO from unpaired thumbs (what `%%kto` does). `options` are KTOSpec fields or any TRL KTOConfig field."""
    return run_spec(build_spec("kto", {"data": data, "model": model, "out": out, **options}))


def reward_model(data: Any = None, model: str | None = None, out: str | None = None, **options):
    """A Bradley-Terry reward model on pairs (what `%%reward_model` does). Returns a RewardModel run whose
    `score(prompt, response)` rates new answers."""
    return run_spec(build_spec("reward_model", {"data": data, "model": model, "out": out, **options}))


def rlhf(data: Any = None, reward: Any = None, model: str | None = None, out: str | None = None, **options) -> Run:
    """Online RL against a reward model run or Python reward functions (what `%%rlhf` does).
    `options` are RLHFSpec fields or any TRL GRPOConfig / RLOOConfig field."""
    return run_spec(build_spec("rlhf", {"data": data, "reward": reward, "model": model, "out": out, **options}))


def merge(runs: Any = None, method: str | None = None, out: str | None = None, **options) -> Run:
    """Merge finished runs into a new run folder without training (what `%%merge` does): adapters of one base
    through peft (cat by default: the exact weighted sum of their updates), whole models through mergekit.
    `options` are MergeSpec fields: weights, density, t, rank, majority_sign_method, overwrite."""
    from .methods.merge import MergeSpec, merge as merge_runs

    return merge_runs(MergeSpec.from_dict({"runs": runs, "method": method, "out": out, **options}))


def replay(path: str | Path, out: str | None = None, **changes):
    """The same run again from its spec.json alone (what `python -m nbalign run SPEC --out DIR` does): the
    same model, adapter, data (in-memory data was saved with the run), options and seed. `changes` override
    spec fields, e.g. a reward function defined in a notebook, which spec.json can only name."""
    from .data import load_records
    from .methods.rewards import import_rewards

    path = Path(path)
    folder = path.parent if path.name == runfolder.SPEC else path
    stored = runfolder.read_spec(folder)
    if not stored.get("spec") or stored.get("method") not in METHODS:
        raise NbalignError(
            f"'{path}' holds no nbalign spec.json to replay.",
            "pass a run folder (its --out) or the spec.json inside it.",
        )
    values = dict(stored["spec"])
    values["lora"] = values.get("lora") or stored.get("adapter")  # spec.json before the adapter moved into the spec
    if "lora" in changes:
        changes = {**changes, "lora": resolve_adapter(changes["lora"], AdapterSpec.from_dict(values["lora"] or {}))}
    for name in DATA_FIELDS:
        saved = runfolder.stored_data(folder, values.get(name))
        # Saved rows are read now and given as data, so the new run keeps its own copy (and survives --overwrite
        # of the folder they came from).
        values[name] = load_records(saved, name.replace("_", " ")) if saved != values.get(name) else saved
        if isinstance(values[name], dict):
            raise NbalignError(
                f"replay: the run in '{folder}' was trained on in-memory {name.replace('_', ' ')} that was not saved "
                "with it (a run from an older nbalign).",
                f"pass it again: nbalign.replay('{folder}', out=..., {name}=...).",
            )
    if "reward" in values and "reward" not in changes:
        values["reward"] = import_rewards(values["reward"])
    values.update({"resume": False, "overwrite": False, "out": out, **changes})
    spec_class = METHODS[stored["method"]][0]
    return run_spec(spec_class.from_dict(values, passthrough=True))


def label_pairs(prompts: Any, model: Any = BUILTIN_MODEL, store: Any = None, **options):
    """The pair labeller (what a person clicks A / B / tie / both bad / skip / undo in): two answers per prompt
    from `model` (sampled twice) or from two sources (model names, run folders or functions), written ahead in
    the background into the label store `store` (default labels/labels.sqlite). Give the labeller, or its
    store's path, to --data of %%dpo, %%kto or %%reward_model."""
    from .labeling.widgets import PairLabeler

    return PairLabeler(prompts, model=model, store=store, **options)


def label_thumbs(prompts: Any, model: Any = BUILTIN_MODEL, store: Any = None, **options):
    """The thumbs labeller (up / down / skip / undo on one answer per prompt), for %%kto."""
    from .labeling.widgets import ThumbsLabeler

    return ThumbsLabeler(prompts, model=model, store=store, **options)


def evaluate(model: str, data: Any, reference: str | None = None, **options):
    """Held-out preference accuracy and margins, KL to the reference, answer length and general-text
    perplexity of `model` against `reference` (default: the model a run started from)."""
    from .evaluation import evaluate as _evaluate
    from .labeling.store import label_source

    store = label_source(data)
    if store is not None:  # a labeller or label store: its pairs as they stand now
        data = store.pairs()
    return _evaluate(model, data, reference=reference, **options)


def list_runs(root: str = "runs"):
    """Past runs under `root`, newest first (what `%nbalign runs` shows)."""
    return _list_runs(root)


def generate(model: str, prompt: Any, max_new_tokens: int = 128, **kwargs):
    """Text from any model or run folder (the base model, for before/after comparisons)."""
    from .generation import generate as _generate

    return _generate(model, prompt, max_new_tokens=max_new_tokens, **kwargs)
