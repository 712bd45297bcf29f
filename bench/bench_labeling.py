"""Humans in the loop, measured: time to value and the labeller's responsiveness.

Time to value: from the first click to a tuned model whose held-out answers changed, with 20 labels on the
built-in model, candidates' generation included. A stand-in person labels each pair as soon as it is shown
after `--think` seconds (a person reads two answers in a few seconds; candidates are written ahead meanwhile),
preferring the answer that states the right fact, then the shorter one. Then `nbalign.dpo(labels)` trains with
its defaults and the held-out answers are compared before and after.

Responsiveness: the delay from a click to its effect (the label committed to the store and the next item
set on the widget), idle and while a --live round trains in the background of the same process. Measured at
the Python API the front end's message calls (`labeler.choose`), so it excludes the browser's round trip;
tests/test_browser.py prints the whole click-to-next-item delay in a real JupyterLab.

    python bench/bench_labeling.py            # both (about 6 minutes on 2 cores)
    python bench/bench_labeling.py --quick    # 4 labels, tiny training: a smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CONCISE = "Answer in one short sentence."


def mentions(answer: str, fact: str) -> bool:
    return fact.lower() in answer.lower()


def time_to_value(n_labels: int, think: float, quick: bool) -> dict:
    import nbalign
    from nbalign.examples import style_pairs

    train, heldout = style_pairs("train"), style_pairs("heldout")
    facts = {r["prompt"]: r["chosen"][len("Answer: "):-1] for r in train + heldout}
    questions = [r["prompt"] for r in train[:: max(1, len(train) // n_labels)]][:n_labels]

    def rule(item) -> str:
        fact = facts[item.prompt]
        ra, rb = mentions(item.a, fact), mentions(item.b, fact)
        if ra != rb:
            return "A" if ra else "B"
        return "A" if len(item.a) <= len(item.b) else "B"

    t_open = time.perf_counter()
    labels = nbalign.label_pairs(questions, model=["smollm2-135m", {"model": "smollm2-135m", "system": CONCISE}],
                                 store="labels/bench.sqlite", max_new_tokens=24 if quick else 64)
    labels.wait(1, timeout=600)
    t_first_item = time.perf_counter()
    waits = []
    for _ in range(n_labels):
        t = time.perf_counter()
        labels.wait(1, timeout=600)
        waits.append(time.perf_counter() - t)
        time.sleep(think)
        labels.choose(rule(labels.item))
    t_labelled = time.perf_counter()
    options = dict(max_steps=1, batch_size=2, eval_max_new_tokens=16) if quick else dict(eval_max_new_tokens=48)
    run = nbalign.dpo(labels, eval_data=heldout[::2], out="runs/bench-labels", overwrite=True, eval_points=0,
                      **options)
    t_done = time.perf_counter()
    labels.close()
    examples = run.evaluation.examples(n=len(heldout))
    changed = sum(before != after for _, before, after in examples)
    return {
        "labels": n_labels,
        "think_s": think,
        "first_candidate_s": round(t_first_item - t_open, 1),
        "waited_for_candidates_s": round(sum(waits), 1),
        "labelling_s": round(t_labelled - t_first_item, 1),
        "training_and_evaluation_s": round(t_done - t_labelled, 1),
        "first_click_to_tuned_model_s": round(t_done - t_first_item - think, 1),
        "heldout": len(examples),
        "heldout_changed": changed,
        "length_before": round(statistics.mean(len(b) for _, b, _ in examples), 1),
        "length_after": round(statistics.mean(len(a) for _, _, a in examples), 1),
        "right_before": sum(mentions(b, facts[p]) for p, b, _ in examples),
        "right_after": sum(mentions(a, facts[p]) for p, _, a in examples),
        "pairs": run.spec["examples"],
    }


def responsiveness(quick: bool) -> dict:
    import nbalign
    from nbalign.labeling.widgets import PairLabeler

    n = 40 if quick else 120

    def short(p):
        return f"Answer: {len(p)}."

    def long(p):
        return f"Let me tell you at length about {p}, which is a fine question."

    labels = PairLabeler([f"Question {i}?" for i in range(n)], model=[short, long], store="labels/resp.sqlite",
                         ahead=n)
    labels.wait(n, timeout=120)

    def clicks(k: int) -> list[float]:
        out = []
        for _ in range(k):
            item = labels.item
            t = time.perf_counter()
            labels.choose("A" if item.a.startswith("Answer:") else "B")
            out.append(1000 * (time.perf_counter() - t))
        return out

    idle = clicks(n // 3)
    # Training in the background: a --live round on the built-in model, started by the labels given so far.
    live = nbalign.dpo(labels, out="runs/bench-live", live=True, live_mode="background", live_every=n // 3,
                       watch=False, max_steps=4 if quick else 8, batch_size=4)
    deadline = time.monotonic() + 300
    while "step" not in live.state and time.monotonic() < deadline:
        time.sleep(0.2)
    during = []
    while "done" not in live.state and len(during) < n // 3 and time.monotonic() < deadline:
        during += clicks(1)
        time.sleep(0.25)  # a person's pace, so the clicks spread over the round
    state = live.state
    live.stop()
    labels.close()

    def summary(ms):
        ms = sorted(ms)
        return {"n": len(ms), "median_ms": round(statistics.median(ms), 2),
                "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2), "max_ms": round(ms[-1], 2)}

    return {"idle": summary(idle), "while_training": summary(during) if during else None, "live_state": state}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--labels", type=int, default=20)
    parser.add_argument("--think", type=float, default=3.0, help="seconds the stand-in person takes per pair")
    parser.add_argument("--only", choices=["value", "responsiveness"])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    RESULTS.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nbalign-bench-"))
    os.chdir(work)
    result = {"cpus": os.cpu_count(), "load_before": os.getloadavg()}
    if args.only in (None, "responsiveness"):
        result["responsiveness"] = responsiveness(args.quick)
        print(json.dumps(result["responsiveness"], indent=1), flush=True)
    if args.only in (None, "value"):
        result["time_to_value"] = time_to_value(4 if args.quick else args.labels, 0.0 if args.quick else args.think,
                                                args.quick)
        print(json.dumps(result["time_to_value"], indent=1), flush=True)
    (RESULTS / "labeling.json").write_text(json.dumps(result, indent=1))
    print(f"results: {RESULTS / 'labeling.json'} (work folder {work})", file=sys.stderr)


if __name__ == "__main__":
    main()
