"""The run folder's one owner: what is a run folder, and every file in it, written and read here.

```
<run>/spec.json            the resolved spec (the whole run: it replays from this file), versions, device
<run>/data/*.jsonl         in-memory training/eval data, saved so the spec replays in another process;
                          replay.jsonl: the general rows `replay` mixed in (the base's own answers)
<run>/status.json          running | finished | interrupted | failed (+ message, summary); written last
<run>/metrics.jsonl        one line per logged step
<run>/evaluation.json      the evaluation at the end (evaluation_before.json: its start, for --resume)
<run>/adapter/ or model/   PEFT adapter, or the whole model for full fine-tuning
<run>/checkpoints/         for --resume
<run>/merged/              the run's weights merged into its base, written once when needed (QLoRA chains)
<run>/README.md            model card
<run>/error.log            the traceback of a failed run
```
spec.json, status.json, evaluation.json, the saved data and the weights are written atomically (a temporary
file or folder renamed into place), and status.json is written last on success, so a crash never leaves a
folder that claims to be finished or a half-written weights folder. metrics.jsonl is appended line by line
(a line cut short is skipped when read); the card and error.log are plain writes of finished text.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import NbalignError

STATUSES = ("running", "finished", "interrupted", "failed")
SPEC, STATUS, METRICS = "spec.json", "status.json", "metrics.jsonl"
EVALUATION, EVALUATION_BEFORE = "evaluation.json", "evaluation_before.json"
ADAPTER, MODEL, MERGED, CHECKPOINTS, DATA = "adapter", "model", "merged", "checkpoints", "data"
CARD, ERROR_LOG = "README.md", "error.log"
# Folders inside a run that hold weights or checkpoints, never runs of their own.
INNER = (ADAPTER, MODEL, MERGED, CHECKPOINTS, DATA)


def is_run_folder(path: str | Path) -> bool:
    """The one rule: a folder with spec.json and status.json (written at a run's start, before training)."""
    p = Path(path)
    return (p / SPEC).is_file() and (p / STATUS).is_file()


# ----------------------------------------------------------------------------------------------------
# JSON files, atomically


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_spec(path: str | Path) -> dict:
    """spec.json of a run ({} when missing or unreadable)."""
    return _read_json(Path(path) / SPEC) or {}


def write_spec(path: Path, payload: dict) -> None:
    write_json_atomic(path / SPEC, payload)


# ----------------------------------------------------------------------------------------------------
# Status


def read_status(path: str | Path) -> dict:
    """The run's status. A run still marked running whose process is gone (a kernel restart, a crash)
    reads as interrupted, so it can be resumed from its last checkpoint."""
    status = _read_json(Path(path) / STATUS) or {}
    if status.get("status") == "running" and not _alive(status.get("pid"), status.get("host")):
        status.update(status="interrupted", message="the process training it ended (kernel restart or crash)")
    return status


def _alive(pid, host) -> bool:
    import socket

    if not pid or host != socket.gethostname():
        return True  # cannot tell from here: trust the file
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def status_stamp(path: str | Path) -> int:
    """When status.json last changed (0 without one): a run trained again in place gets a new stamp."""
    try:
        return (Path(path) / STATUS).stat().st_mtime_ns
    except OSError:
        return 0


def set_status(path: Path, status: str, message: str | None = None, **extra) -> None:
    import socket

    if status not in STATUSES:
        raise ValueError(f"unknown run status {status!r}")
    payload = {"status": status, "updated": _dt.datetime.now().isoformat(timespec="seconds"), **extra}
    if status == "running":
        payload.update(pid=os.getpid(), host=socket.gethostname())
    if message:
        payload["message"] = message
    write_json_atomic(path / STATUS, payload)


# ----------------------------------------------------------------------------------------------------
# Where a run goes, and whether it may go there


def default_out(method: str, root: str | Path = "runs") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{method}-{stamp}"


def checkpoints_dir(path: Path) -> Path:
    return Path(path) / CHECKPOINTS


def latest_checkpoint(path: Path) -> Path | None:
    folder = checkpoints_dir(path)
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and checkpoint_state_path(p).is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def checkpoint_state_path(checkpoint: Path) -> Path:
    return Path(checkpoint) / "trainer_state.json"


def checkpoint_state(checkpoint: Path) -> dict:
    """The Trainer's state saved with a checkpoint (global_step, max_steps, log history)."""
    return _read_json(checkpoint_state_path(checkpoint)) or {}


def check_writable(out: Path) -> None:
    """--out must be a folder nbalign can create and write: not a file, not under a file, not read-only."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NbalignError(
            f"--out '{out}' is an existing file, not a folder, so the run cannot be written there.",
            f"pick a folder name, e.g. --out runs/{out.stem or 'run1'}.",
        )
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NbalignError(
            f"--out '{out}' lies under '{parent}', which is a file, so the folder cannot be created.",
            "pick a path whose parent folders are folders, e.g. --out runs/run1.",
        )
    try:  # a real write: permissions, read-only file systems and quotas all show here
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise NbalignError(
            f"--out '{out}': nbalign cannot write in '{parent}' ({exc.strerror or exc}).",
            "pick a folder you can write to, e.g. one under your home or the notebook's folder.",
        ) from None


def prepare_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Check that `out` may be used as asked, before anything is written there."""
    check_writable(out)
    status = read_status(out).get("status")
    if resume:
        if status is None:
            raise NbalignError(
                f"--resume: '{out}' holds no run to resume.", f"drop --resume to start a new run in '{out}'."
            )
        if status == "finished":
            raise NbalignError(
                f"--resume: the run in '{out}' already finished.",
                "use it as --model to continue training from it, or use --overwrite to train it again.",
            )
        if latest_checkpoint(out) is None:
            raise NbalignError(
                f"--resume: the {status} run in '{out}' saved no checkpoint to continue from.",
                "start it again with --overwrite.",
            )
        return
    if status is not None and not overwrite:
        what = f"{'an' if status[0] in 'aeiou' else 'a'} {status} run"
        fix = (
            "pick another --out, or add --overwrite to replace it."
            if status != "interrupted"
            else "add --resume to continue it, --overwrite to start again, or pick another --out."
        )
        raise NbalignError(f"The folder '{out}' already holds {what}.", fix)
    if status is None and out.exists() and any(out.iterdir()):
        raise NbalignError(
            f"The folder '{out}' exists and is not an nbalign run folder, so nbalign will not write into it.",
            "pick another --out.",
        )


def start(out: Path, overwrite: bool) -> None:
    """Make the folder for a new (or resumed) run; an --overwrite starts from an empty one."""
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*-*"):  # temporaries of a save that was killed half-way
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Data, metrics, weights, evaluation, card, error log


def save_data(path: Path, name: str, records: list[dict]) -> str:
    """In-memory data as <run>/data/<name>.jsonl; returns the path relative to the run folder."""
    target = Path(path) / DATA / f"{name}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in records:
                f.write(json.dumps(row, default=_plain, ensure_ascii=False) + "\n")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return f"{DATA}/{name}.jsonl"


def _plain(value: Any) -> Any:
    """Cells JSON cannot hold as they are, as the values they stand for: numpy arrays (Parquet's message
    lists) and scalars, timestamps. Anything else as its text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def metrics_path(path: Path) -> Path:
    return Path(path) / METRICS


def append_metrics(path: Path, row: dict) -> None:
    """One logged step, flushed at once, so a crash keeps what was logged."""
    with metrics_path(path).open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=float) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    try:
        with metrics_path(Path(path)).open(encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line cut short by a crash
                    continue
    except OSError:
        pass
    return rows


def weights_dir(path: str | Path) -> Path:
    """Where a run's final weights are: model/ for full fine-tuning, else adapter/."""
    path = Path(path)
    return path / MODEL if (path / MODEL / "config.json").is_file() else path / ADAPTER


@contextlib.contextmanager
def atomic_folder(target: Path):
    """A temporary folder beside `target` to write into; when the block ends without error it replaces
    `target` in one rename, so an interrupted write never leaves a folder that looks complete."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_weights(path: Path, model, tokenizer, full: bool) -> Path:
    """The adapter (or, for full fine-tuning, the whole model) plus the tokenizer, written atomically."""
    target = Path(path) / (MODEL if full else ADAPTER)
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def merged_dir(path: str | Path) -> Path:
    return Path(path) / MERGED


def save_evaluation(path: Path, payload: dict) -> None:
    write_json_atomic(Path(path) / EVALUATION, payload)


def read_evaluation(path: str | Path) -> dict | None:
    return _read_json(Path(path) / EVALUATION)


def save_evaluation_start(path: Path, payload: dict) -> None:
    write_json_atomic(Path(path) / EVALUATION_BEFORE, payload)


def read_evaluation_start(path: Path) -> dict | None:
    return _read_json(Path(path) / EVALUATION_BEFORE)


def write_card(path: Path, text: str) -> None:
    (Path(path) / CARD).write_text(text, encoding="utf-8")


def write_error_log(path: Path, text: str) -> Path:
    target = Path(path) / ERROR_LOG
    target.write_text(text, encoding="utf-8")
    return target


def find_runs(root: str | Path) -> list[Path]:
    """Run folders under `root` (any depth), not the inner folders of a run."""
    out = []
    for spec_file in sorted(Path(root).glob(f"**/{SPEC}")):
        folder = spec_file.parent
        if any(part in INNER for part in folder.relative_to(root).parts) or not is_run_folder(folder):
            continue
        out.append(folder)
    return out


def stored_data(path: str | Path, value: Any) -> Any:
    """A spec's data value as replay needs it: in-memory data saved with the run becomes its file's path."""
    if isinstance(value, dict) and value.get("saved"):
        return str(Path(path) / value["saved"])
    return value
