"""What a run reads, checked before it starts: its in-memory data (saved with the run), the data a resumed run
must share with the run it continues, and the inputs --overwrite must not empty."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import runfolder
from ..errors import NbalignError
from ..spec_fields import describe_data
from ..specs import DATA_FIELDS, TrainSpec


def check_overwrite(spec: TrainSpec, out: Path, ref) -> None:
    """--overwrite empties --out first: refuse when this run reads something inside it."""
    if not spec.overwrite or not out.exists():
        return
    inputs = [*ref.parents, *(getattr(spec, name) for name in DATA_FIELDS)]
    reward = getattr(spec, "reward", None)
    inputs += list(reward) if isinstance(reward, (list, tuple)) else [reward]
    root = out.resolve()
    for item in inputs:
        if isinstance(item, (str, Path)) and Path(item).exists() and (
                Path(item).resolve() == root or root in Path(item).resolve().parents):
            raise NbalignError(
                f"--overwrite would empty '{out}', but this run reads '{item}' from inside it.",
                "pick another --out for the new run.",
            )


def in_memory_records(spec: TrainSpec) -> dict:
    """Rows of the data given as notebook objects (not paths), to save with the run."""
    from ..data import load_records

    out = {}
    for name in DATA_FIELDS:
        value = getattr(spec, name)
        if value is None or isinstance(value, (str, Path)):
            continue
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            value = [{"prompt": v} for v in value]  # prompts alone (%%rlhf)
        out[name] = load_records(value, name.replace("_", " "))
    return out


def resume_spec(spec: TrainSpec, out: Path) -> TrainSpec:
    """The spec to continue with: the stored one's data when none is given; given data must be the same."""
    stored = runfolder.read_spec(out).get("spec", {})
    changes = {}
    for name in DATA_FIELDS:
        kept, given = stored.get(name), getattr(spec, name)
        if given is None:
            if isinstance(kept, dict) and not kept.get("saved"):
                raise NbalignError(
                    f"--resume: the run in '{out}' was trained on in-memory data, which was not saved with it.",
                    "pass the same data again with --data.",
                )
            changes[name] = runfolder.stored_data(out, kept)
        elif not _same_data(given, kept, out):
            raise NbalignError(
                f"--resume: the {name.replace('_', ' ')} differs from the data the run in '{out}' started with.",
                "pass the same data (or none: the run kept a copy), or start a new run with --overwrite.",
            )
    return spec.replace(**changes) if changes else spec


def _same_data(given: Any, kept: Any, out: Path) -> bool:
    if isinstance(given, (str, Path)):
        return str(given) == str(kept) or str(given) == runfolder.stored_data(out, kept)
    if isinstance(kept, dict):
        return describe_data(given).get("fingerprint") == kept.get("fingerprint") is not None
    return False
