"""%%rlhf: online RL with TRL's GRPOTrainer or RLOOTrainer. The policy answers the prompts, a reward model
run or Python functions score the answers, and the policy moves towards high reward with a KL penalty to
the reference.

The reference: with an adapter (LoRA, DoRA, QLoRA) it is the policy with the adapter switched off, i.e. the
model the run started from, so no second copy is loaded; full fine-tuning loads a frozen second copy.

Python reward functions and how they are called: methods/rewards.py.

A reward model run is loaded as one SequenceClassification model (base, parents and its adapter merged)
and handed to TRL with its own tokenizer, which renders prompt + answer with the chat template exactly as
the reward model was trained on (see methods/reward.py). Rewards are summed (TRL's `reward_weights` to
weigh them) and logged per source as rewards/<name>/mean.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import NbalignError
from ..preference_data import prompt_lengths, to_prompts
from ..runs import Run
from ..preference_specs import RLHFSpec
from ..text import prompt_text, rows_hint
from . import base, watching
from .rewards import WHERE, describe_rewards, resolve_rewards

# The logged curves (TRL 1.16 key names): mean reward, KL to the reference, mean answer length in tokens.
REWARD_KEY, KL_KEY, LENGTH_KEY = "reward", "kl", "completions/mean_length"


def _check_lengths(rows: list[dict], tokenizer, spec: RLHFSpec, what: str) -> None:
    lengths = prompt_lengths(rows, tokenizer)
    room = spec.max_length - spec.max_completion_length
    long = [i for i, n in enumerate(lengths) if n > room]
    if long:
        raise NbalignError(
            f"{WHERE}: the prompts of rows {rows_hint(long)} of the {what} take up to {max(lengths[i] for i in long)} "
            f"tokens, which with max_completion_length {spec.max_completion_length} exceeds max_length "
            f"{spec.max_length}.",
            f"raise --max-length to {max(lengths) + spec.max_completion_length}, or shorten those prompts.",
        )


# ----------------------------------------------------------------------------------------------------
# The method.


class RLHF(base.Method):
    name = "rlhf"
    min_micro_batch = None  # a step's answers are the num_generations groups the advantages compare

    def config_class(self, spec: RLHFSpec):
        from trl import GRPOConfig, RLOOConfig

        return GRPOConfig if spec.algorithm == "grpo" else RLOOConfig

    def trainer_class(self, spec: RLHFSpec):
        from trl import GRPOTrainer, RLOOTrainer

        return GRPOTrainer if spec.algorithm == "grpo" else RLOOTrainer

    def prepare(self, spec: RLHFSpec, tokenizer) -> base.Prepared:
        from datasets import Dataset

        if spec.lora.type in ("prefix", "prompt"):
            # TRL generates the answers with the PEFT model's own generate(), which with transformers 5 puts the
            # virtual tokens in again at every new token (generation.generate_after_virtual_tokens).
            raise NbalignError(
                f"{WHERE}: {spec.lora.type} tuning cannot train by reinforcement here: TRL would generate its answers "
                "through PEFT's generate(), which under transformers 5 repeats the virtual tokens before every new "
                "token, so the policy would be rewarded for answers it does not give.",
                "use LoRA (type: lora) or IA3 for %%rlhf, or train the prompt with %%sft, %%dpo or %%kto.")

        def prepare(data, what):
            rows = to_prompts(data, what)
            _check_lengths(rows, tokenizer, spec, what)
            if not getattr(tokenizer, "chat_template", None):  # a base model: plain-text prompts
                rows = [{**r, "prompt": prompt_text(tokenizer, r["prompt"])} for r in rows]
            return rows

        train = prepare(spec.data, "prompts")
        columns = {k for r in train for k in r if k != "prompt"}
        # Checked here, before the run folder is written: a bad reward fails at once.
        rewards = resolve_rewards(spec.reward, columns)
        evals = prepare(spec.eval_data, "eval prompts") if spec.eval_data is not None else None
        state = {
            "rewards": rewards,
            # The evaluation at the start and the end: answers, their length, KL and perplexity (no pairs here).
            "eval_source": "held-out" if evals else "training prompts (no eval_data given)",
            "eval_prompts": [r["prompt"] for r in (evals or train)[:16] if isinstance(r["prompt"], list)],
        }
        return base.Prepared(Dataset.from_list(train), Dataset.from_list(evals) if evals else None, len(train), state)

    def memory_shape(self, spec: RLHFSpec, tokenizer, prepared: base.Prepared) -> dict:
        """A step generates batch_size answers (their KV cache), then trains on them: prompt and completion."""
        from ..preference_data import prompt_lengths

        rows = [{"prompt": r["prompt"]} for r in prepared.train]
        prompt = max(prompt_lengths(rows, tokenizer)) if rows and isinstance(rows[0]["prompt"], list) else \
            max(len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows)
        length = min(spec.max_length, prompt + spec.max_completion_length)
        return {"sequences": spec.batch_size, "length": length,
                "loss_tokens": spec.batch_size * spec.max_completion_length,
                "generated": spec.batch_size * length}

    def extra_callbacks(self, plan: base.Plan) -> list:
        from ..callbacks import AlignmentWatch
        from ..evaluation import EvalData, general_texts

        if not plan.state["eval_prompts"]:
            return []
        data = EvalData(general_text=general_texts(None), source=plan.state["eval_source"],
                        prompt_list=plan.state["eval_prompts"])
        plan.state["watch"] = AlignmentWatch(data, plan.tokenizer, plan.spec.beta, 0, plan.spec.max_completion_length,
                                             folder=plan.out, start_model=watching.start_model(plan))
        return [plan.state["watch"]]

    def config_defaults(self, spec: RLHFSpec, device, steps: int, prepared) -> dict:
        values = super().config_defaults(spec, device, steps, prepared)
        del values["dataset_num_proc"]  # GRPOConfig and RLOOConfig have no such field
        values.update({
            "num_generations": spec.num_generations,
            "max_completion_length": spec.max_completion_length,
            "temperature": spec.temperature,
            "beta": spec.beta,
            # The policy and the reference must see the same network: dropout would make the KL noise.
            "disable_dropout": True,
            # RL runs are short and noisy: every step's reward, KL and length go to metrics.jsonl.
            "logging_steps": 1,
            "log_completions": False,
        })
        return values

    def stored_values(self, spec: RLHFSpec) -> dict:
        """A reward model run by its folder, a Python function by module and name (see rewards.import_reward)."""
        return {"reward": describe_rewards(spec.reward)}

    def planned_steps(self, spec: RLHFSpec, n_examples: int, extra: dict) -> int:
        """Optimizer steps: each prompt is answered num_generations times, and batch_size counts answers."""
        return super().planned_steps(spec, n_examples * spec.num_generations, extra)

    def load_model(self, plan: base.Plan):
        model = super().load_model(plan)
        if plan.adapter.type == "full" and plan.spec.beta > 0:
            # TRL loads the frozen reference from config._name_or_path: point it at these same weights.
            from ..models import merged_folder

            model.config._name_or_path = str(merged_folder(plan.ref) if plan.ref.parents else plan.ref.base)
        return model

    def build_trainer(self, plan: base.Plan, model, callbacks):
        from ..models import load_reward_model

        funcs, processors = [], []
        for item in plan.state["rewards"]:
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
        from .watching import watch_summary

        summary = rl_summary(trainer.state.log_history)
        if summary.get("reward_first") is None:
            raise NbalignError(
                f"{WHERE}: no step logged a finite reward, so the policy learnt nothing.",
                "check that the reward returns numbers for these answers (try it on a few answers first).",
            )
        return {**summary, **watch_summary(plan.state.get("watch"), plan.out)}


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
    return base.run(RLHF(), spec)
