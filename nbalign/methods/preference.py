"""What the methods that learn from comparisons share: conversational datasets, and the evaluation watch
(before, during and after training) whose result is shown at the end of the run."""

from __future__ import annotations

from .. import memory, mixing
from ..data import load_records
from ..text import assistant_text
from ..preference_data import check_prompt_lengths
from ..preference_specs import PreferenceSpec
from . import base, watching


class PreferenceMethod(base.Method):
    """A base.Method that measures nbalign.evaluate's metrics while it trains (see callbacks.AlignmentWatch)."""

    replay_kind = "pairs"  # the rows replay mixes in (mixing.rows)

    # Subclasses: rows(spec, records, what, held_out) -> normalised rows; beta(spec) -> the implicit reward's beta.
    def rows(self, spec, records: list[dict], what: str, held_out: bool = False) -> list[dict]:
        raise NotImplementedError

    def beta(self, spec) -> float:
        return spec.beta

    def prepare(self, spec: PreferenceSpec, tokenizer) -> base.Prepared:
        from datasets import Dataset

        train_records = load_records(spec.data, "training data")
        train_rows = self.rows(spec, train_records, "training data")
        replay = mixing.mixed(spec.model, len(train_rows), spec.replay, self.replay_kind, spec.where)
        if replay:
            train_rows = train_rows + self.rows(spec, replay, "replay rows")
        check_prompt_lengths(train_rows, tokenizer, spec.max_length, "training data", spec.where)
        evals, eval_records = None, None
        if spec.eval_data is not None:
            eval_records = load_records(spec.eval_data, "eval data")
            eval_rows = self.rows(spec, eval_records, "eval data", held_out=True)
            check_prompt_lengths(eval_rows, tokenizer, spec.max_length, "eval data", spec.where)
            # With the watch on, the held-out data goes to it (AlignmentWatch measures the implicit-reward
            # accuracy TRL's evaluation would, plus answers, KL and perplexity); evaluating twice doubles the cost.
            evals = None if spec.watch else Dataset.from_list(eval_rows)
        state = {"train_records": train_records, "eval_records": eval_records, "rows": train_rows,
                 "demos": demos(train_rows[:len(train_rows) - len(replay)], spec.fewshot), "replay": replay}
        return base.Prepared(Dataset.from_list(train_rows), evals, len(train_rows), state)

    def memory_shape(self, spec, tokenizer, prepared: base.Prepared) -> dict:
        """Both answers of a pair (or an answer and its KL counterpart for KTO) go through the model at once."""
        from ..text import assistant_text
        from ..preference_data import prompt_lengths

        rows = prepared.state["rows"]
        prompts = prompt_lengths(rows, tokenizer)
        answers = [[len(tokenizer(assistant_text(r[k]), add_special_tokens=False)["input_ids"])
                    for k in ("chosen", "rejected", "completion") if k in r] for r in rows]
        # Each answer after its prompt (+ the end of turn). KTO's KL completions run without gradients: their
        # activations are not kept.
        units = [tuple(min(spec.max_length, p + a + 2) for a in ans) for p, ans in zip(prompts, answers)]
        # The mean of a row's answers: measured, a padded batch's peak follows the tokens of both answers, not both
        # padded to the longer (CPU 2,805 MiB measured, 3,295 estimated so; H100 12,272, 14,545 so, 31,339 padded).
        longest = max(round(sum(u) / len(u)) for u in units)
        separate = spec.lora.type == "full" and not self.precompute(spec, 2, len(rows))
        return {"sequences": 2 * spec.batch_size, "length": longest, "units": units, "reference_copy": separate,
                "kept": memory.PAIRS_KEPT}

    def precompute(self, spec, steps: int, n_rows: int) -> bool:
        """Reference log-probs once before training, when that is cheaper: with full fine-tuning it saves a
        second copy of the model, and when the run sees its data more than once (epochs, or max_steps past
        one pass) it saves a reference pass per extra pass. A short run would pay for rows it never trains on."""
        if spec.precompute_ref != "auto":
            return bool(spec.precompute_ref)
        passes = steps * spec.batch_size * max(1, spec.trl.get("gradient_accumulation_steps") or 1) / n_rows
        return spec.lora.type == "full" or passes > 1

    def config_defaults(self, spec, device, steps: int, prepared) -> dict:
        values = super().config_defaults(spec, device, steps, prepared)
        values["max_length"] = spec.max_length
        if spec.watch:
            values["eval_strategy"] = "no"
        return values

    def extra_callbacks(self, plan: base.Plan) -> list:
        from ..callbacks import AlignmentWatch
        from ..evaluation import eval_data

        spec = plan.spec
        if not spec.watch:
            return []
        more = dict(notes=False, probe=spec.probe, demos=plan.state["demos"])
        if plan.state["eval_records"] is not None:
            data = eval_data(plan.state["eval_records"], spec.general_text, source="held-out", limit=32, **more)
        else:  # no held-out data: watch a sample of the training rows, and say so
            data = eval_data(plan.state["train_records"], spec.general_text,
                             source="training (no eval_data given)", limit=16, **more)
        plan.state["watch"] = AlignmentWatch(data, plan.tokenizer, self.beta(spec), spec.eval_points,
                                             spec.eval_max_new_tokens, folder=plan.out,
                                             start_model=watching.start_model(plan))
        return [plan.state["watch"]]

    def build_trainer(self, plan: base.Plan, model, callbacks: list, **extra):
        """TRL's trainer, its model's forward flattening the padded batches it builds where that computes less
        (nbalign/batching.py): the policy's and the reference's forwards alike. The flattening is in place before
        the trainer is built, because TRL computes precomputed reference log-probs in its constructor: on the
        style thumbs (85 rows of 8) that pass took 32 s padded, a third of what 33 training steps took."""
        from ..batching import flatten_padded_forward, layer_costs, supports_flattening

        def flatten(target):
            if plan.spec.padding_free is not False and supports_flattening(target):
                plan.state["flattener"] = flatten_padded_forward(target, layer_costs(target.config),
                                                                 plan.spec.padding_free)

        flatten(model)
        trainer = super().build_trainer(plan, model, callbacks, **extra)
        if trainer.model is not model:  # a trainer that wrapped the model it was given: flatten what it trains
            flatten(trainer.model)
        return trainer

    def finish(self, plan: base.Plan, trainer) -> dict:
        summary = watching.watch_summary(plan.state.get("watch"), plan.out)
        if plan.state.get("flattener") is not None:
            summary.update(plan.state["flattener"].summary())
        return summary


def demos(rows: list[dict], k: int) -> list:
    """k (prompt, preferred answer) demonstrations from normalised pairs or thumbs-up rows."""
    from ..evaluation import demonstrations

    good = [(r["prompt"], assistant_text(r["chosen"] if "chosen" in r else r["completion"]))
            for r in rows if "chosen" in r or r.get("label")]
    return demonstrations(good, k)
