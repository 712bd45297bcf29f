"""What the methods with an evaluation watch share: the model a run starts from (for reusing its untrained
numbers), the few-shot demonstrations, and the watch's before/after as the run's Evaluation."""

from __future__ import annotations


def start_model(plan):
    """What the run starts from, for reusing its untrained measurements (evalcache); None if unknown."""
    from ..evalcache import StartModel

    try:
        return StartModel.of(plan.ref, plan.adapter, plan.device, plan.spec.seed)
    except OSError:
        return None


def demos(rows: list, k: int) -> list:
    """k (prompt, answer) demonstrations spread over the training rows, for the prompting baseline."""
    from ..evaluation import demonstrations, split_turns

    return [split_turns(r) for r in demonstrations(rows, k)]


def watch_summary(watch, out) -> dict:
    """The watch's start and end measurements as an Evaluation: printed, saved to evaluation.json, and
    flattened into the run's summary."""
    from ..results import Evaluation, save

    if watch is not None and watch.failed is not None:
        return {"evaluation_failed": watch.failed}
    if watch is None or watch.first is None or watch.last is None:
        return {}
    before = dict(watch.first)
    # At step 0 the policy is the reference: its implicit rewards are all zero (chance) and its KL is zero.
    before.update({k: v for k, v in (("accuracy", 0.5), ("margin", 0.0), ("chosen_logp_change", 0.0),
                                     ("label_accuracy", 0.5), ("kl", 0.0)) if k in watch.last})
    evaluation = Evaluation(before, watch.last, watch.data.source, watch.data.prompts, watch.baseline)
    save(evaluation, out)
    print(evaluation, flush=True)
    return evaluation.summary()
