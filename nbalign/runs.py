"""Run folders and the Run object.

A run folder is the unit a user passes on. `status.json` is written last on success and atomically
always, so a crash never leaves a folder that claims to be finished.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import NbalignError

STATUSES = ("running", "finished", "interrupted", "failed")


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_status(path: str | Path) -> dict:
    """The run's status. A run still marked running whose process is gone (a kernel restart, a crash)
    reads as interrupted, so it can be resumed from its last checkpoint."""
    try:
        status = json.loads((Path(path) / "status.json").read_text())
    except (OSError, ValueError):
        return {}
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


def set_status(path: Path, status: str, message: str | None = None, **extra) -> None:
    import socket

    assert status in STATUSES
    payload = {"status": status, "updated": _now(), **extra}
    if status == "running":
        payload.update(pid=os.getpid(), host=socket.gethostname())
    if message:
        payload["message"] = message
    write_json_atomic(path / "status.json", payload)


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def default_out(method: str, root: str | Path = "runs") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{method}-{stamp}"


def latest_checkpoint(path: Path) -> Path | None:
    folder = path / "checkpoints"
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def prepare_folder(out: Path, method: str, *, resume: bool, overwrite: bool) -> None:
    """Check that `out` may be used as asked, before anything is written there."""
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


class Run:
    """A training run on disk: its spec, status, metrics and weights."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "spec.json").is_file():
            raise NbalignError(f"'{self.path}' is not an nbalign run folder (no spec.json).", "check the path.")

    # --- what is on disk -------------------------------------------------------------------------
    @property
    def spec(self) -> dict:
        return json.loads((self.path / "spec.json").read_text())

    @property
    def method(self) -> str:
        return self.spec.get("method", "?")

    @property
    def status(self) -> str:
        return read_status(self.path).get("status", "unknown")

    @property
    def message(self) -> str | None:
        return read_status(self.path).get("message")

    @property
    def summary(self) -> dict:
        return read_status(self.path).get("summary", {})

    @property
    def metrics(self):
        """One row per logged step, as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(read_metrics(self.path))

    # --- using the weights -----------------------------------------------------------------------
    def generate(self, prompt: Any, max_new_tokens: int = 128, **kwargs) -> str | list[str]:
        """Answer `prompt` (a string, a message list, or a list of either) with the tuned model."""
        from .generation import generate

        if self.status != "finished":
            raise NbalignError(
                f"The run '{self.path}' is {self.status}; its final weights were not saved.",
                "finish it with --resume, or load the interrupted adapter explicitly from its adapter/ folder.",
            )
        return generate(str(self.path), prompt, max_new_tokens=max_new_tokens, **kwargs)

    def evaluate(self, data: Any, **options):
        """Held-out preference accuracy, margins, KL to the reference, answer length and perplexity, before
        (the reference) and after (this run): see nbalign.evaluate."""
        from .evaluation import evaluate

        return evaluate(str(self.path), data, **options)

    @property
    def evaluation(self):
        """The evaluation measured at the end of training (preference methods), or None."""
        from .evaluation import load

        return load(self.path)

    def _plot_png(self) -> bytes | None:
        from .plots import loss_png

        return loss_png(read_metrics(self.path), title=self.path.name)

    # --- display ---------------------------------------------------------------------------------
    def __repr__(self) -> str:
        s = self.summary
        extra = f", train_loss={s['train_loss']:.4f}" if "train_loss" in s else ""
        return f"Run({str(self.path)!r}, method={self.method!r}, status={self.status!r}{extra})"

    def _repr_html_(self) -> str:
        import base64

        status = read_status(self.path)
        spec = self.spec
        rows = {
            "status": status.get("status", "unknown") + (f" - {status['message']}" if status.get("message") else ""),
            "model": spec.get("spec", {}).get("model"),
            "adapter": spec.get("adapter_description"),
            "device": spec.get("device"),
        }
        rows.update({k: _fmt(v) for k, v in status.get("summary", {}).items()})
        table = "".join(
            f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(str(k))}</th>"
            f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>"
            for k, v in rows.items()
            if v is not None
        )
        png = self._plot_png()
        img = f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}'/>" if png else ""
        evaluation = self.evaluation if (self.path / "evaluation.json").is_file() else None
        return (
            f"<div><b>nbalign {html.escape(self.method)} run</b> <code>{html.escape(str(self.path))}</code>"
            f"<div style='display:flex;gap:1em;align-items:flex-start'><table>{table}</table>{img}</div>"
            + (evaluation._repr_html_() if evaluation is not None else "")
            + "</div>"
        )


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.4g}"
    return v


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    try:
        with open(Path(path) / "metrics.jsonl", encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line cut short by a crash
                    continue
    except OSError:
        pass
    return rows


def list_runs(root: str | Path = "runs"):
    """Past runs under `root` (newest first) as a DataFrame: what `%nbalign runs` shows."""
    import pandas as pd

    rows = []
    root = Path(root)
    for spec_file in sorted(root.glob("**/spec.json")):
        folder = spec_file.parent
        if folder.name in ("adapter", "model", "merged") or "checkpoints" in folder.parts:
            continue
        try:
            spec = json.loads(spec_file.read_text())
        except ValueError:
            continue
        status = read_status(folder)
        summary = status.get("summary", {})
        rows.append(
            {
                "run": str(folder),
                "method": spec.get("method"),
                "model": spec.get("spec", {}).get("model"),
                "adapter": spec.get("adapter_description"),
                "status": status.get("status", "unknown"),
                "steps": summary.get("steps"),
                "train_loss": summary.get("train_loss"),
                "started": spec.get("started"),
            }
        )
    frame = pd.DataFrame(rows, columns=["run", "method", "model", "adapter", "status", "steps", "train_loss", "started"])
    return frame.sort_values("started", ascending=False, ignore_index=True) if len(frame) else frame
