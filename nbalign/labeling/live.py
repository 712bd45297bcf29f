"""%%dpo --live (and %%kto, %%reward_model): train in rounds while a person labels.

A round starts whenever `live_every` new labels have arrived in the store. Each round trains a fresh adapter
on every label so far, from the cell's model, into <out>/round-<k>: so the newest round is exactly what the
same cell without --live would train on those labels, every round replays from its own spec.json, and no
round stands on another's weights. When a round finishes, the labeller draws its next candidates from it.

Where rounds run: in a background thread of the kernel (the cell returns at once, the widget stays usable,
the kernel handles clicks between the training steps); or, in front ends that cannot update widgets from a
background thread (Colab), in the kernel's own thread between two labels ("rounds" mode: the widget says
so and waits while a round trains).
"""

from __future__ import annotations

import html
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import NbalignError
from .store import LabelStore

MODES = ("background", "rounds")


def pick_mode(mode: str = "auto") -> str:
    """"auto" picks the mode this front end can run; "background" / "rounds" choose it."""
    if mode in MODES:
        return mode
    return "rounds" if "google.colab" in sys.modules else "background"


class _ThreadOutput:
    """sys.stdout / sys.stderr while live rounds run: what the round threads write goes to their log file
    (it would otherwise land in whichever cell runs at that moment); every other thread writes as before."""

    def __init__(self, original):
        self.original = original
        self.logs: dict[int, Any] = {}

    def write(self, text):
        log = self.logs.get(threading.get_ident())
        return log.write(text) if log is not None else self.original.write(text)

    def flush(self):
        log = self.logs.get(threading.get_ident())
        (log or self.original).flush()

    def __getattr__(self, name):
        return getattr(self.original, name)


def _route_thread_output(log) -> None:
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, _ThreadOutput):
            stream = _ThreadOutput(stream)
            setattr(sys, name, stream)
        stream.logs[threading.get_ident()] = log


def _unroute_thread_output() -> None:
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, _ThreadOutput):
            stream.logs.pop(threading.get_ident(), None)
            if not stream.logs:
                setattr(sys, name, stream.original)


class LiveTraining:
    """Rounds of training on a growing label store. `.rounds` are the finished Runs, `.latest` the newest,
    `.stop()` ends after the current step (saving it), `.wait(rounds=k)` blocks until k rounds finished."""

    # One live trainer per output folder in this process: re-running the cell stops the previous one first.
    _active: dict[str, "LiveTraining"] = {}

    def __init__(self, spec, store: LabelStore, rows: Callable[[], list], train: Callable, labeler=None,
                 mode: str = "background", poll: float = 0.5):
        self.spec, self.store, self._rows, self._train = spec, store, rows, train
        self.labeler, self.mode, self.poll = labeler, mode, poll
        self.out = Path(spec.out) if spec.out else Path("runs") / f"{spec.method}-live"
        self.every = spec.live_every
        self.rounds: list = []
        self.trained_on = 0
        self._seen: int | None = -1  # the store's newest label id when its rows were last built
        self.error: str | None = None
        self.state = "waiting for labels"
        self._stop = threading.Event()
        self._busy = threading.Lock()
        self._thread: threading.Thread | None = None
        self._widget = None
        self._changed = threading.Condition()

    # -- control --------------------------------------------------------------------------------------------
    def start(self) -> "LiveTraining":
        key = str(self.out.resolve())
        previous = LiveTraining._active.get(key)
        if previous is not None and previous is not self:
            previous.stop()
        LiveTraining._active[key] = self
        self.out.mkdir(parents=True, exist_ok=True)
        if self.mode == "background":
            self._thread = threading.Thread(target=self._loop, name=f"nbalign-live-{self.out.name}", daemon=True)
            self._thread.start()
        elif self.labeler is not None and hasattr(self.labeler, "on_label"):
            self.labeler.on_label(self._after_label)
            self._say("rounds mode: this front end cannot update widgets from a background thread, so a round "
                      f"trains between two labels, every {self.every} labels (the widget waits meanwhile)")
        else:
            raise NbalignError(
                "--live in rounds mode trains between labels, so it needs the labeller object as --data.",
                "pass the labeller (e.g. --data labels), or use live: background.",
            )
        self._show()
        return self

    def stop(self, wait: bool = True) -> None:
        """Stop after the current training step (the round is saved, marked interrupted) and end the thread."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if LiveTraining._active.get(str(self.out.resolve())) is self:
            del LiveTraining._active[str(self.out.resolve())]
        if self.state != "failed":
            self._say(f"stopped after {len(self.rounds)} round(s)")

    def wait(self, rounds: int = 1, timeout: float | None = None) -> "LiveTraining":
        """Block until `rounds` rounds have finished (or the live training stopped or failed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while len(self.rounds) < rounds and not self._stop.is_set() and self.error is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{len(self.rounds)} of {rounds} live rounds finished in {timeout} s")
                self._changed.wait(left)
        if self.error is not None:
            raise NbalignError(f"Live training failed: {self.error}", "fix the cause and re-run the cell.")
        return self

    @property
    def latest(self):
        return self.rounds[-1] if self.rounds else None

    # -- the rounds -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self.step()
                self._stop.wait(self.poll)
        except Exception as exc:  # noqa: BLE001 - shown in the widget and raised by wait()
            self._fail(exc)

    def _after_label(self, *_) -> None:
        try:
            self.step()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        self.error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        self.state = "failed"
        self._say(f"failed: {self.error}")
        with self._changed:
            self._changed.notify_all()

    def step(self) -> bool:
        """Train a round if enough new labels arrived; returns whether one ran."""
        if not self._busy.acquire(blocking=False):
            return False
        try:
            last = self.store.last_label()
            if last == self._seen:  # nothing labelled since the last look: no need to rebuild the rows
                return False
            rows = self._rows()
            self._seen = last
            if len(rows) - self.trained_on < self.every or self._stop.is_set():
                if not self.rounds:
                    self._say(f"waiting for labels: {len(rows)} of {self.every} for the first round")
                return False
            self._round(rows)
            return True
        finally:
            self._busy.release()

    def _round(self, rows: list) -> None:
        k = len(self.rounds) + 1
        out = self.out / f"round-{k}"
        spec = self.spec.replace(data=rows, out=str(out), live=False, overwrite=True, resume=False)
        self._say(f"round {k}: training on {len(rows)} rows ({getattr(rows, 'summary', '')})")
        started = time.monotonic()

        def progress(step, total, loss):
            shown = f", loss {loss:.3f}" if loss is not None else ""
            self._say(f"round {k}: step {step}/{total}{shown} ({time.monotonic() - started:.0f} s)")

        from ..callbacks import in_background

        log = open(self.out / "live.log", "a", encoding="utf-8")  # noqa: SIM115 - closed below
        threaded = self.mode == "background"
        if threaded:
            _route_thread_output(log)
        try:
            with in_background(progress, self._stop):
                run = self._train(spec)
        finally:
            if threaded:
                _unroute_thread_output()
            log.close()
        if run.status != "finished":
            self._say(f"round {k} {run.status}: {run.message or ''}")
            return
        self.trained_on = len(rows)
        self.rounds.append(run)
        if self.labeler is not None and hasattr(self.labeler, "set_models"):
            self.labeler.set_models(str(run.path))
        self._say(f"round {k} done in {time.monotonic() - started:.0f} s on {len(rows)} rows -> {run.path}; "
                  "new candidates come from it")
        with self._changed:
            self._changed.notify_all()

    # -- display --------------------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        self.state = text
        if self.labeler is not None and hasattr(self.labeler, "notice"):
            try:
                self.labeler.notice = f"live: {text}"
            except Exception:  # noqa: BLE001 - a closed widget must not stop training
                pass
        if self._widget is not None:
            self._widget.value = self._html()

    def _html(self) -> str:
        done = "".join(f"<li><code>{html.escape(str(r.path))}</code></li>" for r in self.rounds)
        return (f"<div class='nbalign-live'><b>nbalign {html.escape(self.spec.method)} --live</b> "
                f"({html.escape(self.mode)}, a round every {self.every} new labels from "
                f"<code>{html.escape(str(self.store.path))}</code>)<br>{html.escape(self.state)}"
                + (f"<ul>{done}</ul>" if done else "") + "</div>")

    def _show(self) -> None:
        try:
            import ipywidgets

            from ..callbacks import in_notebook

            if in_notebook():
                self._widget = ipywidgets.HTML(self._html())
        except ImportError:
            self._widget = None

    def _repr_mimebundle_(self, **kwargs):
        if self._widget is not None:
            return self._widget._repr_mimebundle_(**kwargs)
        return {"text/plain": repr(self)}

    def __repr__(self) -> str:
        return f"LiveTraining('{self.out}', {len(self.rounds)} round(s) done: {self.state})"
