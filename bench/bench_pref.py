"""Benchmark: the same DPO and KTO jobs through nbalign and through a plain TRL script with TRL's defaults.

    python bench/bench_pref.py                 # DPO and KTO, 12 optimizer steps per side
    python bench/bench_pref.py --quick         # smoke check: 2 steps per side
    python bench/bench_pref.py --methods dpo --steps 21

Sides, each in its own subprocess, one after the other (never in parallel), so each peak RSS is its own:
  nbalign           nbalign.dpo / nbalign.kto with their defaults (the evaluation watch included)
  nbalign-nowatch   the same with `watch: false`: the training alone, what the plain script does
  trl               DPOTrainer / KTOTrainer with TRL's config defaults, the same LoRA, data, lr, batch, steps
Ratios are against `trl`. Tokens are the non-padding tokens of the examples the steps consumed (prompt +
answer, both answers for DPO; KTO's mismatched KL completions are not counted), the same count on every
side. Results: a Markdown table on stdout and bench/results/pref.json + pref.md. This asserts nothing.
"""

from __future__ import annotations

from harness import (LORA, Span, WorkerFailed, fmt_ratio, loadavg, md_table, peak_rss_mib, peft_lora_config, preload,
                     ratio, run_worker, write_result)

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BATCH = 8
LR = 2e-4
SIDES = ("nbalign", "nbalign-nowatch", "trl")


def _data(method: str) -> list[dict]:
    from nbalign.examples import style_pairs, style_thumbs

    return style_pairs("train") if method == "dpo" else style_thumbs("train")


def _conversational(method: str) -> list[dict]:
    """The rows as TRL's conversational format; what nbalign builds internally too."""
    from nbalign.preference_data import to_pairs, to_unpaired

    rows = _data(method)
    return to_pairs(rows) if method == "dpo" else to_unpaired(rows)


def _tokens_per_example(method: str) -> float:
    from nbalign.models import load_tokenizer, resolve
    from nbalign.text import completion_text

    tokenizer = load_tokenizer(resolve("smollm2-135m"))
    total, rows = 0, _conversational(method)
    for r in rows:
        for answer in (r["chosen"], r["rejected"]) if method == "dpo" else (r["completion"],):
            head, tail = completion_text(tokenizer, r["prompt"], answer)
            total += len(tokenizer(head + tail, add_special_tokens=False)["input_ids"])
    return total / len(rows)


def worker(side: str, method: str, steps: int, out: str) -> dict:
    preload("nbalign", "peft", "trl")  # imports outside the timed span on both sides
    import nbalign
    import trl

    rows = _data(method)
    if side.startswith("nbalign"):
        nbalign.lora(**LORA)
        fn = nbalign.dpo if method == "dpo" else nbalign.kto
        span = Span()
        run = fn(rows, out=out, overwrite=True, batch_size=BATCH, learning_rate=LR, max_steps=steps,
                 watch=side == "nbalign")
        wall = span.stop().wall
        summary = run.summary
        train_s = summary["runtime_s"]
        extra = {k: summary.get(k) for k in ("accuracy", "label_accuracy", "like_chosen", "length", "kl")
                 if summary.get(k) is not None}
    else:
        from datasets import Dataset

        from nbalign.models import builtin_model_dir

        config_cls, trainer_cls = (trl.DPOConfig, trl.DPOTrainer) if method == "dpo" else (trl.KTOConfig,
                                                                                           trl.KTOTrainer)
        args = config_cls(output_dir=out, learning_rate=LR, per_device_train_batch_size=BATCH, max_steps=steps,
                          report_to="none", save_strategy="no", use_cpu=True)
        peft_config = peft_lora_config()
        span = Span()
        trainer = trainer_cls(model=str(builtin_model_dir()), args=args, train_dataset=Dataset.from_list(
            _conversational(method)), peft_config=peft_config)
        result = trainer.train()
        wall = span.stop().wall
        train_s = result.metrics["train_runtime"]
        extra = {}
    tokens = steps * BATCH * _tokens_per_example(method)
    return {"side": side, "method": method, "steps": steps, "tokens": round(tokens), "train_s": round(train_s, 2),
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens / train_s, 1), "peak_rss_mib": round(peak_rss_mib()),
            **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="dpo,kto")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("SIDE", "METHOD", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = 2 if args.quick else args.steps
    if args.worker:
        side, method, out = args.worker
        write_result(args.result, worker(side, method, steps, out))
        return

    from nbalign.models import builtin_model_dir

    builtin_model_dir()  # converted once, before any timing
    RESULTS.mkdir(exist_ok=True)
    results = []
    for method in args.methods.split(","):
        for side in args.sides.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                log = RESULTS / f"pref-{method}-{side}.log"
                try:
                    done = run_worker(__file__, ["--steps", str(steps), "--worker", side, method, f"{tmp}/run"],
                                      result=Path(tmp) / "result.json", log=log)
                except WorkerFailed:
                    print(f"{method}/{side} failed: see {log}", file=sys.stderr)
                    continue
                results.append(done.result)
                print(f"{method}/{side}: {results[-1]}", file=sys.stderr)
    table = []
    for r in results:
        base = next((b for b in results if b["method"] == r["method"] and b["side"] == "trl"), {})
        acc, like = r.get("accuracy", r.get("label_accuracy")), r.get("like_chosen")
        table.append([r["method"], r["side"], r["steps"], r["train_s"], r["tokens_per_s"], r["peak_rss_mib"],
                      fmt_ratio(ratio(r["tokens_per_s"], base.get("tokens_per_s"))),
                      fmt_ratio(ratio(r["peak_rss_mib"], base.get("peak_rss_mib"))),
                      "" if acc is None else f"{acc:.2f}", "" if like is None else f"{like:.2f}"])
    header = ["method", "side", "steps", "train s", "tokens/s", "peak RSS MiB", "tokens/s vs trl", "RSS vs trl",
              "accuracy after", "answers like chosen"]
    load = loadavg(ndigits=None)
    at_end = " ".join(f"{x:.2f}" for x in load) if load else "unknown"
    text = md_table(header, table) + f"\n\nload average at the end: {at_end}\n"
    print(text)
    (RESULTS / "pref.md").write_text(text)
    (RESULTS / "pref.json").write_text(json.dumps({"results": results, "loadavg": load}, indent=2))


if __name__ == "__main__":
    main()
