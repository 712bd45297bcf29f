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

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BATCH = 8
LR = 2e-4
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
SIDES = ("nbalign", "nbalign-nowatch", "trl")


def _maxrss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _data(method: str) -> list[dict]:
    from nbalign.examples import style_pairs, style_thumbs

    return style_pairs("train") if method == "dpo" else style_thumbs("train")


def _conversational(method: str) -> list[dict]:
    """The rows as TRL's conversational format; what nbalign builds internally too."""
    from nbalign.data import to_pairs, to_unpaired

    rows = _data(method)
    return to_pairs(rows) if method == "dpo" else to_unpaired(rows)


def _tokens_per_example(method: str) -> float:
    from nbalign.evaluation import _completion_text
    from nbalign.models import load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve("smollm2-135m"))
    total, rows = 0, _conversational(method)
    for r in rows:
        for answer in (r["chosen"], r["rejected"]) if method == "dpo" else (r["completion"],):
            head, tail = _completion_text(tokenizer, r["prompt"], answer)
            total += len(tokenizer(head + tail, add_special_tokens=False)["input_ids"])
    return total / len(rows)


def worker(side: str, method: str, steps: int, out: str) -> dict:
    import nbalign  # noqa: F401  (imports outside the timed span on both sides)
    import peft  # noqa: F401
    import trl  # noqa: F401

    rows = _data(method)
    if side.startswith("nbalign"):
        import nbalign

        nbalign.lora(**LORA)
        fn = nbalign.dpo if method == "dpo" else nbalign.kto
        t = time.perf_counter()
        run = fn(rows, out=out, overwrite=True, batch_size=BATCH, learning_rate=LR, max_steps=steps,
                 watch=side == "nbalign")
        wall = time.perf_counter() - t
        summary = run.summary
        train_s = summary["runtime_s"]
        extra = {k: summary.get(k) for k in ("accuracy", "label_accuracy", "like_chosen", "length", "kl")
                 if summary.get(k) is not None}
    else:
        from datasets import Dataset
        from peft import LoraConfig

        from nbalign.models import builtin_model_dir

        config_cls, trainer_cls = (trl.DPOConfig, trl.DPOTrainer) if method == "dpo" else (trl.KTOConfig,
                                                                                           trl.KTOTrainer)
        args = config_cls(output_dir=out, learning_rate=LR, per_device_train_batch_size=BATCH, max_steps=steps,
                          report_to="none", save_strategy="no", use_cpu=True)
        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
        t = time.perf_counter()
        trainer = trainer_cls(model=str(builtin_model_dir()), args=args, train_dataset=Dataset.from_list(
            _conversational(method)), peft_config=peft_config)
        result = trainer.train()
        wall = time.perf_counter() - t
        train_s = result.metrics["train_runtime"]
        extra = {}
    tokens = steps * BATCH * _tokens_per_example(method)
    return {"side": side, "method": method, "steps": steps, "tokens": round(tokens), "train_s": round(train_s, 2),
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens / train_s, 1), "peak_rss_mib": round(_maxrss_mib()),
            **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="dpo,kto")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("SIDE", "METHOD", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = 2 if args.quick else args.steps
    if args.worker:
        side, method, out = args.worker
        print("RESULT " + json.dumps(worker(side, method, steps, out)), flush=True)
        return

    from nbalign.models import builtin_model_dir

    builtin_model_dir()  # converted once, before any timing
    RESULTS.mkdir(exist_ok=True)
    results = []
    for method in args.methods.split(","):
        for side in args.sides.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                log = RESULTS / f"pref-{method}-{side}.log"
                cmd = [sys.executable, __file__, "--steps", str(steps), "--worker", side, method, f"{tmp}/run"]
                with log.open("w") as f:
                    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env={**os.environ})
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"{method}/{side} failed: see {log}", file=sys.stderr)
                    continue
                results.append(json.loads(line[7:]))
                print(f"{method}/{side}: {results[-1]}", file=sys.stderr)
    table = ["| method | side | steps | train s | tokens/s | peak RSS MiB | tokens/s vs trl | RSS vs trl | "
             "accuracy after | answers like chosen |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = next((b for b in results if b["method"] == r["method"] and b["side"] == "trl"), None)
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mem = f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x" if base else "-"
        acc, like = r.get("accuracy", r.get("label_accuracy")), r.get("like_chosen")
        acc = "" if acc is None else f"{acc:.2f}"
        like = "" if like is None else f"{like:.2f}"
        table.append(f"| {r['method']} | {r['side']} | {r['steps']} | {r['train_s']} | {r['tokens_per_s']} | "
                     f"{r['peak_rss_mib']} | {speed} | {mem} | {acc} | {like} |")
    load = os.getloadavg()
    text = "\n".join(table) + f"\n\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n"
    print(text)
    (RESULTS / "pref.md").write_text(text)
    (RESULTS / "pref.json").write_text(json.dumps({"results": results, "loadavg": load}, indent=2))


if __name__ == "__main__":
    main()
