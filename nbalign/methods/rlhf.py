"""%%rlhf: online RL with TRL's GRPOTrainer or RLOOTrainer. The policy answers the prompts, a reward model
run or Python functions score the answers, and the policy moves towards high reward with a KL penalty to
the reference.

The reference: with an adapter (LoRA, DoRA, QLoRA) it is the policy with the adapter switched off, i.e. the
model the run started from, so no second copy is loaded; full fine-tuning loads a frozen second copy.

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

A reward model run is loaded as one SequenceClassification model (base, parents and its adapter merged)
and handed to TRL with its own tokenizer, which renders prompt + answer with the chat template exactly as
the reward model was trained on (see methods/reward.py). Rewards are summed (TRL's `reward_weights` to
weigh them) and logged per source as rewards/<name>/mean.
"""

from __future__ import annotations

import functools
import inspect
import math
from pathlib import Path
from typing import Any

from ..data import SYNONYMS, _as_messages, _rows, load_records, prompt_lengths, prompt_text
from ..errors import NbalignError
from ..runs import Run
from ..specs import RLHFSpec
from . import base

WHERE = "%%rlhf"
PROMPT_FORMAT = "a list of prompt strings, or rows with a `prompt` column (text or a message list)"
# Arguments TRL passes every reward function, besides the dataset's own columns.
TRL_REWARD_ARGS = {
    "prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments",
}
# The logged curves (TRL 1.16 key names): mean reward, KL to the reference, mean answer length in tokens.
REWARD_KEY, KL_KEY, LENGTH_KEY = "reward", "kl", "completions/mean_length"


# ----------------------------------------------------------------------------------------------------
# Rewards: a reward model run, Python functions, or a mix.


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
            prompts = [_prompt_text(p) for p in prompts]
            completions = [_completion_text(c) for c in completions]
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


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else "".join(m["content"] for m in prompt)


def _completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")


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
    return [None if v is None else float(v) for v in values]


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
    from .reward import check_reward_run

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


# ----------------------------------------------------------------------------------------------------
# Prompts.


def to_prompts(data: Any, what: str = "prompts") -> list[dict]:
    """Rows {"prompt": [...messages], **other columns}: from a list of strings, or rows with `prompt` (text or
    messages), or `messages` conversations (everything before the last assistant turn is the prompt)."""
    if isinstance(data, (list, tuple)) and data and all(isinstance(x, str) for x in data):
        data = [{"prompt": x} for x in data]
    records = load_records(data, what)
    out = []
    for i, row in enumerate(records):
        if "prompt" in row:
            prompt = _as_messages(row["prompt"], "user", i, what)
        elif "messages" in row:
            messages = _as_messages(row["messages"], "user", i, what)
            while messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            prompt = messages
        else:
            columns = sorted({k for r in records for k in r})
            renames = {c: "prompt" for c in columns if SYNONYMS.get(c.lower()) == "prompt"}
            raise NbalignError(
                f"The {what} have columns {columns}, but %%rlhf needs {PROMPT_FORMAT}.",
                f"rename the column, e.g. df.rename(columns={renames!r})." if renames else f"give {PROMPT_FORMAT}.",
            )
        if not prompt or not "".join(m["content"] for m in prompt).strip():
            raise NbalignError(f"Row {i} of the {what} has an empty prompt.", "fill it in or drop it.")
        extra = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
        out.append({"prompt": prompt, **extra})
    return out


def _check_lengths(rows: list[dict], tokenizer, spec: RLHFSpec, what: str) -> None:
    lengths = prompt_lengths(rows, tokenizer)
    room = spec.max_length - spec.max_completion_length
    long = [i for i, n in enumerate(lengths) if n > room]
    if long:
        raise NbalignError(
            f"{WHERE}: the prompts of rows {_rows(long)} of the {what} take up to {max(lengths[i] for i in long)} "
            f"tokens, which with max_completion_length {spec.max_completion_length} exceeds max_length "
            f"{spec.max_length}.",
            f"raise --max-length to {max(lengths) + spec.max_completion_length}, or shorten those prompts.",
        )


# ----------------------------------------------------------------------------------------------------
# The method.


class RLHF(base.Method):
    name = "rlhf"

    def __init__(self, spec: RLHFSpec):
        self.algorithm = spec.algorithm
        self.rewards: list = []
        self.n_prompts = 0
        self.watch = None
        self.eval_prompts = []

    @property
    def config_class(self):
        from trl import GRPOConfig, RLOOConfig

        return GRPOConfig if self.algorithm == "grpo" else RLOOConfig

    def build_datasets(self, spec: RLHFSpec, tokenizer):
        from datasets import Dataset

        def prepare(data, what):
            rows = to_prompts(data, what)
            _check_lengths(rows, tokenizer, spec, what)
            if not getattr(tokenizer, "chat_template", None):  # a base model: plain-text prompts
                rows = [{**r, "prompt": prompt_text(tokenizer, r["prompt"])} for r in rows]
            return rows

        train = prepare(spec.data, "prompts")
        self.n_prompts = len(train)
        columns = {k for r in train for k in r if k != "prompt"}
        # Checked here, before the run folder is written: a bad reward fails at once.
        self.rewards = resolve_rewards(spec.reward, columns)
        evals = prepare(spec.eval_data, "eval prompts") if spec.eval_data is not None else None
        # The evaluation at the start and the end: answers, their length, KL and perplexity (no pairs here).
        self.eval_source = "held-out" if evals else "training prompts (no eval_data given)"
        self.eval_prompts = [r["prompt"] for r in (evals or train)[:16] if isinstance(r["prompt"], list)]
        return Dataset.from_list(train), (Dataset.from_list(evals) if evals else None), len(train)

    def extra_callbacks(self, plan: base.Plan) -> list:
        from ..callbacks import AlignmentWatch
        from ..evaluation import EvalData, general_texts

        if not self.eval_prompts:
            return []
        data = EvalData(general_text=general_texts(None), source=self.eval_source, prompt_list=self.eval_prompts)
        self.watch = AlignmentWatch(data, plan.tokenizer, plan.spec.beta, 0, plan.spec.max_completion_length,
                                    folder=plan.out)
        return [self.watch]

    def config_defaults(self, spec: RLHFSpec, device, adapter, steps: int) -> dict:
        # base.planned_steps counts prompts, not answers: size the intervals on the real step count.
        steps = self.planned_steps(spec, self.n_prompts, base.checked_trl_fields(self, spec))
        values = base.common_defaults(spec, device, steps)
        del values["dataset_num_proc"]  # GRPOConfig and RLOOConfig have no such field
        values.update({
            # LoRA on the built-in model (measured): 1e-4 barely moves it in 12 steps (KL 0.01), 3e-4 halves the
            # answer length for a brevity reward in 10 steps (KL < 0.3), 5e-4 starts to garble answers.
            "learning_rate": spec.learning_rate or (1e-6 if adapter.type == "full" else 1e-4),
            "num_generations": spec.num_generations,
            "max_completion_length": spec.max_completion_length,
            "temperature": spec.temperature,
            "beta": spec.beta,
            # The policy and the reference must see the same network: dropout would make the KL noise.
            "disable_dropout": True,
            # RL runs are short and noisy: every step's reward, KL and length go to metrics.jsonl.
            "logging_steps": 1,
            "save_steps": max(25, steps // 4),
            "log_completions": False,
        })
        return values

    def planned_steps(self, spec: RLHFSpec, n_examples: int, extra: dict) -> int:
        """Optimizer steps: each prompt is answered num_generations times, and batch_size counts answers."""
        return base.planned_steps(spec, n_examples * spec.num_generations, extra)

    def load_model(self, plan: base.Plan):
        model = super().load_model(plan)
        if plan.adapter.type == "full" and plan.spec.beta > 0:
            # TRL loads the frozen reference from config._name_or_path: point it at these same weights.
            from ..models import merged_folder

            model.config._name_or_path = str(merged_folder(plan.ref) if plan.ref.parents else plan.ref.base)
        return model

    def trainer_class(self):
        from trl import GRPOTrainer, RLOOTrainer

        return GRPOTrainer if self.algorithm == "grpo" else RLOOTrainer

    def build_trainer(self, plan: base.Plan, model, callbacks):
        from .reward import load_reward_model

        funcs, processors = [], []
        for item in self.rewards:
            if isinstance(item, Path):
                rm, rm_tokenizer = load_reward_model(item, plan.device)
                rm.config._name_or_path = str(item)  # TRL logs rewards/<run folder name>/mean
                funcs.append(rm)
                processors.append(rm_tokenizer)
            else:
                funcs.append(item)
                processors.append(None)
        trainer = super().build_trainer(plan, model, callbacks, reward_funcs=funcs, reward_processing_classes=processors)
        _reference_is_adapter_off(trainer)
        return trainer

    def finish(self, plan: base.Plan, trainer) -> dict:
        from .preference import watch_summary

        return {**rl_summary(trainer.state.log_history), **watch_summary(self.watch, plan.out)}


def _reference_is_adapter_off(trainer) -> None:
    """TRL copies a PEFT model's adapter into a frozen 'ref' adapter (for retraining an existing adapter). Ours is
    new, so switching it off gives the same reference for free: drop the copy, which would also be saved."""
    from accelerate.utils import is_peft_model

    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(model) and "ref" in model.peft_config:
        model.delete_adapter("ref")
        model.set_adapter("default")


def rl_summary(logs: list[dict], share: float = 0.2) -> dict:
    """Mean reward over the first and the last `share` of the logged steps, the final KL, and the mean answer
    length (tokens) first and last."""
    def window(key: str):
        values = [r[key] for r in logs if _finite(r.get(key))]  # eval rows log eval_reward etc.
        if not values:
            return None, None, None
        k = max(1, round(len(values) * share))
        return sum(values[:k]) / k, sum(values[-k:]) / k, values[-1]

    summary = {}
    first, last, _ = window(REWARD_KEY)
    if first is not None:
        summary.update(reward_first=round(first, 4), reward_last=round(last, 4))
    _, _, kl = window(KL_KEY)
    if kl is not None:
        summary["kl_final"] = round(kl, 4)
    first, last, _ = window(LENGTH_KEY)
    if first is not None:
        summary.update(length_first=round(first, 1), length_last=round(last, 1))
    return summary


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def rlhf(spec: RLHFSpec) -> Run:
    # A RewardModel (or Run) object is recorded in spec.json as its folder.
    reward = [str(r.path) if isinstance(r, Run) else r for r in _reward_items(spec.reward)]
    if not isinstance(spec.reward, (list, tuple)):
        reward = reward[0]
    return base.run(RLHF(spec), spec.replace(reward=reward))
