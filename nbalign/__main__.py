"""`python -m nbalign demo`: a real LoRA SFT run on the built-in model, with base vs tuned answers.
`python -m nbalign runs`: list past runs.
`python -m nbalign run runs/x/spec.json --out runs/x2`: the same run again, in this process, from the file."""

from __future__ import annotations

import argparse
import sys


def demo(out: str, epochs: float) -> int:
    import nbalign
    from nbalign.examples import is_json_answer, json_answers

    train, heldout = json_answers("train"), json_answers("heldout")
    prompts = [row["messages"][0]["content"] for row in heldout]
    print(f"Teaching smollm2-135m to answer as one-line JSON: {len(train)} examples, {len(prompts)} held out.")
    before = nbalign.generate("smollm2-135m", prompts, max_new_tokens=48)
    nbalign.lora(r=16, target_modules="all-linear")
    run = nbalign.sft(train, out=out, epochs=epochs, overwrite=True)
    after = run.generate(prompts, max_new_tokens=48)
    for p, b, a in list(zip(prompts, before, after))[:6]:
        print(f"\nQ: {p}\n  base : {b[:100]!r}\n  tuned: {a[:100]!r}")
    ok_before = sum(map(is_json_answer, before))
    ok_after = sum(map(is_json_answer, after))
    print(f"\nheld-out answers in the JSON format: base {ok_before}/{len(prompts)}, tuned {ok_after}/{len(prompts)}")
    print(run)
    return 0 if run.status == "finished" else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nbalign")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="LoRA SFT of the built-in model on a JSON answer format")
    d.add_argument("--out", default="runs/demo-json-sft")
    d.add_argument("--epochs", type=float, default=3)
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
            return demo(args.out, args.epochs)
        import nbalign

        if args.command == "run":
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
