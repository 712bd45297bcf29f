"""TrainerCallbacks: metrics.jsonl, a live progress bar and loss curve, and clean kernel interrupts."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from . import runfolder

# Training in a background thread (%%dpo --live) reports here instead of displaying in whatever cell runs
# then, and stops when its event is set: per thread, so a cell training in the foreground is unaffected.
_thread = threading.local()


@contextlib.contextmanager
def in_background(progress, stop: threading.Event):
    """Within this block, this thread's training reports `progress(step, max_steps, loss)` and stops (saving,
    as after an interrupt) once `stop` is set."""
    _thread.progress, _thread.stop = progress, stop
    try:
        yield
    finally:
        _thread.progress = _thread.stop = None


class MetricsWriter(TrainerCallback):
    """Appends every logged step to the run's metrics.jsonl (flushed per line, so a crash keeps what was logged)."""

    def __init__(self, run_path: Path):
        self.folder = Path(run_path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        runfolder.append_metrics(self.folder, {"step": state.global_step, "epoch": state.epoch,
                                               "time": round(time.time(), 3), **logs})


def in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class LiveProgress(TrainerCallback):
    """A progress bar with ETA and a loss curve, updated in place in a notebook (text on a terminal)."""

    def __init__(self, title: str, min_interval: float = 1.0):
        self.title = title
        self.min_interval = min_interval
        self.rows: list[dict] = []
        self.report = getattr(_thread, "progress", None)
        self.notebook = in_notebook() and self.report is None
        self._bar = self._plot = None
        self._last_bar = self._last_plot = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time = time.time()
        self.start_step = state.global_step
        if self.notebook:
            from IPython.display import HTML, display

            self._bar = display(HTML(self._bar_html(state)), display_id=True)
            self._plot = display(HTML(""), display_id=True)

    def on_step_end(self, args, state, control, **kwargs):
        now = time.time()
        if now - self._last_bar >= self.min_interval or state.global_step >= state.max_steps:
            self._last_bar = now
            self._show_bar(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.rows.append({"step": state.global_step, **logs})
        now = time.time()
        if self.notebook and now - self._last_plot >= 2 * self.min_interval:
            self._last_plot = now
            self._show_plot()

    def on_train_end(self, args, state, control, **kwargs):
        self._show_bar(state)
        if self.notebook and self._plot is not None:
            from IPython.display import HTML

            # The Run's summary below shows the whole curve: the live copy would show it twice.
            self._plot.update(HTML(""))
        elif not self.notebook and self.report is None:
            sys.stderr.write("\n")

    def _eta(self, state) -> tuple[float, float]:
        elapsed = time.time() - self.start_time
        done = state.global_step - self.start_step
        left = state.max_steps - state.global_step
        return elapsed, (elapsed / done * left) if done > 0 else float("nan")

    def _last_loss(self) -> str:
        loss = next((r["loss"] for r in reversed(self.rows) if "loss" in r), None)
        return f"loss {loss:.4f}" if loss is not None else ""

    def _bar_html(self, state) -> str:
        import html

        total = max(state.max_steps, 1)
        elapsed, eta = self._eta(state) if hasattr(self, "start_time") else (0.0, float("nan"))
        eta_s = _duration(eta) if eta == eta else "--:--"
        return (
            f"<div style='font-family:monospace'>{html.escape(self.title)} "
            f"<progress value='{state.global_step}' max='{total}' style='width:40%'></progress> "
            f"{state.global_step}/{total} [{_duration(elapsed)} &lt; {eta_s}] {self._last_loss()}</div>"
        )

    def _show_bar(self, state):
        if self.report is not None:
            loss = next((r["loss"] for r in reversed(self.rows) if "loss" in r), None)
            self.report(state.global_step, state.max_steps, loss)
        elif self.notebook and self._bar is not None:
            from IPython.display import HTML

            self._bar.update(HTML(self._bar_html(state)))
        elif not self.notebook:
            total = max(state.max_steps, 1)
            elapsed, eta = self._eta(state)
            filled = int(30 * state.global_step / total)
            eta_s = _duration(eta) if eta == eta else "--:--"
            sys.stderr.write(
                f"\r{self.title} [{'#' * filled}{'.' * (30 - filled)}] {state.global_step}/{total} "
                f"{_duration(elapsed)}<{eta_s} {self._last_loss()}   "
            )
            sys.stderr.flush()

    def _show_plot(self):
        from IPython.display import Image

        from .plots import loss_png

        png = loss_png(self.rows)
        if png and self._plot is not None:
            self._plot.update(Image(png))


class InterruptGuard:
    """While active, the first SIGINT (Ctrl-C, or the notebook's interrupt button) asks training to stop at
    the end of the current step, so a checkpoint and the adapter are saved; a second one stops at once."""

    def __init__(self):
        self._requested = False
        self._previous = None
        self._stop = None

    @property
    def requested(self) -> bool:
        return self._requested or (self._stop is not None and self._stop.is_set())

    def __enter__(self):
        self._requested = False
        self._stop = getattr(_thread, "stop", None)
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self._requested:
            raise KeyboardInterrupt
        self._requested = True
        print("\nnbalign: interrupt received - stopping after this step and saving (interrupt again to stop now).",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False


class StopOnInterrupt(TrainerCallback):
    def __init__(self, guard: InterruptGuard):
        self.guard = guard

    def on_step_end(self, args, state, control, **kwargs):
        if self.guard.requested:
            control.should_save = True
            control.should_training_stop = True


class AlignmentWatch(TrainerCallback):
    """Measures the evaluation (nbalign.evaluate's metrics) at the start, at `points` steps during training,
    and at the end, and logs it as `watch/<metric>` rows so the live display and metrics.jsonl carry the
    curves. The reference is the model with its adapter switched off, or the trainer's reference model."""

    def __init__(self, data, tokenizer, beta: float, points: int, max_new_tokens: int, folder: Path | None = None,
                 start_model=None):
        self.data, self.tokenizer, self.beta = data, tokenizer, beta
        self.start_model = start_model  # evalcache.StartModel: the untrained model's numbers may be reused
        self.folder = Path(folder) if folder is not None else None
        self.points, self.max_new_tokens = points, max_new_tokens
        self.trainer = None
        self.cache: dict = {}
        self.first: dict | None = None
        self.last: dict | None = None
        self.baseline: dict = {}
        self.failed: str | None = None
        self.seconds = 0.0  # spent measuring: the run's evaluation time, not its training time
        self._at: set[int] = set()

    def bind(self, trainer) -> None:
        self.trainer = trainer

    def reference(self, model):
        from .evaluation import adapter_off, separate

        if hasattr(model, "disable_adapter"):
            return adapter_off(model)
        ref = getattr(self.trainer, "ref_model", None)
        return separate(ref) if ref is not None else None

    def measure(self, model, state, known: dict | None = None) -> dict:
        from .devices import release_heap
        from .evaluation import measure, separate
        from .fastpaths import forget_casts

        # The frozen weights' bf16 copies serve the training steps under autocast; the evaluation runs in fp32 and
        # would hold them beside its own peak (about 210 MiB on the built-in model): made again at the next step.
        forget_casts()
        # What the training steps freed goes back to the system first: glibc keeps it in the heap, and the
        # evaluation's large log-prob chunks (fresh mappings) would land on top of it (SFT, one row per step:
        # 2,225 MiB peak resident without this, 1,910 with it; the training step's own peak is 1,895).
        release_heap()
        model = getattr(model, "module", model)  # unwrap DDP
        reference = self.reference(model)
        start = state.global_step == 0  # before the first step the policy is the reference: cache its numbers
        if reference is None and start:
            reference = separate(model)
        result = measure(model, self.tokenizer, self.data, reference, self.beta, self.max_new_tokens, self.cache,
                         same_as_reference=start, known=known)
        self.log(result, state)
        return result

    def log(self, result: dict, state) -> None:
        logs = {f"watch/{k}": v for k, v in result.items() if isinstance(v, (int, float))}
        if self.trainer is not None:
            state.log_history.append({**logs, "step": state.global_step})
            control = self.trainer.control
            # The handler's on_log clears should_log: keep the trainer's own log of this step (its loss).
            should_log = control.should_log
            self.trainer.callback_handler.on_log(self.trainer.args, state, control, logs)
            control.should_log = should_log

    def guarded(self, what: str, measure) -> None:
        """Runs one measurement; if it fails, the run loses its evaluation, not its training: the error is said
        once, kept for the run's summary, and nothing more is measured."""
        if self.failed is not None:
            return
        start = time.perf_counter()
        try:
            measure()
        except Exception as exc:  # noqa: BLE001 - any failure of the evaluation must not end the training
            self.failed = f"{type(exc).__name__}: {exc}".strip()[:500]
            self._at = set()
            print(f"nbalign: the evaluation failed {what} ({self.failed}). Training goes on without it: this run "
                  "will have no before/after evaluation. Evaluate the finished run with "
                  "nbalign.evaluate(run.path, data), or set `watch: false` to skip the evaluation.", flush=True)
        finally:
            self.seconds += time.perf_counter() - start

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.guarded("before training", lambda: self.start(model, state))

    def start(self, model, state) -> None:
        if state.global_step == 0:
            self.first = self.untrained(model, state)
            self.baseline = self.prompting(model)
            if self.folder is not None:
                runfolder.save_evaluation_start(self.folder, {**self.first, "prompting": self.baseline})
        elif self.folder is not None:  # --resume: the numbers from before training
            self.first = runfolder.read_evaluation_start(self.folder)
            self.baseline = (self.first or {}).pop("prompting", None) or {}
        if self.points and state.max_steps > 1:
            every = state.max_steps / (self.points + 1)
            self._at = {max(1, round(every * (k + 1))) for k in range(self.points)} - {state.max_steps}

    def untrained(self, model, state) -> dict:
        """The first measurement, or the same numbers kept from an earlier run on the same model and data."""
        import dataclasses

        from . import evalcache

        # Not keyed by beta: before the first step every implicit reward is zero, whatever beta is.
        entry = evalcache.entry(self.start_model, "before", dataclasses.replace(self.data, demos=[], source=""),
                                self.max_new_tokens)
        kept = entry.read() if entry is not None else None
        if kept is not None and isinstance(kept.get("first"), dict):
            if kept.get("ref_logps") is not None:
                self.cache["ref_logps"] = kept["ref_logps"]
            self.log(kept["first"], state)
            print("nbalign: the untrained model's numbers on these prompts are reused from an earlier run on the same "
                  f"model files and evaluation data ({entry.path}; NBALIGN_EVAL_CACHE=0 measures them again).",
                  flush=True)
            return kept["first"]
        # The knowledge probe and the general text's perplexity depend on the model alone: a run on other data (or
        # other generation settings) from the same model reuses them (about 10 s of a CPU run's 20-odd).
        own = evalcache.entry(self.start_model, "model", self.data.probe, self.data.general_text)
        known = own.read() if own is not None and (self.data.probe or self.data.general_text) else None
        if known is not None:
            print("nbalign: the untrained model's knowledge probe and general-text perplexity are reused from an "
                  f"earlier run on the same model files ({own.path}; NBALIGN_EVAL_CACHE=0 measures them again).",
                  flush=True)
        elif own is not None and (self.data.probe or self.data.general_text):
            from .devices import release_heap
            from .evaluation import model_measures

            release_heap()
            known = model_measures(getattr(model, "module", model), self.tokenizer, self.data)
            own.write(known)
        first = self.measure(model, state, known=known)
        if entry is not None:
            entry.write({"first": first, "ref_logps": self.cache.get("ref_logps")})
        return first

    def prompting(self, model) -> dict:
        """The cheap ladder first: what the untrained model reaches zero-shot (the first measurement) and with
        k training examples in the prompt, said before training starts."""
        import dataclasses

        from . import evalcache
        from .evaluation import prompting_baseline
        from .results import shown

        model = getattr(model, "module", model)
        entry = evalcache.entry(self.start_model, "prompting", dataclasses.replace(self.data, source=""),
                                self.max_new_tokens)
        baseline = entry.read() if entry is not None else None
        if baseline is None:
            baseline = prompting_baseline(model, self.tokenizer, self.data, self.max_new_tokens)
            if entry is not None:
                entry.write(baseline)
        if baseline:
            zero, n = self.first, baseline.get("n")
            print(f"nbalign: prompting alone on the {n} evaluation prompts: zero-shot {shown(zero, 'form')} in the "
                  f"reference answers' form and {shown(zero, 'content')} with their content; {baseline['k']}-shot "
                  f"(training examples in the prompt) {shown(baseline, 'form')} in form, {shown(baseline, 'content')} "
                  "with the content.", flush=True)
        return baseline

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self._at:
            self.guarded(f"at step {state.global_step}", lambda: self.measure(model, state))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.global_step >= state.max_steps:  # not when stopped early: the user wants it to stop now
            self.guarded("after training", lambda: setattr(self, "last", self.measure(model, state)))
