"""%%merge: a run folder made without training, from the weights of finished runs.

LoRA adapters of one base (runs trained from the same model; DoRA is refused) are combined by peft's weighted-adapter
arithmetic into one adapter: `cat` (the default) stacks them, so the merged update is exactly the weighted sum of
the runs' updates (its rank is the sum of theirs); `svd` is that sum cut back to a rank by SVD; `ties`,
`dare_ties`, `dare_linear` and `magnitude_prune` prune (by magnitude or at random) and, for TIES, elect a sign per
weight; their `_svd` variants do so on each layer's whole update instead of on the LoRA factors; `linear` sums
the factors themselves, a rough approximation peft itself advises against. Anything else (full fine-tunes, model
folders, hub models, or `slerp`) is merged as whole models by mergekit, the optional extra `nbalign[merge]`:
linear, slerp, ties, dare_ties, dare_linear, task_arithmetic.

The result is a run like any other: spec.json, status.json, the adapter/ or model/ folder, a card; `--model`
continues from it and `Run.generate` answers with it.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import runfolder
from ..errors import NbalignError
from ..runs import Run
from ..spec_fields import Spec, choice, opt

ADAPTER_METHODS = ("cat", "linear", "svd", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                   "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
MODEL_METHODS = ("linear", "slerp", "ties", "dare_ties", "dare_linear", "task_arithmetic")
PRUNING = ("ties", "dare_ties", "dare_linear", "magnitude_prune")  # need a density (and their _svd variants)
WHERE = "%%merge"


@dataclass
class MergeSpec(Spec):
    """What `%%merge` sets: the runs (or models) to merge, how, and where the result goes."""

    where = WHERE

    runs: Any = opt(None, "the finished runs (or, for whole-model merges, model folders) to merge, in order")
    method: str | None = opt(None, "adapters: cat (default), linear, svd, ties, dare_ties, dare_linear, "
                                   "magnitude_prune (+ _svd variants); whole models: linear (default), slerp, ties, "
                                   "dare_ties, dare_linear, task_arithmetic (mergekit)")
    weights: Any = opt(None, "one weight per run (default: 1 each for adapters, equal shares for whole models)")
    density: float | None = opt(None, "share of each update kept by ties/dare/magnitude_prune (default 0.5)")
    t: float = opt(0.5, "slerp: how far from the first model towards the second (0 to 1)")
    rank: int | None = opt(None, "svd variants: the merged adapter's rank (default: the largest run's)")
    majority_sign_method: str = opt("total", "ties: elect each weight's sign by total magnitude or frequency")
    whole: bool = opt(False, "merge as whole models (mergekit) even where the runs are adapters of one base")
    intended_use: str | None = opt(None, "what the merged model is for (and not for), for its model card")
    out: str | None = opt(None, "the run folder to create (default runs/merge-<time>)")
    overwrite: bool = opt(False, "replace an existing folder at --out")
    sources: list = field(default_factory=list, metadata={"help": "filled in: the runs' folders", "line": False})

    def __post_init__(self):
        runs = self.runs
        if isinstance(runs, str):
            runs = [r.strip() for r in runs.split(",") if r.strip()]
        if not isinstance(runs, (list, tuple)) or len(runs) < 2:
            raise NbalignError(f"{WHERE}: 'runs' must list at least two runs to merge, got {self.runs!r}.",
                               "write e.g. `runs: [runs/json-sft, runs/terse-dpo]`.")
        self.runs = [str(r) for r in runs]
        if self.weights is not None:
            weights = self.weights
            if isinstance(weights, str):
                weights = [w for w in weights.replace(",", " ").split()]
            try:
                self.weights = [float(w) for w in weights]
            except (TypeError, ValueError):
                raise NbalignError(f"{WHERE}: 'weights' must be numbers, got {self.weights!r}.",
                                   "write e.g. `weights: [0.6, 0.4]`.") from None
            if len(self.weights) != len(self.runs):
                raise NbalignError(
                    f"{WHERE}: {len(self.weights)} weights for {len(self.runs)} runs.",
                    "give one weight per run, in the order of `runs`, or leave `weights` out.")
        if self.method is not None:
            self.method = str(self.method).lower().replace("-", "_")
            choice("method", self.method, tuple(dict.fromkeys(ADAPTER_METHODS + MODEL_METHODS)), WHERE)
        if self.density is not None and not 0 < self.density <= 1:
            raise NbalignError(f"{WHERE}: 'density' must be in (0, 1], got {self.density}.", "use e.g. 0.5.")
        if not 0 <= self.t <= 1:
            raise NbalignError(f"{WHERE}: 't' must be in [0, 1], got {self.t}.", "use e.g. t: 0.5.")
        choice("majority_sign_method", self.majority_sign_method, ("total", "frequency"), WHERE)
        if self.rank is not None and self.rank < 1:
            raise NbalignError(f"{WHERE}: 'rank' must be at least 1, got {self.rank}.", "use e.g. rank: 16.")


def _source(name: str):
    """(the run folder or None, its ModelRef) for one entry of `runs`."""
    from ..models import resolve

    path = Path(name).expanduser()
    ref = resolve(name)
    return (path.resolve() if runfolder.is_run_folder(path) else None), ref


def _adapter_run(folder: Path | None) -> bool:
    return folder is not None and (runfolder.weights_dir(folder) / "adapter_config.json").is_file()


def merge(spec: MergeSpec) -> Run:
    """Merge the spec's runs into a new run folder (what `%%merge` does)."""
    sources = [_source(name) for name in spec.runs]
    folders = [folder for folder, _ in sources]
    same_base = len({(ref.base, ref.parents[:-1]) for _, ref in sources}) == 1
    adapters = (all(_adapter_run(f) for f in folders) and same_base and not spec.whole
                and spec.method not in ("slerp", "task_arithmetic"))
    if spec.method is not None and adapters and spec.method not in ADAPTER_METHODS:
        adapters = False
    if spec.method is not None and not adapters and spec.method not in MODEL_METHODS:
        why = ("they are not all adapter runs" if not all(_adapter_run(f) for f in folders)
               else "they were not trained from the same model")
        raise NbalignError(
            f"{WHERE}: '{spec.method}' merges adapters of one base, and these runs cannot be merged as adapters: {why}.",
            f"merge them as whole models with one of {', '.join(MODEL_METHODS)}, or pick runs trained from one model.")
    method = spec.method or ("cat" if adapters else "linear")
    if method == "slerp" and len(spec.runs) != 2:
        raise NbalignError(f"{WHERE}: slerp merges exactly two models, got {len(spec.runs)}.",
                           "pick two runs, or use linear, ties or dare_ties for more.")
    out = Path(spec.out) if spec.out else runfolder.default_out("merge")
    runfolder.prepare_folder(out, resume=False, overwrite=spec.overwrite)
    spec = spec.replace(method=method, sources=[str(f or ref.name) for f, ref in sources])
    runfolder.start(out, overwrite=spec.overwrite)
    started = time.perf_counter()
    first = sources[0][1]
    try:
        _write_spec(out, spec, first, adapters)
        runfolder.set_status(out, "running")
        print(f"nbalign merge: {method} of {', '.join(spec.runs)} -> {out}", flush=True)
        from ..devices import quiet

        with quiet():  # no weight-loading bars or deprecation notices from the libraries under the merge
            summary = _merge_adapters(out, spec, sources) if adapters else _merge_models(out, spec, sources)
        summary["time_s"] = {"merging": round(time.perf_counter() - started, 1)}
        runfolder.write_card(out, _card(out, spec, first, adapters, summary))
    except KeyboardInterrupt:
        runfolder.set_status(out, "interrupted", "stopped by the user; run the cell again")
        raise
    except NbalignError as exc:
        runfolder.set_status(out, "failed", str(exc))
        raise
    except Exception as exc:
        import traceback

        runfolder.write_error_log(out, traceback.format_exc())
        runfolder.set_status(out, "failed", f"{type(exc).__name__}: {exc}")
        raise
    runfolder.set_status(out, "finished", summary=summary)
    return Run(out)


def _write_spec(out: Path, spec: MergeSpec, first, adapters: bool) -> None:
    import peft
    import torch
    import transformers

    from ..version import __version__

    # A merged adapter continues from its runs' base; a merged whole model replaces it (its model/ folder).
    model = runfolder.read_spec(first.parents[-1])["spec"]["model"] if adapters else spec.sources[0]
    runfolder.write_spec(out, {
        "method": "merge",
        "spec": {**spec.to_dict(), "model": model, "resume": False, "overwrite": False},
        "adapter_description": f"{spec.method} merge of {len(spec.runs)} " + ("adapters" if adapters else "models"),
        "base_model_path": first.base,
        "parent_runs": list(first.parents[:-1]) if adapters else [],
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "versions": {"nbalign": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": sys.version.split()[0]},
    })


def _merge_adapters(out: Path, spec: MergeSpec, sources) -> dict:
    import torch
    from peft import PeftModel

    from ..devices import Device
    from ..models import load_model, load_tokenizer

    ref = sources[0][1]
    base = load_model(ref.__class__(ref.name, ref.base, ref.parents[:-1]), Device("cpu", False))
    names = [f"run{i}" for i in range(len(sources))]
    model = PeftModel.from_pretrained(base, str(runfolder.weights_dir(sources[0][0])), adapter_name=names[0])
    for name, (folder, _) in zip(names[1:], sources[1:]):
        model.load_adapter(str(runfolder.weights_dir(folder)), adapter_name=name)
    configs = [model.peft_config[n] for n in names]
    if len({type(c).__name__ for c in configs}) != 1 or any(getattr(c, "use_dora", False) for c in configs):
        raise NbalignError(f"{WHERE}: peft merges plain LoRA adapters only; these runs used "
                           f"{', '.join(sorted({'DoRA' if getattr(c, 'use_dora', False) else type(c).__name__ for c in configs}))}.",
                           "merge them as whole models (method: linear, ties or slerp), which needs `pip install "
                           "'nbalign[merge]'`.")
    ranks = [c.r for c in configs]
    method = spec.method
    if method in ("linear",) + PRUNING and len(set(ranks)) != 1:
        raise NbalignError(f"{WHERE}: '{method}' needs adapters of one rank; these have ranks {ranks}.",
                           "use cat or svd (any ranks), or a _svd variant such as ties_svd.")
    weights = spec.weights or [1.0] * len(names)
    options = {}
    if method.split("_svd")[0] in PRUNING or method.endswith("prune_svd"):
        options["density"] = spec.density if spec.density is not None else 0.5
        options["majority_sign_method"] = spec.majority_sign_method
    if method.endswith("svd"):
        options["svd_rank"] = spec.rank or max(ranks)
    torch.manual_seed(0)  # DARE drops at random: the same merge twice gives the same adapter
    # Named "default": peft saves any other name into a subfolder, where `--model` would not look.
    model.add_weighted_adapter(names, weights, "default", combination_type=method, **options)
    model.set_adapter("default")
    for name in names:
        model.delete_adapter(name)
    runfolder.save_weights(out, model, load_tokenizer(ref), full=False)
    rank = model.peft_config["default"].r
    return {"merge": method, "runs": len(names), "weights": weights, "rank": rank,
            **({"density": options["density"]} if "density" in options else {})}


def _merge_models(out: Path, spec: MergeSpec, sources) -> dict:
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
    except ImportError:
        raise NbalignError(
            f"{WHERE}: merging whole models ({spec.method}) needs mergekit, which is not installed.",
            "run `pip install 'nbalign[merge]'` (or `pip install mergekit`) and run the cell again; adapters "
            "of one base merge without it.") from None
    from ..models import load_tokenizer, merged_folder

    paths = [str(merged_folder(ref) if ref.parents else ref.base) for _, ref in sources]
    n = len(paths)
    weights = spec.weights or [1.0 / n] * n
    config: dict = {"merge_method": spec.method, "dtype": "float32"}
    if spec.method == "slerp":
        config.update(base_model=paths[0], models=[{"model": p} for p in paths], parameters={"t": spec.t})
    else:
        density = spec.density if spec.density is not None else 0.5
        params = [{"weight": w, **({"density": density} if spec.method in PRUNING else {})} for w in weights]
        config["models"] = [{"model": p, "parameters": q} for p, q in zip(paths, params)]
        if spec.method != "linear":  # task vectors are taken against the runs' common base
            config["base_model"] = sources[0][1].base
    with runfolder.atomic_folder(out / runfolder.MODEL) as tmp:
        run_merge(MergeConfiguration.model_validate(config), str(tmp), options=MergeOptions(copy_tokenizer=False))
        load_tokenizer(sources[0][1]).save_pretrained(tmp)
    return {"merge": spec.method, "runs": n, "weights": weights, "mergekit": True}


def _card(out: Path, spec: MergeSpec, first, adapters: bool, summary: dict) -> str:
    """The merged run's model card: the Hugging Face metadata block (base model, `base_model_relation: merge`),
    what it is for, its sources with their weights and their own evaluations, how, limitations, use."""
    import platform

    from ..clock import describe_times
    from .card import HUB_NAMES, metadata_block

    specs = [runfolder.read_spec(Path(s)) if runfolder.is_run_folder(Path(s)) else {} for s in spec.sources]
    named = next((sp.get("spec", {}).get("model") for sp in specs if sp.get("spec", {}).get("model")), None)
    base = HUB_NAMES.get(str(named).lower(), str(named or first.base))
    what = "adapter" if adapters else "model"
    meta = metadata_block(base, "peft" if adapters else "transformers", "text-generation",
                          ["nbalign", "merge", spec.method], relation="merge")
    rows = [f"| {i + 1} | `{s}` | {w:g} | {sp.get('method', '')} | {_measured(Path(s))} |"
            for i, (s, w, sp) in enumerate(zip(spec.sources, summary["weights"], specs))]
    settings = {k: v for k, v in summary.items() if k not in ("weights", "merge", "time_s")}
    lines = meta + [
        f"# {out.name}", "",
        f"Made with nbalign `%%merge` ({spec.method}) from {len(spec.runs)} runs, without training.", "",
        "## Intended use", "",
        spec.intended_use or "_Not stated. Say what this model is for (and what it is not for) with `intended_use: "
                             "...` in the `%%merge` cell._", "",
        "## Sources", "",
        "| # | run | weight | method | its own evaluation (after training) |", "|---|---|---|---|---|", *rows, "",
        "## Merge", "",
        "| | |", "|---|---|",
        f"| method | {spec.method}{' (peft weighted adapters)' if adapters else ' (mergekit)'} |",
        f"| base model | `{named or first.base}` ({first.base}) |",
        *(f"| {k} | {v} |" for k, v in settings.items()), "",
        "## Limitations", "",
        "- Merging is not training: no data was seen and nothing was measured on the merged model here. Where the "
        "sources taught conflicting behaviour on the same prompts, one gives way; measure each behaviour on held-out "
        "prompts (`nbalign.compare`, `run.evaluate`) before using it.",
        "- Each source's limitations (its card) carry over.", "",
        "## Time and hardware", "",
        "| | |", "|---|---|", f"| time | {describe_times(summary.get('time_s', {}))} |",
        f"| hardware | CPU ({platform.machine()}) |", "",
        "## Use", "",
        f"In a notebook: `%%sft --model {out}` continues from it; `nbalign.Run('{out}').generate(...)` answers "
        f"with it; `.export(...)` writes merged safetensors or GGUF. The merged {what} is in "
        f"`{out / (runfolder.ADAPTER if adapters else runfolder.MODEL)}`.", "",
    ]
    return "\n".join(lines)


def _measured(folder: Path) -> str:
    """A source run's headline evaluation numbers, or "not evaluated" where it has none."""
    from ..results import load

    evaluation = load(folder) if runfolder.is_run_folder(folder) else None
    numbers = evaluation.summary() if evaluation is not None and hasattr(evaluation, "summary") else {}
    shown = ", ".join(f"{k} {v:.3g}" for k, v in numbers.items() if not k.endswith(("_before", "_prompting")))
    return shown or "not evaluated"
