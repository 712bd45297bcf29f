"""Rewards for %%rlhf: a finished reward model run, or Python functions in the notebook, adapted to TRL's
calling convention.

Python reward functions use TRL's signature, `f(prompts, completions, **kwargs) -> list[float]`, called
with keyword arguments; nbalign passes each function only the arguments it declares (unless it takes
**kwargs), so `def short(completions): ...` works. Extra columns of the prompt data (e.g. a reference
`answer`) arrive as keyword arguments of the same name, one value per completion.

Text or messages: prompts are conversational (the chat template is applied), so TRL hands reward
functions message lists. nbalign gives a function plain strings instead -- `completions` as the answer's
text and `prompts` as the last user message's text -- unless its `completions` parameter is annotated
with a message type (e.g. `completions: list[list[dict]]`) or it comes from the `trl` package (TRL's own
reward functions expect messages). Unannotated, or annotated `list[str]`, means text: what a notebook
function such as `lambda completions, **kw: [-len(c) for c in completions]` expects. Setting
`f.nbalign_text = False` (or True) on a function decides it explicitly.

A value that is not a finite number is refused with the function's name (None marks a completion the
function cannot score, as TRL allows).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from pathlib import Path
from typing import Any

from ..errors import NbalignError
from ..models import check_reward_run
from ..runs import Run
from ..text import assistant_text, last_user_text

WHERE = "%%rlhf"
# Arguments TRL passes every reward function, besides the dataset's own columns.
TRL_REWARD_ARGS = {
    "prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments",
}



class TextReward:
    """A user reward function behind TRL's calling convention: it gets only the arguments it declares, text
    instead of messages unless it asked for messages, and a wrong return value is a clear error."""

    def __init__(self, func, wants_text: bool, params: set[str] | None):
        self.func = func
        self.wants_text = wants_text
        self.params = params  # None: takes **kwargs, so everything is passed
        self.__name__ = getattr(func, "__name__", type(func).__name__)
        functools.update_wrapper(self, func, updated=())

    def _arguments(self, prompts, completions, kwargs) -> dict:
        if self.wants_text:
            prompts = [last_user_text(p) for p in prompts]
            completions = [assistant_text(c) for c in completions]
        values = {"prompts": prompts, "completions": completions, **kwargs}
        if self.params is not None:
            values = {k: v for k, v in values.items() if k in self.params}
        return values

    def _failed(self, exc: Exception) -> NbalignError:
        kind = "strings" if self.wants_text else "message lists ([{'role': 'assistant', 'content': ...}])"
        return NbalignError(
            f"The reward function {self.__name__} raised {type(exc).__name__}: {exc} (it was given completions as "
            f"{kind}).",
            f"fix the function; try it on a few answers first, e.g. {self.__name__}(prompts=['Hi'], "
            "completions=['Hello']).",
        )

    def __call__(self, prompts=None, completions=None, **kwargs):
        try:
            result = self.func(**self._arguments(prompts, completions, kwargs))
        except NbalignError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported as one paragraph naming the function
            raise self._failed(exc) from None
        return _checked_rewards(result, len(completions), self.__name__)


class AsyncTextReward(TextReward):
    """The same for an `async def` reward function (TRL awaits those concurrently)."""

    async def __call__(self, prompts=None, completions=None, **kwargs):
        try:
            result = await self.func(**self._arguments(prompts, completions, kwargs))
        except NbalignError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._failed(exc) from None
        return _checked_rewards(result, len(completions), self.__name__)


def _checked_rewards(result: Any, n: int, name: str) -> list:
    try:
        values = list(result)
    except TypeError:
        values = None
    bad = values is None or len(values) != n or any(
        not (v is None or isinstance(v, (int, float)) or _is_scalar(v)) for v in values
    )
    if bad:
        shown = repr(result)[:80]
        raise NbalignError(
            f"The reward function {name} returned {shown}, but it must return a list of {n} numbers: one reward "
            "per completion (None for a completion it cannot score).",
            f"return e.g. [float(...) for c in completions] from {name}.",
        )
    values = [None if v is None else float(v) for v in values]
    bad = [i for i, v in enumerate(values) if v is not None and not math.isfinite(v)]
    if bad:
        raise NbalignError(
            f"The reward function {name} returned {values[bad[0]]} for completion{'s' if len(bad) > 1 else ''} "
            f"{', '.join(map(str, bad[:8]))} of {n}: a reward that is not a finite number would make the loss "
            "NaN (TRL then trains on nothing and the run looks finished).",
            f"return a finite float for every completion from {name}, or None for one it cannot score.",
        )
    return values


def _is_scalar(v) -> bool:
    try:
        import numpy as np
        import torch

        return (isinstance(v, np.generic) or isinstance(v, torch.Tensor)) and getattr(v, "ndim", 0) == 0
    except ImportError:
        return False


def _wants_text(func, sig: inspect.Signature | None) -> bool:
    explicit = getattr(func, "nbalign_text", None)
    if explicit is not None:
        return bool(explicit)
    module = getattr(func, "__module__", None) or type(func).__module__ or ""
    if module == "trl" or module.startswith("trl."):
        return False
    if sig is None or "completions" not in sig.parameters:
        return True
    note = sig.parameters["completions"].annotation
    if note is inspect.Parameter.empty:
        return True
    text = note if isinstance(note, str) else repr(note)
    return not any(word in text for word in ("dict", "Message", "list[list", "List[List"))


def wrap_function(func, columns: set[str]) -> TextReward:
    """Check a Python reward function's signature against what it will be called with."""
    name = getattr(func, "__name__", type(func).__name__)
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):  # a builtin without a signature: pass everything
        return (AsyncTextReward if _is_async(func) else TextReward)(func, True, None)
    params = sig.parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    available = TRL_REWARD_ARGS | columns
    named = {n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                         inspect.Parameter.KEYWORD_ONLY)}
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_ONLY)
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty and p.kind in plain]
    unknown = [n for n in required if n not in available or params[n].kind is inspect.Parameter.POSITIONAL_ONLY]
    if unknown or not ("completions" in named or takes_kwargs):
        problem = (
            f"its parameter{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)} "
            f"{'are' if len(unknown) > 1 else 'is'} neither `prompts`, `completions` nor a column of the prompt data"
            if unknown else "it has no `completions` parameter, so it would never see the answers"
        )
        raise NbalignError(
            f"{WHERE}: the reward function {name}{sig} cannot be called as TRL calls reward functions: {problem}.",
            f"define it as `def {name}(prompts, completions, **kwargs)` returning one float per completion.",
        )
    kind = AsyncTextReward if _is_async(func) else TextReward
    return kind(func, _wants_text(func, sig), None if takes_kwargs else named)


def _is_async(func) -> bool:
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None))


def _reward_items(reward: Any) -> list:
    if isinstance(reward, (list, tuple)):
        if not reward:
            raise NbalignError(f"{WHERE}: the reward list is empty.", "pass at least one reward function or run.")
        return list(reward)
    return [reward]


def resolve_rewards(reward: Any, columns: set[str] = frozenset()) -> list:
    """Each reward as a Path (a finished reward model run) or a TextReward; errors name the fix."""
    out = []
    for item in _reward_items(reward):
        if isinstance(item, Run):
            item = item.path
        if isinstance(item, (str, Path)):
            text = str(item)
            if not Path(text).expanduser().exists() and (text.isidentifier() or text.replace(".", "").isidentifier()):
                raise NbalignError(
                    f"{WHERE}: the reward '{text}' is neither a notebook function nor a folder.",
                    f"define `def {text}(prompts, completions, **kwargs)` in the notebook before this cell, or pass "
                    "the --out folder of a %%reward_model run.",
                )
            out.append(check_reward_run(text, what="reward"))
        elif callable(item):
            out.append(wrap_function(item, set(columns)))
        else:
            raise NbalignError(
                f"{WHERE}: the reward {item!r} ({'an' if type(item).__name__[0] in 'aeiou' else 'a'} "
                f"{type(item).__name__}) is neither a reward model run folder nor a Python function.",
                "pass --reward runs/rm1 (a %%reward_model run) or --reward my_fn (a function "
                "`f(prompts, completions, **kwargs) -> list[float]` in the notebook); several: --reward f1,f2.",
            )
    return out


def describe_reward(item: Any) -> Any:
    """A reward as spec.json records it: a run folder as its path, a function by module and name (a
    function defined in a notebook cannot be re-imported: replay() asks for it again)."""
    if isinstance(item, Run):
        return str(item.path)
    if isinstance(item, (str, Path)):
        return str(item)
    if callable(item):
        name = getattr(item, "__qualname__", None)
        if isinstance(item, functools.partial) or name is None:
            # Bound arguments or an object's state are not in a name: replay asks for the reward again.
            inner = item.func if isinstance(item, functools.partial) else type(item)
            return {"function": getattr(inner, "__name__", type(item).__name__), "module": None,
                    "kind": "functools.partial" if isinstance(item, functools.partial) else "callable object"}
        return {"function": name, "module": getattr(item, "__module__", None)}
    return item


def import_reward(entry: Any) -> Any:
    """The reward recorded by describe_reward, back as something resolve_rewards takes."""
    if not isinstance(entry, dict) or "function" not in entry:
        return entry
    module, name = entry.get("module"), entry["function"]
    if module and module != "__main__" and "<" not in name:
        try:
            target = importlib.import_module(module)
            for part in name.split("."):
                target = getattr(target, part)
            return target
        except Exception:  # noqa: BLE001 - any failure to import it is reported below as one paragraph
            pass
    where = ("a notebook" if module == "__main__" else f"'{module}', which does not import here" if module
             else f"a {entry.get('kind', 'callable')} whose arguments spec.json does not hold")
    raise NbalignError(
        f"The run's reward function {name} was defined in {where}, so it cannot be loaded again from spec.json.",
        f"pass it again: nbalign.replay(path, out=..., reward={name.split('.')[-1]}) (or put it in a module).",
    )


def describe_rewards(reward: Any) -> Any:
    """spec.json's record of a reward or a list of them (see describe_reward)."""
    return [describe_reward(r) for r in reward] if isinstance(reward, (list, tuple)) else describe_reward(reward)


def import_rewards(recorded: Any) -> Any:
    """The rewards describe_rewards recorded, back as something resolve_rewards takes."""
    return [import_reward(r) for r in recorded] if isinstance(recorded, list) else import_reward(recorded)
