"""The objects users hold for runs on disk: Run (spec, status, metrics, weights, display) and RewardModel
(a finished %%reward_model run that scores answers). They read the folder through runfolder.py."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from . import runfolder
from .clock import describe_times
from .errors import NbalignError


class Run:
    """A training run on disk: its spec, status, metrics and weights."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not runfolder.is_run_folder(self.path):
            raise NbalignError(
                f"'{self.path}' is not an nbalign run folder (it needs spec.json and status.json).",
                "pass the --out folder of a run; `%nbalign runs` lists them.",
            )

    # --- what is on disk -------------------------------------------------------------------------
    @property
    def spec(self) -> dict:
        return runfolder.read_spec(self.path)

    @property
    def method(self) -> str:
        return self.spec.get("method", "?")

    @property
    def status(self) -> str:
        return runfolder.read_status(self.path).get("status", "unknown")

    @property
    def message(self) -> str | None:
        return runfolder.read_status(self.path).get("message")

    @property
    def summary(self) -> dict:
        return runfolder.read_status(self.path).get("summary", {})

    @property
    def metrics(self):
        """One row per logged step, as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(runfolder.read_metrics(self.path))

    # --- using the weights -----------------------------------------------------------------------
    def _check_finished(self) -> None:
        if self.status != "finished":
            raise NbalignError(
                f"The run '{self.path}' is {self.status}; its final weights were not saved.",
                "finish it with --resume, or load the interrupted adapter explicitly from its adapter/ folder.",
            )

    def generate(self, prompt: Any, max_new_tokens: int = 128, **kwargs) -> str | list[str]:
        """Answer `prompt` (a string, a message list, or a list of either) with the tuned model."""
        from .generation import generate

        self._check_finished()
        return generate(str(self.path), prompt, max_new_tokens=max_new_tokens, **kwargs)

    def evaluate(self, data: Any, **options):
        """Held-out preference accuracy, margins, KL to the reference, answer length and perplexity, before
        (the reference) and after (this run): see nbalign.evaluate."""
        from .evaluation import evaluate

        return evaluate(str(self.path), data, **options)

    def export(self, target: str | Path, merged: bool = True, gguf_type: str = "f16", dtype: str = "float32") -> Path:
        """The tuned model for other tools: a folder of merged safetensors (`merged=True`, loadable by
        AutoModelForCausalLM.from_pretrained), the adapter alone (`merged=False`), or a GGUF file for
        llama.cpp-based tools (`target` ending in .gguf; gguf_type f16 or q8_0). Checked by loading it back."""
        from .export import export

        self._check_finished()
        return export(self.path, target, merged=merged, gguf_type=gguf_type, dtype=dtype)

    @property
    def evaluation(self):
        """The evaluation measured at the end of training, or None."""
        from .results import load

        return load(self.path)

    def _plot_png(self) -> bytes | None:
        from .plots import loss_png

        return loss_png(runfolder.read_metrics(self.path), title=self.path.name)

    # --- display ---------------------------------------------------------------------------------
    def __repr__(self) -> str:
        s = self.summary
        extra = f", train_loss={s['train_loss']:.4f}" if "train_loss" in s else ""
        return f"Run({str(self.path)!r}, method={self.method!r}, status={self.status!r}{extra})"

    @property
    def card(self) -> str | None:
        """The run's model card (README.md), or None before it is written."""
        return _card(self.path)

    def _card_html(self) -> str:
        card = self.card
        if card is None:
            return ""
        return ("<details><summary>model card (README.md)</summary><pre style='white-space:pre-wrap'>"
                f"{html.escape(card)}</pre></details>")

    def _repr_html_(self) -> str:
        import base64

        status = runfolder.read_status(self.path)
        spec = self.spec
        rows = {
            "status": status.get("status", "unknown") + (f" - {status['message']}" if status.get("message") else ""),
            "model": spec.get("spec", {}).get("model"),
            "adapter": spec.get("adapter_description"),
            "device": spec.get("device"),
            "data": (spec.get("spec", {}).get("data") or {}).get("summary")
            if isinstance(spec.get("spec", {}).get("data"), dict) else None,
        }
        summary = dict(status.get("summary", {}))
        if isinstance(summary.get("time_s"), dict):  # where the time went, first
            rows = {"status": rows.pop("status"), "time": describe_times(summary.pop("time_s")), **rows}
        rows.update({k: _fmt(v) for k, v in summary.items()})
        table = "".join(
            f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(str(k))}</th>"
            f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>"
            for k, v in rows.items()
            if v is not None
        )
        png = self._plot_png()
        img = f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}'/>" if png else ""
        evaluation = self.evaluation
        return (
            f"<div><b>nbalign {html.escape(self.method)} run</b> <code>{html.escape(str(self.path))}</code>"
            f"<div style='display:flex;gap:1em;align-items:flex-start'><table>{table}</table>{img}</div>"
            + (evaluation._repr_html_() if evaluation is not None else "")
            + self._card_html()
            + "</div>"
        )


def _card(path: Path) -> str | None:
    card = path / runfolder.CARD
    return card.read_text(encoding="utf-8") if card.is_file() else None


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.4g}"
    return v


def _is_single(value: Any) -> bool:
    """A string or one message list (not a list of prompts)."""
    return isinstance(value, str) or (isinstance(value, list) and bool(value) and isinstance(value[0], dict))


class RewardModel(Run):
    """A finished %%reward_model run: `score(prompt, response)` rates answers, `accuracy(pairs)` checks it on
    held-out pairs. The model is loaded once and kept (one model at a time, shared with generation)."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        if self.method != "reward_model":
            raise NbalignError(
                f"'{self.path}' is a %%{self.method} run, not a %%reward_model run: it has no score head.",
                f"use nbalign.Run('{self.path}') for it, or pass the folder of a %%reward_model run.",
            )

    def _loaded(self):
        from .generation import CACHE, cache_key
        from .models import check_reward_run, load_reward_model

        check_reward_run(self.path)
        return CACHE.get(cache_key(self.path, "reward"), lambda: load_reward_model(self.path))

    def score(self, prompt: Any, response: Any, batch_size: int = 8) -> float | list[float]:
        """The reward of `response` to `prompt`. Each may be a string or a message list; pass lists of them to
        score many at once (one prompt with a list of responses scores each response to that prompt)."""
        from .scoring import reward_input_ids, score_ids
        from .text import as_messages

        single = _is_single(prompt) and _is_single(response)
        prompts = [prompt] if _is_single(prompt) else list(prompt)
        responses = [response] if _is_single(response) else list(response)
        if len(prompts) == 1 and len(responses) > 1:
            prompts = prompts * len(responses)
        if len(prompts) != len(responses):
            raise NbalignError(
                f"score() got {len(prompts)} prompts and {len(responses)} responses.",
                "pass one response per prompt, or one prompt with a list of responses.",
            )
        if not prompts:
            return []
        model, tokenizer = self._loaded()
        ids = [
            reward_input_ids(tokenizer, as_messages(p, "user", i, "prompts"), as_messages(r, "assistant", i, "responses"))
            for i, (p, r) in enumerate(zip(prompts, responses))
        ]
        scores = score_ids(model, tokenizer, ids, batch_size)
        return scores[0] if single else scores

    def accuracy(self, pairs: Any, batch_size: int = 8) -> dict:
        """Pairwise accuracy and mean margin (score(chosen) - score(rejected)) on preference pairs in any
        format %%reward_model accepts."""
        from .evaluation import reward_accuracy
        from .generation import CACHE

        return reward_accuracy(self.path, pairs, batch_size, cache=CACHE)

    def __repr__(self) -> str:
        s = self.summary
        acc = next(((k, v) for k, v in s.items() if k.endswith("_accuracy")), None)
        extra = f", {acc[0]}={acc[1]:.3f}" if acc else ""
        return f"RewardModel({str(self.path)!r}, status={self.status!r}{extra})"


def list_runs(root: str | Path = "runs"):
    """Past runs under `root` (newest first) as a DataFrame: what `%nbalign runs` shows."""
    import pandas as pd

    rows = []
    for folder in runfolder.find_runs(root) if Path(root).is_dir() else []:
        spec = runfolder.read_spec(folder)
        status = runfolder.read_status(folder)
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
