"""PairLabeler and ThumbsLabeler: views over a label store, fed by a CandidateQueue.

anywidget, because keyboard shortcuts need front-end code: 1/2/0/x/s/u act when the widget has focus and never
reach the notebook (JupyterLab's command-mode 1, 2, 0, s... would otherwise change cells). The widget takes the
focus only when the person clicks on it (never when it appears: keys typed in another cell meanwhile stay
there), shows it with an outline, and lets the keys that run cells (Shift/Ctrl/Alt+Enter) and save through.
State lives in synced traitlets and every action is a Python method, so tests and scripts drive the widget
without a browser; the front end only sends {"action", "item", "t"} and Python runs the same method. The next
item is shown only after the label's transaction committed. Model text is data: the front end writes it with
textContent.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Any

import anywidget
import traitlets as t

from ..errors import NbalignError
from ..specs import BUILTIN_MODEL
from .candidates import DEFAULT_MAX_NEW_TOKENS, CandidateQueue, judge_label
from .store import DEFAULT_STORE, Item, LabelStore

_ESM = r"""
const ACTIONS = {  // [action, label, key, icon]
  pair: [["A", "A", "1"], ["B", "B", "2"], ["tie", "tie", "0"], ["both_bad", "both bad", "x"], ["skip", "skip", "s"],
         ["undo", "undo", "u"]],
  single: [["up", "up", "1", "\u{1F44D}"], ["down", "down", "2", "\u{1F44E}"], ["skip", "skip", "s"], ["undo", "undo", "u"]],
};
const SUPPRESS = "data-lm-suppress-shortcuts";  // Lumino (Lab 4, Notebook 7) skips its shortcuts below it
const FIELDS = ["item_id", "prompt", "answer_a", "answer_b", "labelled", "total", "status", "busy", "prelabel",
                "prelabel_text", "notice", "error"];

function part(tag, cls, parent, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text) node.textContent = text;  // model text is data: text nodes only, never parsed as HTML
  parent.appendChild(node);
  return node;
}

function render({ model, el }) {
  const kind = model.get("kind");
  const root = part("div", "nbalign-labeler", el);
  root.tabIndex = 0;  // focused by a click on it (or Tab), never on its own
  root.setAttribute(SUPPRESS, "true");
  root.setAttribute("role", "group");
  root.setAttribute("aria-label", kind === "pair" ? "pick the better answer" : "rate the answer");
  const notice = part("div", "nbalign-notice", root);
  const prompt = part("div", "nbalign-prompt", root);
  const sides = part("div", "nbalign-answers", root), answers = {};
  for (const side of kind === "pair" ? ["a", "b"] : [""]) {
    const box = part("div", "nbalign-side", sides);
    if (side) part("div", "nbalign-side-name", box, side.toUpperCase());
    answers[side || "a"] = part("div", side ? "nbalign-answer nbalign-answer-" + side : "nbalign-answer", box);
  }
  const judge = part("div", "nbalign-judge", root);
  const bar = part("div", "nbalign-buttons", root), buttons = {}, keys = {};
  for (const [action, label, key, icon] of ACTIONS[kind]) {
    const b = part("button", "nbalign-btn", bar);
    b.dataset.action = action;
    b.title = label + " (key " + key + ")";
    if (icon) part("span", "", b, icon + " ").setAttribute("aria-hidden", "true");
    b.appendChild(document.createTextNode(label));
    b.addEventListener("click", () => act(action));
    buttons[action] = b;
    keys[key] = action;
  }
  const hint = part("div", "nbalign-hint", root);
  const progress = part("div", "nbalign-progress", root);
  const status = part("div", "nbalign-status", root);
  status.setAttribute("aria-live", "polite");
  let waiting = null;  // an action sent and not yet answered: no second one meanwhile (double clicks)

  function act(action) {
    const item = model.get("item_id");
    if (waiting || model.get("busy") || (action !== "undo" && item < 0)) return;
    waiting = action;
    sync();
    model.send({ action, item, t: performance.now() });
    root.focus({ preventScroll: true });
  }
  function sync() {
    prompt.textContent = model.get("prompt");
    answers.a.textContent = model.get("answer_a");
    if (answers.b) answers.b.textContent = model.get("answer_b");
    notice.textContent = model.get("notice");
    notice.hidden = !model.get("notice");
    judge.textContent = model.get("prelabel_text");
    judge.hidden = !model.get("prelabel_text");
    progress.textContent = model.get("labelled") + " / " + model.get("total") + " labelled";
    status.textContent = model.get("error") ? "error: " + model.get("error") : model.get("status");
    root.classList.toggle("nbalign-failed", !!model.get("error"));
    const none = model.get("item_id") < 0, hold = !!waiting || model.get("busy");
    for (const [action, b] of Object.entries(buttons)) {
      b.disabled = hold || (none && action !== "undo");
      b.classList.toggle("nbalign-suggested", action === model.get("prelabel"));
    }
  }
  function focused(on) {
    root.classList.toggle("nbalign-keys-on", on);
    hint.textContent = on ? "keys on: " + ACTIONS[kind].map(([, label, key]) => key + " " + label).join(" · ") +
      " (Esc: keys off)" : "click here, then keys " + ACTIONS[kind].map(a => a[2]).join(" / ");
  }
  function onKey(e) {
    if (e.key === "Escape") { root.blur(); return; }
    const action = e.ctrlKey || e.metaKey || e.altKey ? null : keys[e.key.toLowerCase()];
    if (!action) return;
    e.preventDefault();
    e.stopPropagation();  // the notebook's own key handlers never see it
    act(action);
  }
  function onMsg(msg) {
    if (msg && msg.ack !== undefined) { waiting = null; sync(); }
  }
  function letThrough(e) {  // the keys that run cells and save reach the notebook: SUPPRESS lifted for this press
    const run = e.key === "Enter" && (e.shiftKey || e.ctrlKey || e.metaKey || e.altKey);
    if (!root.contains(e.target) || !(run || ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "s"))) return;
    root.removeAttribute(SUPPRESS);
    setTimeout(() => root.setAttribute(SUPPRESS, "true"), 0);
  }
  root.addEventListener("keydown", onKey);
  root.addEventListener("click", e => { if (!e.target.closest("button")) root.focus({ preventScroll: true }); });
  root.addEventListener("focusin", () => focused(true));
  root.addEventListener("focusout", e => focused(root.contains(e.relatedTarget)));
  window.addEventListener("keydown", letThrough, true);  // capture on window: before Lumino's listener
  model.on("msg:custom", onMsg);
  for (const f of FIELDS) model.on("change:" + f, sync);
  sync();
  focused(false);
  return () => { window.removeEventListener("keydown", letThrough, true); model.off("msg:custom", onMsg);
                 for (const f of FIELDS) model.off("change:" + f, sync); };
}

export default { render };
"""

_CSS = """
.nbalign-labeler { font-family: var(--jp-ui-font-family, sans-serif); padding: 6px; border-radius: 4px;
  border: 1px solid var(--jp-border-color2, #ddd); max-width: 1100px; }
.nbalign-labeler:focus { outline: none; }  .nbalign-hint { font-size: 85%; opacity: .7; }
.nbalign-labeler.nbalign-keys-on { outline: 2px solid var(--jp-brand-color1, #1976d2); outline-offset: -2px; }
.nbalign-keys-on .nbalign-hint { opacity: 1; color: var(--jp-brand-color1, #1976d2); }
.nbalign-labeler [hidden] { display: none; }
.nbalign-prompt, .nbalign-answer { white-space: pre-wrap; overflow-wrap: anywhere; }
.nbalign-prompt { font-weight: 600; margin-bottom: 6px; }
.nbalign-answers { display: flex; gap: 8px; }
.nbalign-side { flex: 1; border: 1px solid var(--jp-border-color2, #ddd); border-radius: 4px; padding: 6px;
  max-height: 24em; overflow: auto; }
.nbalign-side-name { font-weight: 700; opacity: .6; }
.nbalign-judge, .nbalign-notice { font-style: italic; margin: 4px 0; }
.nbalign-buttons { display: flex; gap: 4px; margin: 6px 0; flex-wrap: wrap; }
.nbalign-btn { min-width: 3.5em; padding: 3px 10px; cursor: pointer; }
.nbalign-btn.nbalign-suggested { outline: 2px dashed var(--jp-warn-color1, #f57c00); }
.nbalign-progress, .nbalign-status { font-size: 90%; opacity: .8; }
.nbalign-failed .nbalign-status { color: var(--jp-error-color1, #d32f2f); opacity: 1; }
"""


class _Labeler(anywidget.AnyWidget):
    _esm, _css = _ESM, _CSS
    kind = t.Unicode("pair").tag(sync=True)  # pair | single
    item_id = t.Int(-1).tag(sync=True)  # the item shown; -1: none yet (buttons disabled)
    prompt = t.Unicode("").tag(sync=True)
    answer_a = t.Unicode("").tag(sync=True)
    answer_b = t.Unicode("").tag(sync=True)
    labelled = t.Int(0).tag(sync=True)
    total = t.Int(0).tag(sync=True)
    generated = t.Int(0).tag(sync=True)
    status = t.Unicode("").tag(sync=True)
    busy = t.Bool(False).tag(sync=True)  # a label is being written (or a live round trains after it)
    confirmed = t.Int(-1).tag(sync=True)  # id of the last label row that committed
    prelabel = t.Unicode("").tag(sync=True)  # the judge's choice for the item shown, if any
    prelabel_text = t.Unicode("").tag(sync=True)
    notice = t.Unicode("").tag(sync=True)  # a line from outside, e.g. the live trainer's round
    error = t.Unicode("").tag(sync=True)

    _kind = "pair"
    _words: dict = {}  # what may be typed -> the label stored
    # (store file, kind, labeller) -> the labeller made last: a re-run cell closes its previous one (its thread).
    _open: dict = {}

    def __init__(self, prompts: Any, model: Any = BUILTIN_MODEL, store: str | Path | LabelStore | None = None,
                 labeller: str | None = None, sampling: dict | list | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, seed: int = 0, ahead: int = 4):
        self._closed, self._current, self._judge, self._after_label = False, None, None, []
        self._lock = threading.RLock()  # the kernel's thread (clicks) and the candidate thread both update state
        self.store = store if isinstance(store, LabelStore) else LabelStore(store or DEFAULT_STORE, labeller=labeller)
        self.labeller = labeller or self.store.labeller
        self.queue = CandidateQueue(self.store, prompts, model=model, kind=self._kind, labeller=self.labeller,
                                    sampling=sampling, max_new_tokens=max_new_tokens, seed=seed, ahead=ahead, start=False)
        super().__init__(kind=self._kind, total=self.queue.total)
        key = (str(self.store.path.resolve()), self._kind, self.labeller)
        previous = self._open.get(key, lambda: None)()
        if previous is not None:
            previous.close()
        self._open[key] = weakref.ref(self)
        self.on_msg(self._on_front_end)
        self.queue.on_change(self._refresh)
        self._refresh()
        self.queue.start()

    # -- actions ----------------------------------------------------------------------------------------------
    def choose(self, choice: str, item: int | None = None) -> int:
        """Label the item shown (`item`, when given, must be it); returns the label's id once committed."""
        word = self._words.get(str(choice).strip().lower().replace(" ", "_").replace("-", "_"))
        if word is None:
            raise NbalignError(f"'{choice}' is not a label here.", f"use one of {', '.join(dict.fromkeys(self._words.values()))}.")
        with self._lock:
            current = self._current
            if current is None:
                self.queue.check()
                raise NbalignError(f"There is no item to label ({self._status_line()}).",
                                   "wait for the next candidate (labeler.wait()), or label more prompts.")
            if item is not None and item != current.id:
                raise NbalignError(f"Item {item} is not the item shown (item {current.id} is); nothing was labelled.",
                                   "choose again for the item shown (this guards against a double click).")
            self.busy = True
            try:
                label = self.store.label(current.id, word, labeller=self.labeller)
            finally:
                self.busy = False
            self.queue.mark(current)
            with self.hold_sync():
                self.confirmed = label
                self._show(None)
        self.queue.poke()
        if self._after_label:  # e.g. a live-training round between two labels: the buttons wait meanwhile
            self.busy = True
            try:
                for callback in list(self._after_label):
                    callback(label, current, word)
            finally:
                self.busy = False
        return label

    def skip(self, item: int | None = None) -> int:
        return self.choose("skip", item)

    def undo(self, item: int | None = None) -> int | None:
        """Take back this labeller's last label (an `undo` row is appended) and show that item again."""
        with self._lock:
            if item is not None and item != (self._current.id if self._current else -1):
                raise NbalignError(f"Item {item} is not the item shown; nothing was undone.",
                                   "press undo once per label to take back.")
            self.busy = True
            try:
                undone = self.store.undo(self.labeller, kind=self.kind)  # never another kind's label
            finally:
                self.busy = False
            with self.hold_sync():
                back = self.store.item(undone) if undone is not None else None
                if back is not None:
                    self.queue.mark(back, decided=False)
                    self._show(back)
                self.status = "nothing to undo" if undone is None else f"undid the label of item {undone}"
            return undone

    def wait(self, n: int = 1, timeout: float | None = 120) -> int:
        """Block until `n` items are ready to label; raises the generator's error, if it failed."""
        try:
            return self.queue.wait(n, timeout)
        finally:
            self._refresh()

    def on_label(self, callback) -> None:
        """Call callback(label_id, item, choice) after each label has committed (in the thread that labelled)."""
        self._after_label.append(callback)

    def set_models(self, model: Any, sampling: dict | list | None = None) -> None:
        """Candidates not yet generated come from `model` (e.g. the newest round of live training)."""
        self.queue.set_models(model, sampling)
        if not self.queue.finished:
            self.queue.start()

    def close(self) -> None:
        """Stop the candidate thread, free its models, and close the widget."""
        self._closed = True
        if getattr(self, "queue", None) is not None:
            self.queue.close()
            self.store.close()
        super().close()

    # -- data -------------------------------------------------------------------------------------------------
    @property
    def item(self) -> Item | None:
        """The item shown (with its provenance), or None."""
        return self._current

    def pairs(self, **options):
        return self.store.pairs(**options)

    def unpaired(self, **options):
        return self.store.unpaired(**options)

    @property
    def message(self) -> str:
        return self.notice

    @message.setter
    def message(self, text: str) -> None:
        self.notice = text

    @property
    def judge(self):
        """Pre-labels items in the candidate thread, shown for the person to confirm or overturn: for pairs
        anything nbalign's judges take (a model, a %%reward_model run, f(prompt, a, b)); for thumbs
        f(prompt, answer) -> "up" | "down" | (choice, reason) | None. Judge labels already in the store are
        shown without one."""
        return self._judge

    @judge.setter
    def judge(self, judge) -> None:
        self._judge = judge
        self.queue.set_judge(None if judge is None else self._verdicts(judge))

    def _verdicts(self, judge):
        if self.kind == "single":
            return lambda item: judge(item.prompt, item.a)
        from .judge import LMJudge, make_judge

        judge, queue = make_judge(judge), self.queue

        def verdict(item: Item) -> dict:
            nonlocal judge
            if isinstance(judge, LMJudge) and judge.loaded is None:  # the thread's own copy, not the shared cache
                name = judge.name
                judge = LMJudge(queue.model(str(judge.model)), judge.principles, judge.margin, judge.batch_size)
                judge.name = name
            v = judge.compare(item.prompt, item.a, item.b)
            return {"choice": v.choice, "labeller": judge.labeller,
                    "note": {"reason": v.reason, "score": v.score, "judge": judge.kind}}

        return verdict

    # -- display ----------------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        """The candidate thread's news: progress, an error, a judge's pre-label; the next item if none is shown."""
        with self._lock, self.hold_sync():
            if not self._closed:
                self._show(self._current)

    def _show(self, item: Item | None) -> None:
        """Show `item` (None: the first one not decided yet) with its pre-label, progress and status."""
        if item is None:
            item = next(iter(self.queue.pending()), None)
        self._current = item
        self.item_id = item.id if item else -1
        self.prompt = _prompt_text(item.prompt) if item else ""
        self.answer_a, self.answer_b = (item.a, item.b or "") if item else ("", "")
        choice, reason = judge_label(self.store, item.id) if item else (None, None)
        self.prelabel, self.prelabel_text = choice or "", _judge_words(choice, reason) if choice else ""
        self.labelled, self.generated = self.queue.labelled(), self.queue.generated
        self.error = self.queue.problem
        self.status = self._status_line()

    def _status_line(self) -> str:
        q = self.queue
        if q.error is not None:
            return "error: " + q.problem
        if not q.finished:
            return f"generating candidates {q.generated}/{q.total}…"
        return f"done: {self.labelled} labelled" if self._current is None else f"all {q.total} candidates ready"

    def _on_front_end(self, _widget, content: dict, _buffers) -> None:
        action, item, ok, label = content.get("action"), content.get("item"), False, None
        try:
            label = self.undo(item) if action == "undo" else self.choose(action, item)
            ok = True
        except NbalignError as exc:  # a stale click, a label that does not exist here: said in the status line
            with self._lock:
                self.status = exc.problem
        except Exception as exc:  # noqa: BLE001 - shown in the widget: a comm handler's error is otherwise lost
            with self._lock:
                self.error = f"{type(exc).__name__}: {exc}"
        self.send({"ack": action, "item": item, "t": content.get("t"), "ok": ok, "label": label})

    def __repr__(self) -> str:
        head = f"{type(self).__name__} on '{self.store.path}': {self.labelled}/{self.total} labelled · {self.status}"
        item = self._current
        if item is None:
            return head
        lines = [head, f"item {item.id}", "Prompt: " + _prompt_text(item.prompt)]
        lines += ["A: " + item.a, "B: " + (item.b or "")] if item.kind == "pair" else ["Answer: " + item.a]
        lines += [self.prelabel_text] if self.prelabel_text else []
        words = '"A" | "B" | "tie" | "both_bad" | "skip"' if item.kind == "pair" else '"up" | "down" | "skip"'
        return "\n".join(lines + [f"label with .choose({words}); .undo() takes the last one back"])


class PairLabeler(_Labeler):
    """Which of two answers is better: A, B, tie, both bad, or skip (keys 1, 2, 0, x, s; u undoes).
    PairLabeler(prompts, model=BUILTIN_MODEL, store=None, labeller=None, sampling=None, max_new_tokens=96,
    seed=0, ahead=4): `model` is one source (sampled twice) or two (e.g. [base, "runs/x"]); a source is a
    model name, a run folder, {"model": ..., "system": ..., "sampling": {...}} (that model with a system message
    or settings of its own), or a function prompt -> answer."""

    _kind = "pair"
    _words = {"a": "A", "b": "B", "tie": "tie", "both_bad": "both_bad", "skip": "skip"}


class ThumbsLabeler(_Labeler):
    """Is this answer good: up, down, or skip (keys 1, 2, s; u undoes). Same arguments as PairLabeler, with one
    source."""

    _kind = "single"
    _words = {"up": "up", "down": "down", "skip": "skip", "👍": "up", "👎": "down"}

    def up(self, item: int | None = None) -> int:
        return self.choose("up", item)

    def down(self, item: int | None = None) -> int:
        return self.choose("down", item)


def _prompt_text(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else "\n\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)


def _judge_words(choice: str, reason: str | None) -> str:
    said = {"A": "judge prefers A", "B": "judge prefers B", "tie": "judge calls it a tie",
            "both_bad": "judge finds both bad", "up": "judge says up", "down": "judge says down"}.get(choice, f"judge says {choice}")
    return f"{said}: {reason}" if reason else said

