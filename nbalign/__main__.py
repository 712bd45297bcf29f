"""`python -m nbalign demo`: a real LoRA SFT run on the built-in model on nbalign's defaults, with base vs tuned
answers, in a JSON form that leads up to each answer (`--answer-first`: the answer as the first field, the form
that costs this model its facts).
`python -m nbalign runs`: list past runs.
`python -m nbalign run runs/x/spec.json --out runs/x2`: the same run again, in this process, from the file."""

from __future__ import annotations

import argparse
import os
import sys

DEMO_OUT = "runs/demo-json-sft"


def demo(out: str, epochs: float | None, answer_first: bool = False) -> int:
    import nbalign
    from nbalign.examples import json_answers

    reasoning = not answer_first
    train, heldout = json_answers("train", reasoning), json_answers("heldout", reasoning)
    form = '{"reasoning": ..., "answer": ..., "category": ...}' if reasoning else '{"answer": ..., "category": ...}'
    print(f"Teaching smollm2-135m to answer as {form}: {len(train)} examples, {len(heldout)} held out.")
    # nbalign's defaults throughout: the %sft line with --data, --eval-data and --out and nothing else.
    run = nbalign.sft(train, eval_data=heldout, out=out, overwrite=True, **({"epochs": epochs} if epochs else {}))
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
    if answer_first and evaluation.form_costs_content:
        print("\nThe same data with a first field that leads up to the answer keeps the held-out answers: python -m "
              "nbalign demo (the default form).")
    return 0 if run.status == "finished" else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nbalign")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="LoRA SFT of the built-in model on a JSON answer format")
    d.add_argument("--out", default=None, help=f"the run folder (default {DEMO_OUT}, or {DEMO_OUT}-answer-first)")
    d.add_argument("--epochs", type=float, default=None, help="default: %%sft's own default")
    d.add_argument("--answer-first", action="store_true",
                   help="the same answers as the first field, with no sentence before them: the form that costs this "
                        "model its facts")
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
            out = args.out or (f"{DEMO_OUT}-answer-first" if args.answer_first else DEMO_OUT)
            return demo(out, args.epochs, args.answer_first)
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
