"""Candidates to label, written ahead of the person by one background thread.

A `CandidateQueue` turns prompts into store items: two answers per prompt for a pair (two samples of one model,
or one answer from each of two sources) or one answer for thumbs; a source is as generation.check_source takes
(a model, a model with a system message or sampling of its own, a function). The thread keeps `ahead` undecided
items in the store, so the next one is there when the person clicks. It loads its own models and samples with
its own seeded generator (the global RNG belongs to whatever trains in the main thread).
"""

from __future__ import annotations

import json
import random
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable

from ..errors import NbalignError
from ..generation import answers_from, check_source, model_of
from ..generation import check_sampling as settings
from ..specs import BUILTIN_MODEL
from ..text import plain_prompt
from .store import Item, LabelStore

DEFAULT_SAMPLING = {"do_sample": True, "temperature": 0.8, "top_p": 0.95}
DEFAULT_MAX_NEW_TOKENS = 96
RESAMPLES = 2  # extra tries when two samples of one model come out identical
THREAD_NAME = "nbalign-candidates"


def check_prompts(prompts: Any) -> list:
    """Prompts as strings or message lists, duplicates dropped (a prompt is asked once per store). A one-turn
    user message list is kept as its text, as the store keeps imported prompts, so both resume alike; message
    keys are sorted, so the JSON the store keeps of a prompt is its key."""
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]
    out, seen = [], set()
    for i, p in enumerate(prompts if isinstance(prompts, (list, tuple)) else [prompts]):
        p = plain_prompt(p)
        if not ((isinstance(p, str) and p.strip()) or (isinstance(p, list) and p and all(
                isinstance(m, dict) and m.get("role") and isinstance(m.get("content"), str) for m in p))):
            raise NbalignError(f"Prompt {i} is not a question to answer ({type(p).__name__}: {str(p)[:60]!r}).",
                               "pass a list of prompts, each non-empty text or a list of {'role', 'content'} messages.")
        p = json.loads(prompt_key(p))
        if prompt_key(p) not in seen:
            seen.add(prompt_key(p))
            out.append(p)
    if not out:
        raise NbalignError("There are no prompts to label.", "pass a list of prompts (strings or message lists).")
    return out


def prompt_key(prompt: Any) -> str:
    """As store.Item.prompt_key; for a checked prompt also the JSON text the store keeps (its keys are sorted)."""
    return json.dumps(prompt, sort_keys=True)


def check_sources(model: Any, kind: str) -> list:
    """One source (sampled twice for a pair) or, for pairs, two; each as generation.check_source takes."""
    sources = [str(s) if isinstance(s, Path) else s for s in (model if isinstance(model, (list, tuple)) else [model])]
    if not 1 <= len(sources) <= (2 if kind == "pair" else 1):
        raise NbalignError(
            f"A {'pair' if kind == 'pair' else 'thumbs'} labeller takes {'one or two sources' if kind == 'pair' else 'one source'}, "
            f"not {len(sources)}.", "pass model='smollm2-135m' (two samples each), or model=['smollm2-135m', 'runs/x'] for "
            "base vs tuned answers." if kind == "pair" else "pass one model, run folder or function.")
    for s in sources:
        check_source(s)
    return sources


def check_sampling(sampling: Any, sources: list, kind: str) -> list[dict]:
    """Sampling settings per source: a source's own ("sampling" in its dict), else `sampling` (one dict for all,
    or one per source), else DEFAULT_SAMPLING. Greedy is fine unless both answers come from one model alike."""
    if sampling is None or isinstance(sampling, dict):
        given = [sampling for _ in sources]
    elif isinstance(sampling, (list, tuple)) and len(sampling) == len(sources) and all(isinstance(s, dict) for s in sampling):
        given = list(sampling)
    else:
        raise NbalignError(f"sampling={sampling!r} is not a set of generation settings.",
                           "pass a dict such as {'temperature': 0.8, 'top_p': 0.95}, or one dict per source.")
    own = [s.get("sampling") if isinstance(s, dict) else None for s in sources]
    per = [settings(o if o is not None else DEFAULT_SAMPLING if g is None else g, s)
           for o, g, s in zip(own, given, sources)]
    same = [(model_of(s), s.get("system") if isinstance(s, dict) else None) for s in sources]
    if kind == "pair" and not any(callable(s) or p["do_sample"] for s, p in zip(sources, per)) and same[0] == same[-1]:
        raise NbalignError("Two answers from one model need sampling: greedy decoding writes the same answer twice.",
                           "leave do_sample on (e.g. sampling={'temperature': 0.8}), or compare two sources: "
                           "model=['smollm2-135m', 'runs/x'], or a system message on one side: model=['smollm2-135m', "
                           "{'model': 'smollm2-135m', 'system': 'Answer in one short sentence.'}].")
    return per


class CandidateQueue:
    """Generates the items for `prompts` into `store` in one daemon thread, `ahead` undecided items in front of
    `labeller`. Prompts that already have items of this kind in the store are not generated again (a reopened
    store resumes). `close()` stops the thread and frees its models; so does dropping the queue."""

    def __init__(self, store: LabelStore, prompts: Any, model: Any = BUILTIN_MODEL, kind: str = "pair",
                 labeller: str | None = None, sampling: dict | list | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, seed: int = 0, ahead: int = 4,
                 judge: Callable | None = None, start: bool = True):
        for name, value in (("max_new_tokens", max_new_tokens), ("ahead", ahead)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise NbalignError(f"{name}={value!r} must be a positive whole number.", f"e.g. {name}=4.")
        if kind not in ("pair", "single"):
            raise NbalignError(f"kind={kind!r} is not a kind of item.", "use 'pair' or 'single'.")
        self.store, self.kind, self.labeller = store, kind, labeller or store.labeller
        self.prompts = check_prompts(prompts)
        self.keys = {prompt_key(p) for p in self.prompts}
        self.total = len(self.prompts)
        self.max_new_tokens, self.seed, self.ahead, self.judge = max_new_tokens, seed, ahead, judge
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop, self._wake, self._ended = threading.Event(), threading.Event(), threading.Event()
        self._callbacks: list = []
        self._wants: list[int] = []  # the n of each wait(n) under way: the thread writes that far ahead meanwhile
        self._thread, self._worker = None, None  # threading.Thread, _Worker
        self._given, self._floor = None, 0  # the `sampling` argument last given; pending() looks from item _floor on
        self.set_models(model, sampling)
        have = {it.prompt_key for it in store.items(kind)}
        self._todo = [(i, p) for i, p in enumerate(self.prompts) if prompt_key(p) not in have]
        decided = {prompt_key(json.loads(text)) for text in store.decided_prompts(kind, self.labeller)}
        self._decided = decided & self.keys  # this queue's prompts the labeller has decided: kept by mark()
        weakref.finalize(self, self._stop.set)  # the thread sees it within its 0.5 s tick
        if start:
            self.start()

    # -- what the labeller asks -------------------------------------------------------------------------------
    @property
    def generated(self) -> int:
        """Prompts of this queue that have an item in the store (earlier sessions' included)."""
        return self.total - len(self._todo)

    @property
    def finished(self) -> bool:
        """Every prompt has its item."""
        return not self._todo

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def limit(self) -> int:
        """How many undecided items the thread keeps ready: `ahead`, or n while a wait(n) asks for more."""
        with self._lock:
            return max([self.ahead, *self._wants])

    def pending(self) -> list[Item]:
        """This queue's items the labeller has not decided yet, oldest first (a reopened store's first). One query
        from the oldest item that may be undecided (those before were decided when last looked at; an undo moves
        it back): a click costs the same with 10 labels or 10,000. Finding none (or in wait()): from the start."""
        with self._lock:
            floor = self._floor
        items = self._undecided(floor) or (self._undecided(0) if floor else [])
        with self._lock:
            if self._floor == floor:  # (not if an undo moved it meanwhile)
                self._floor = items[0].id if items else floor
        return items

    def _undecided(self, floor: int) -> list[Item]:
        return [it for it in self.store.undecided(self.kind, self.labeller, start=floor) if it.prompt_key in self.keys]

    def labelled(self) -> int:
        """This queue's prompts the labeller has decided: read when the queue opened, then kept by mark()."""
        return len(self._decided)

    def mark(self, item: Item, decided: bool = True) -> None:
        """The labeller decided `item` (or, decided=False, took the decision back)."""
        with self._lock:
            if item.prompt_key in self.keys:
                (self._decided.add if decided else self._decided.discard)(item.prompt_key)
            if not decided:
                self._floor = min(self._floor, item.id)

    def check(self) -> None:
        """Raise the thread's error, if it failed, as one NbalignError paragraph."""
        exc = self.error
        if isinstance(exc, NbalignError):
            raise NbalignError(f"Generating candidates stopped: {exc.problem}", exc.fix) from exc
        if exc is not None:
            raise NbalignError(
                f"Generating candidates stopped on an error: {type(exc).__name__}: {exc}",
                "the labels given so far are safe in the store; fix the model or function that failed and re-run "
                "the cell (it resumes where it stopped).") from exc

    @property
    def problem(self) -> str:
        """The thread's error as check() words it, or ""."""
        try:
            return self.check() or ""
        except NbalignError as exc:
            return exc.message

    def wait(self, n: int = 1, timeout: float | None = 120) -> int:
        """Block until `n` undecided items are ready (or every prompt has its item); returns how many are ready.
        Meanwhile the thread writes up to n items ahead, even past `ahead`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._wants.append(n)
            self._floor = 0  # look from the start: a label taken back elsewhere (store.undo()) shows again
        self.poke()
        try:
            while True:
                ready = len(self.pending())
                if ready >= n or self.finished:
                    return ready
                self.check()
                if self._stop.is_set():
                    raise NbalignError("This labeller is closed: it generates nothing more.", "create a new one.")
                self.start()
                if deadline is not None and time.monotonic() > deadline:
                    raise NbalignError(
                        f"Only {ready} of the {n} items asked for were ready to label after {timeout} s "
                        f"({self.generated} of {self.total} prompts have their candidates).",
                        "wait longer (timeout=...), or lower max_new_tokens so each answer is quicker.")
                self._ended.wait(0.05)
        finally:
            with self._lock:
                self._wants.remove(n)

    # -- control ------------------------------------------------------------------------------------------------
    def set_models(self, model: Any, sampling: dict | list | None = None) -> None:
        """Later candidates come from these sources; items already in the store keep their provenance. Without
        `sampling`, the settings given before stay (when one set served every source)."""
        if sampling is None:
            sampling = self._given
            if isinstance(sampling, (list, tuple)):  # one per source: kept when one set served every source
                sampling = sampling[0] if all(s == sampling[0] for s in sampling) else None
        sources = check_sources(model, self.kind)
        per = check_sampling(sampling, sources, self.kind)
        with self._lock:
            self.sources, self.sampling, self._given = sources, per, sampling
        self.poke()

    def set_judge(self, judge: Callable | None) -> None:
        """judge(item) -> None (no opinion) | choice | (choice, reason) | {"choice", "reason" or "note",
        "labeller"}: run in the thread on each undecided item without a judge label; stored with origin judge."""
        self.judge = judge
        if judge is not None:
            self.start()
        self.poke()

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback()` (from the thread) after each new item, judgement, error and at the end. Held weakly."""
        self._callbacks.append(weakref.WeakMethod(callback) if hasattr(callback, "__self__") else weakref.ref(callback))

    def poke(self) -> None:
        """Something changed (a label, new sources): the thread looks again now instead of at its next tick."""
        self._wake.set()

    def start(self) -> None:
        """Start the thread, unless it runs or the queue is closed (a failed one restarts: error cleared)."""
        if self.running or self._stop.is_set():
            return
        self.error = None
        self._ended.clear()
        self._worker = _Worker(self)
        self._thread = threading.Thread(target=self._worker.run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def close(self, timeout: float = 60) -> None:
        """Stop the thread (it abandons the answer it is writing) and free its models."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def model(self, name: str):
        """(model, tokenizer) of `name` as the thread holds it (loaded once, kept till close): for a judge the
        thread runs. Only callable from the thread."""
        if threading.current_thread() is not self._thread:
            raise RuntimeError("CandidateQueue.model() is for code running in the candidate thread")
        return self._worker.load(name, keep=True)

    def _notify(self) -> None:
        self._callbacks = [ref for ref in self._callbacks if ref() is not None]
        for ref in list(self._callbacks):
            (ref() or (lambda: None))()


class _Worker:
    """The thread's side: it holds the queue weakly (a forgotten queue stops its thread) and owns the models."""

    def __init__(self, queue: CandidateQueue):
        self.queue = weakref.ref(queue)
        self.stop, self.wake, self.ended, self.store = queue._stop, queue._wake, queue._ended, queue.store
        self.models: dict[str, tuple] = {}  # cache key -> (model, tokenizer): one copy per distinct source
        self.kept: set[str] = set()  # keys a judge asked for: not freed when the sources change
        self.abstained: set[int] = set()  # items the judge had no opinion on: not asked again (by that judge)
        self.judged: set[int] = set()  # items seen with a judge label
        self.judge: Callable | None = None  # the judge `abstained` is about

    def run(self) -> None:
        from ..devices import free_memory

        try:
            while not self.stop.is_set():
                queue = self.queue()
                if queue is None or not self.step(queue):
                    break
                del queue
                self.wake.wait(0.5)
                self.wake.clear()
        except BaseException as exc:  # noqa: BLE001 - kept for the widget and re-raised by check()/wait()
            queue = self.queue()
            if queue is not None:
                queue.error = exc
        finally:
            if self.models:
                self.models.clear()
                free_memory()
            self.ended.set()
            queue = self.queue()
            if queue is not None and not self.stop.is_set():
                queue._notify()
            del queue
            self.store.close()  # this thread's connection

    def step(self, queue: CandidateQueue) -> bool:
        """Judge or generate what is due; True to look again after a wait, False when all is done."""
        while not self.stop.is_set():
            if queue.judge is not None and self.judge_one(queue):
                continue
            with queue._lock:
                todo, sources, sampling = list(queue._todo), list(queue.sources), list(queue.sampling)
            self.keep_models(sources)
            if not todo:
                return queue.judge is not None  # stay to judge the items still to come, else done
            if len(queue.pending()) >= queue.limit:
                return True
            index, prompt = todo[0]
            made = self.store._connect().execute("SELECT 1 FROM items WHERE kind = ? AND prompt = ?",
                                                 (queue.kind, json.dumps(prompt))).fetchone()
            if not made:  # (another labeller's thread may have made it)
                item = self.make(queue, index, prompt, sources, sampling)
                if item is None or self.stop.is_set():
                    return False
                # Checked again in the insert's transaction: two labellers of one prompt list get one item.
                self.store.add_items([item], skip_existing=True)
            with queue._lock:
                queue._todo = [t for t in queue._todo if t[0] != index]
            queue._notify()
        return False

    def judge_one(self, queue: CandidateQueue) -> bool:
        """Pre-label one undecided item the judge has not seen; True if one was labelled."""
        if queue.judge is not self.judge:
            self.judge, self.abstained = queue.judge, set()
        for item in queue.pending():
            if item.id in self.judged or item.id in self.abstained:
                continue
            if judge_label(self.store, item.id)[0] is not None:  # judged before (another session, another judge)
                self.judged.add(item.id)
                continue
            verdict = queue.judge(item)
            if verdict is None:
                self.abstained.add(item.id)
                continue
            if not isinstance(verdict, dict):
                verdict = dict(zip(("choice", "reason"), verdict if isinstance(verdict, tuple) else (verdict,)))
            note = verdict.get("note") or ({"reason": verdict["reason"]} if verdict.get("reason") else None)
            self.store.label(item.id, verdict["choice"], labeller=verdict.get("labeller", "judge"), origin="judge",
                             note=note)
            self.judged.add(item.id)
            queue._notify()
            return True
        return False

    def make(self, queue: CandidateQueue, index: int, prompt: Any, sources: list, sampling: list[dict]) -> dict | None:
        """The item for one prompt, or None when stopped mid-way."""
        rng = random.Random(f"{queue.seed}:{index}")  # per prompt: the same item whatever order it is made in
        seed, tokens = rng.randrange(2**31), queue.max_new_tokens
        if queue.kind == "single":
            answer, source = answers_from(sources[0], prompt, 1, self.load, seed, sampling[0], tokens, self.stop)
            return None if answer is None else {"kind": "single", "prompt": prompt, "a": answer[0], "source_a": source}
        if len(sources) == 1:
            for attempt in range(RESAMPLES + 1):
                answers, source = answers_from(sources[0], prompt, 2, self.load, seed + attempt, sampling[0], tokens,
                                               self.stop)
                if answers is None or answers[0].strip() != answers[1].strip():
                    break
            if answers is None:
                return None
            (first, second), extra = answers, {"resampled": attempt} if attempt else {}
            source_first, source_second = dict(source, sample=0, **extra), dict(source, sample=1, **extra)
        else:
            got = [answers_from(s, prompt, 1, self.load, seed, sm, tokens, self.stop) for s, sm in zip(sources, sampling)]
            if any(a is None for a, _ in got):
                return None
            ((first,), source_first), ((second,), source_second) = got
        swapped = rng.random() < 0.5
        a, b, sa, sb = (second, first, source_second, source_first) if swapped else (first, second, source_first, source_second)
        return {"kind": "pair", "prompt": prompt, "a": a, "b": b, "source_a": sa, "source_b": sb, "swapped": swapped}

    def load(self, name: str, keep: bool = False):
        from ..generation import cache_key, load_for_inference

        key = cache_key(name)
        if key not in self.models:
            self.models[key] = load_for_inference(name)
        if keep:
            self.kept.add(key)
        return self.models[key]

    def keep_models(self, sources: list) -> None:
        """Free the models of sources no longer used (set_models swapped them)."""
        from ..devices import free_memory
        from ..generation import cache_key

        keep = {cache_key(model_of(s)) for s in sources if not callable(s)} | self.kept
        gone = [k for k in self.models if k not in keep]
        for k in gone:
            del self.models[k]
        if gone:
            free_memory()


def judge_label(store: LabelStore, item_id: int) -> tuple[str | None, str | None]:
    """The judge's standing pre-label of one item and its reason, or (None, None)."""
    choice, note = store.judge_label(item_id)
    return choice, note.get("reason")
