"""The untrained model's measurements, kept on disk under everything that determines them.

Before its first step a run measures the model it starts from on its evaluation prompts (answers, form and
content, the knowledge probe, perplexity, the reference's log-probs) and what prompting alone reaches. Those
numbers depend only on that model's files, the evaluation data, the generation settings, the device's number
format and the code that measures; a re-run cell, or a second run on the same model and data, would spend the
same minutes to get the same numbers. They are kept in `<cache>/evaluations/`, one JSON file per key, and the
run says when it reuses them. `NBALIGN_EVAL_CACHE=0` turns the reuse off; a path moves the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from . import runfolder

# The modules whose code decides what a measurement is: a change to any of them is a new key.
MEASURING_CODE = ("evaluation.py", "outcomes.py", "generation.py", "scoring.py", "text.py", "callbacks.py")
KEEP = 200  # entries; the oldest go first


def folder() -> Path | None:
    """Where the entries live, or None when the reuse is off."""
    setting = os.environ.get("NBALIGN_EVAL_CACHE", "")
    if setting.strip().lower() in ("0", "false", "no", "off"):
        return None
    if setting.strip():
        return Path(setting).expanduser()
    from .models import cache_dir

    return cache_dir() / "evaluations"


def files_identity(path: str | Path) -> list:
    """Name, size and modification time of the files that make a model: a model folder's own files, or a run
    folder's weights (its adapter/ or model/), so retraining a run into the same folder changes the identity."""
    path = Path(path)
    if runfolder.is_run_folder(path):
        roots = [path / runfolder.ADAPTER, path / runfolder.MODEL]
        found = [f for root in roots if root.is_dir() for f in sorted(root.rglob("*")) if f.is_file()]
    else:
        found = sorted(f for f in path.iterdir() if f.is_file())
    return [[str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns] for f in found]


@dataclasses.dataclass(frozen=True)
class StartModel:
    """The model a run starts from, as far as its measurements can tell: base and parent runs' files, the
    base's quantization, and the device's number format."""

    identity: str

    @classmethod
    def of(cls, ref, adapter, device, seed: int | None = None) -> StartModel:
        import torch
        import transformers

        payload = {
            "files": [files_identity(p) for p in (ref.base, *ref.parents)],
            "quantize": getattr(adapter, "quantize", None),
            "device": str(device),
            "versions": [torch.__version__, transformers.__version__, _code_hash()],
        }
        if getattr(adapter, "type", None) in ("prefix", "prompt"):
            # The untrained model answers through the adapter's virtual tokens, drawn at random from the seed (a
            # fresh LoRA, DoRA or IA3 adapter leaves the base's answers as they were): those are part of the start.
            payload["adapter"] = [adapter.to_dict(), seed]
        return cls(json.dumps(payload, sort_keys=True, default=str))


@dataclasses.dataclass(frozen=True)
class Entry:
    path: Path

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # missing, or half-written by a killed process: measure again

    def write(self, payload: dict) -> None:
        try:
            runfolder.write_json_atomic(self.path, payload)
            _prune(self.path.parent)
        except OSError:  # a read-only or full disk costs the reuse, never the run
            pass


def entry(start: StartModel | None, what: str, *parts: Any) -> Entry | None:
    """The cache entry for `what` ("before", "prompting") measured on `start` with `parts` (the evaluation
    data and settings); None when the reuse is off or the start model is unknown."""
    root = folder()
    if root is None or start is None:
        return None
    blob = json.dumps([start.identity, what, *[_plain(p) for p in parts]], sort_keys=True, default=str)
    return Entry(root / f"{what}-{hashlib.sha256(blob.encode()).hexdigest()[:40]}.json")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return value


def _code_hash() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in MEASURING_CODE:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:16]


def _prune(root: Path) -> None:
    entries = sorted(root.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP:]:
        old.unlink(missing_ok=True)
