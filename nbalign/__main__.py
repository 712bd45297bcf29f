"""`python -m nbalign demo`: a real LoRA SFT run on the built-in model, with base vs tuned answers (`--reasoning`:
the same task in a form that leads up to each answer, which keeps the held-out answers right).
`python -m nbalign runs`: list past runs.
`python -m nbalign run runs/x/spec.json --out runs/x2`: the same run again, in this process, from the file."""

from __future__ import annotations

import argparse
import os
import sys


# The reasoning-first form's target is three times longer than the answer-first one's: 3 epochs (21 steps) have
# not learnt it yet (0/16 in form, measured); 6 (42 steps) give 16/16 in form and 10/16 right (tests/test_behaviour.py).
REASONING_EPOCHS = 6.0
DEMO_OUT = "runs/demo-json-sft"


def demo(out: str, epochs: float | None, reasoning: bool = False) -> int:
    import nbalign
    from nbalign.examples import json_answers

    train, heldout = json_answers("train", reasoning), json_answers("heldout", reasoning)
    form = '{"reasoning": ..., "answer": ..., "category": ...}' if reasoning else "one-line JSON"
    print(f"Teaching smollm2-135m to answer as {form}: {len(train)} examples, {len(heldout)} held out.")
    epochs = epochs or (REASONING_EPOCHS if reasoning else None)
    options = {"epochs": epochs} if epochs else {}
    # nbalign's defaults throughout: the %sft line with --data, --eval-data and --out and nothing else (and, for the
    # reasoning-first form, REASONING_EPOCHS).
    run = nbalign.sft(train, eval_data=heldout, out=out, overwrite=True, **options)
    evaluation = run.evaluation
    if evaluation is None:
        print(run)
        return 1
    for i, (q, base, tuned) in enumerate(evaluation.examples(n=len(heldout))):
        before, after = evaluation.marks(i)
        print(f"\nQ: {q}\n  base : {base[:90]!r}  [{before}]\n  tuned: {tuned[:90]!r}  [{after}]")
    print()
    print(evaluation)
    lost = [q for i, (q, _, _) in enumerate(evaluation.examples(n=len(heldout)))
            if evaluation.before["right"][i] and not evaluation.after["right"][i]]
    print(f"\nheld-out answers the base got right and the tuned model got wrong: {len(lost)}"
          + (f" ({'; '.join(lost)})" if lost else ""))
    print(run)
    if not reasoning and evaluation.form_costs_content:
        print("\nThe same data with a first field that leads up to the answer keeps the held-out answers: python -m "
              f"nbalign demo --reasoning ({REASONING_EPOCHS:g} epochs, a few minutes).")
    return 0 if run.status == "finished" else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nbalign")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="LoRA SFT of the built-in model on a JSON answer format")
    d.add_argument("--out", default=None, help=f"the run folder (default {DEMO_OUT}, or {DEMO_OUT}-reasoning)")
    d.add_argument("--epochs", type=float, default=None,
                   help=f"default: %%sft's own default ({REASONING_EPOCHS:g} with --reasoning)")
    d.add_argument("--reasoning", action="store_true",
                   help="the same answers with a first field that leads up to them: the form that keeps them right")
    r = sub.add_parser("runs", help="list past runs")
    r.add_argument("root", nargs="?", default="runs")
    p = sub.add_parser("run", help="train a saved spec again: a run folder or its spec.json")
    p.add_argument("spec", help="runs/<name>/spec.json (or the run folder)")
    p.add_argument("--out", default=None, help="the new run folder (default runs/<method>-<date>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    args = parser.parse_args(argv)
    from nbalign.errors import NbalignError

    try:
        if args.command == "demo":
            out = args.out or (f"{DEMO_OUT}-reasoning" if args.reasoning else DEMO_OUT)
            return demo(out, args.epochs, args.reasoning)
        import nbalign

        if args.command == "run":
            from nbalign.methods.launch import LAUNCHED

            if os.environ.get(LAUNCHED):  # started by --launch: train here, in the folder the launcher wrote
                run = nbalign.replay(args.spec, out=args.out, launch="here", num_processes=1, accelerate_config=None)
                return 0  # the run folder's status says how it went; the launcher reads it
            run = nbalign.replay(args.spec, out=args.out, overwrite=args.overwrite)
            print(run)
            return 0 if run.status == "finished" else 1

        print(nbalign.list_runs(args.root).to_string())
        return 0
    except NbalignError as exc:
        print(f"nbalign: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
