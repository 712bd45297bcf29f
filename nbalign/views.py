"""Trying results by eye: `compare` (answers of several models side by side) and `chat` (a chat box).

Both generate through generation.py, the one generation path with its bounded model cache, so comparing
three runs and then chatting with one of them loads each model once. Model text is data: it is escaped
wherever it is shown.
"""

from __future__ import annotations

import functools
import html
from pathlib import Path
from typing import Any

from . import runfolder
from .errors import NbalignError


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return str(prompt[-1].get("content", ""))
    if isinstance(prompt, dict):
        if "messages" in prompt:
            return _prompt_text([m for m in prompt["messages"] if m.get("role") != "assistant"])
        if "prompt" in prompt:
            return _prompt_text(prompt["prompt"])
    raise NbalignError(f"compare: a prompt must be a string, a message list, or a row with `prompt` or `messages`, "
                       f"got {type(prompt).__name__}.", "pass e.g. ['What is the capital of France?', ...].")


def _asked(prompt: Any):
    """What the model is asked: a string, or the conversation up to (not including) the answer."""
    if isinstance(prompt, dict):
        if "messages" in prompt:
            turns = prompt["messages"]
            return turns[:-1] if turns and turns[-1].get("role") == "assistant" else turns
        return prompt["prompt"]
    return prompt


def _facts(model: str) -> dict:
    """What a run says about itself: method, status and its evaluation's headline numbers."""
    path = Path(model)
    if not runfolder.is_run_folder(path):
        return {}
    from .results import load

    facts = {"method": runfolder.read_spec(path).get("method"), "status": runfolder.read_status(path).get("status")}
    evaluation = load(path)
    if evaluation is not None and hasattr(evaluation, "summary"):
        facts.update({k: v for k, v in evaluation.summary().items() if not k.endswith("_prompting")})
    return facts


def compare(models: list[str], prompts: list, max_new_tokens: int = 96, **kwargs):
    """Greedy answers of each model (a name, a model folder or a run folder) to each prompt, side by side.
    Returns a DataFrame (one row per prompt: the prompt, then each model's answer) that shows itself as a table
    with each answer's length and each run's evaluation numbers above its column."""
    from .generation import generate

    models = [str(m) for m in models]
    if not models or len(set(models)) != len(models):
        raise NbalignError("compare: give a list of different models or runs to compare.",
                           "e.g. nbalign.compare(['smollm2-135m', 'runs/json-sft'], prompts).")
    prompts = list(prompts)
    if not prompts:
        raise NbalignError("compare: there are no prompts to answer.", "pass a list of prompts.")
    texts = [_prompt_text(p) for p in prompts]
    asked = [_asked(p) for p in prompts]
    columns = {"prompt": texts}
    for model in models:
        columns[model] = generate(model, asked, max_new_tokens=max_new_tokens, **kwargs)
    frame = _comparison_class()(columns)
    frame.attrs["facts"] = {m: _facts(m) for m in models}
    return frame


@functools.cache
def _comparison_class():
    import pandas as pd

    class Comparison(pd.DataFrame):
        """A DataFrame of answers that renders side by side, escaped."""

        @property
        def _constructor(self):
            return Comparison

        def _repr_html_(self) -> str:
            models = [c for c in self.columns if c != "prompt"]
            facts = self.attrs.get("facts", {})
            head = "".join(
                f"<th style='text-align:left;vertical-align:top'>{html.escape(str(m))}"
                + "".join(f"<div style='font-weight:normal;font-size:85%'>{html.escape(str(k))}: "
                          f"{html.escape(str(v))}</div>" for k, v in facts.get(m, {}).items())
                + "</th>" for m in models)
            rows = []
            for _, row in self.iterrows():
                cells = "".join(
                    f"<td style='text-align:left;vertical-align:top;white-space:pre-wrap'>{html.escape(str(row[m]))}"
                    f"<div style='color:#888;font-size:85%'>{len(str(row[m]).split())} words</div></td>"
                    for m in models)
                rows.append(f"<tr><td style='text-align:left;vertical-align:top'><b>"
                            f"{html.escape(str(row['prompt']))}</b></td>{cells}</tr>")
            return ("<table class='nbalign-compare'><thead><tr><th style='text-align:left'>prompt</th>"
                    f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")

    return Comparison


class Chat:
    """A small chat box for one model: the conversation is kept across turns and sent through the model's chat
    template each time. `send(text)` does what the button does, so it can be driven from Python."""

    def __init__(self, model: str, max_new_tokens: int = 128, system: str | None = None, **kwargs):
        import ipywidgets as widgets

        self.model, self.max_new_tokens, self.kwargs = str(model), max_new_tokens, kwargs
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.log = widgets.HTML(value=self._render())
        self.text = widgets.Text(placeholder="Say something and press Enter", layout=widgets.Layout(width="70%"))
        self.button = widgets.Button(description="Send", button_style="primary")
        self.clear_button = widgets.Button(description="New chat")
        self.button.on_click(lambda _: self.send(self.text.value))
        self.clear_button.on_click(lambda _: self.clear())
        self.text.continuous_update = False
        self.text.observe(lambda change: self.send(change["new"]) if change["new"] else None, names="value")
        self.widget = widgets.VBox([widgets.HTML(f"<b>chat with {html.escape(self.model)}</b>"), self.log,
                                    widgets.HBox([self.text, self.button, self.clear_button])])

    def send(self, text: str) -> str:
        """Add the user's turn, answer it with the model (the whole conversation as context) and show both."""
        from .generation import generate

        text = str(text).strip()
        if not text:
            return ""
        self.messages.append({"role": "user", "content": text})
        self.text.value = ""
        try:
            answer = generate(self.model, [list(self.messages)], max_new_tokens=self.max_new_tokens, **self.kwargs)[0]
        except BaseException:  # an error or an interrupt: no unanswered turn left behind to send twice in a row
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": answer})
        self.log.value = self._render()
        return answer

    def clear(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.log.value = self._render()

    def _render(self) -> str:
        turns = [m for m in self.messages if m["role"] != "system"]
        if not turns:
            return "<div style='color:#888'>No messages yet.</div>"
        return "".join(
            f"<div style='margin:4px 0;white-space:pre-wrap'><b>{'you' if m['role'] == 'user' else 'model'}:</b> "
            f"{html.escape(m['content'])}</div>" for m in turns)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def chat(model: str, max_new_tokens: int = 128, system: str | None = None, **kwargs) -> Chat:
    """A chat box for trying `model` (a name, a model folder or a run) by hand; multi-turn."""
    return Chat(model, max_new_tokens=max_new_tokens, system=system, **kwargs)
