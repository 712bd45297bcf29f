"""Benchmark: the same LoRA SFT job through nbalign and through a plain TRL script with TRL's defaults.

    python bench/bench_sft.py            # full run: 3 epochs (21 optimizer steps) per side, a few minutes
    python bench/bench_sft.py --quick    # smoke check: 4 optimizer steps per side

Each side runs in its own subprocess, one after the other (never in parallel), so that its peak memory is
its own `ru_maxrss` and the two do not compete for the CPU. Results: a Markdown table on stdout, and
`bench/results/sft.json` + `bench/results/sft.md`. This is a benchmark, not a test: it asserts nothing
about speed, and the numbers are as noisy as the machine is busy (the load average is recorded).

See bench/README.md for what is measured and how.
"""

from __future__ import annotations

# First: the worker's clock (harness.T0) starts when harness is imported, before torch & co. are.
from harness import (LORA, Span, WorkerFailed, add_worker_options, aggregate, cuda_peak_mib, fmt, fmt_ratio, machine,
                     md_table, now, peak_rss_mib, peft_lora_config, preload, ratio, ratios, run_worker, write_result)

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BATCH_SIZE = 8

# Plain-TRL variants: TRL's SFTConfig defaults plus these fields. "trl" is the one the ratios use; the
# others help attribute a difference (precision, activation checkpointing) and run only when asked.
TRL_VARIANTS = {
    "trl": {},
    "trl-fp32": {"bf16": False},
    "trl-fp32-nockpt": {"bf16": False, "activation_checkpointing": False},
}
SIDES = ("nbalign", *TRL_VARIANTS)


# ------------------------------------------------------------------------------------------------
# helpers used inside the workers
# ------------------------------------------------------------------------------------------------
def _import_stack() -> None:
    """The same heavy imports on both sides, timed as `imports_s`."""
    preload("datasets", "peft", "torch", "transformers", "trl")


def answer_nll(model, tokenizer, rows) -> tuple[float, int]:
    """Mean negative log-likelihood per token of the assistant answers (plus their end-of-turn token) of
    `rows`, the prompt given: the same mask and the same code for both sides, whatever each trained on."""
    import torch
    import torch.nn.functional as F

    from nbalign.data import to_conversations
    from nbalign.tokens import tokenize_sft

    enc = tokenize_sft(to_conversations(rows), tokenizer, completion_only=True)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for ids, mask in zip(enc["input_ids"], enc["completion_mask"]):
            x = torch.tensor([ids], device=model.device)
            with torch.no_grad():
                logits = model(input_ids=x).logits[0, :-1].float()
            target = x[0, 1:]
            keep = torch.tensor(mask[1:], dtype=torch.bool, device=x.device)
            total += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum().item())
    finally:
        model.train(was_training)
    return total / max(count, 1), count


def _heldout():
    from nbalign.examples import is_json_answer, json_answers

    rows = json_answers("heldout")
    prompts = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows]
    return rows, prompts, is_json_answer


def _last(logs: list[dict], key: str):
    """(value, step) of the last log entry that has `key`."""
    for entry in reversed(logs):
        if key in entry:
            return entry[key], entry.get("step")
    return None, None


def _expected_tokens(lengths: list[int], max_length: int, epochs: float, max_steps: int | None):
    """Non-padding tokens a run over whole epochs must see: every example once per epoch, truncated.
    None when the run stops inside an epoch (which examples it saw depends on the shuffle)."""
    if max_steps is not None and max_steps > 0:
        return None
    if not float(epochs).is_integer():
        return None
    return int(epochs) * sum(min(n, max_length) for n in lengths)


# ------------------------------------------------------------------------------------------------
# the two sides
# ------------------------------------------------------------------------------------------------
def worker_nbalign(cfg: dict) -> dict:
    _import_stack()
    imports_s = now()
    rss_after_imports = peak_rss_mib()

    import nbalign
    from nbalign.examples import json_answers

    rows = json_answers("train")
    options = {
        "epochs": cfg["epochs"],
        "batch_size": BATCH_SIZE,
        "learning_rate": cfg["learning_rate"],
        "max_length": cfg["max_length"],
    }
    if cfg["max_steps"]:
        options["max_steps"] = cfg["max_steps"]  # any SFTConfig field passes through nbalign.sft
    span = Span()
    nbalign.lora(**LORA)
    run = nbalign.sft(rows, out=cfg["out"], overwrite=True, **options)
    span.stop()
    trained_s, cpu_s, sft_call_s = span.end, span.cpu, span.wall
    rss_train = peak_rss_mib()
    cuda_train = cuda_peak_mib()

    summary = run.summary
    spec = run.spec
    trl_config = spec.get("trl_config", {})
    logs = [json.loads(line) for line in (Path(cfg["out"]) / "metrics.jsonl").read_text().splitlines() if line]
    last_loss, last_loss_step = _last(logs, "loss")
    logged_tokens, logged_tokens_step = _last(logs, "num_tokens")

    from nbalign.data import to_conversations
    from nbalign.tokens import tokenize_sft
    from nbalign.models import load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve("smollm2-135m"))
    enc = tokenize_sft(to_conversations(rows), tokenizer, completion_only=True)
    lengths = [len(ids) for ids in enc["input_ids"]]
    loss_tokens_per_epoch = sum(sum(m[: cfg["max_length"]]) for m in enc["completion_mask"])

    result = {
        "side": "nbalign",
        "status": run.status,
        "steps": summary.get("steps"),
        "epochs_done": summary.get("epochs"),
        "tokens": summary.get("tokens"),
        "tokens_source": "status.json summary (last logged num_tokens)",
        "tokens_logged": logged_tokens,
        "tokens_logged_at_step": logged_tokens_step,
        "tokens_expected": _expected_tokens(lengths, cfg["max_length"], cfg["epochs"], cfg["max_steps"]),
        "train_runtime_s": summary.get("runtime_s"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "train_loss_mean": summary.get("train_loss"),
        "final_loss": summary.get("final_loss"),
        "final_loss_step": last_loss_step,
        "loss_on": "assistant turns + end-of-turn token (nbalign completion mask)",
        "loss_tokens_per_epoch": loss_tokens_per_epoch,
        "input_tokens_per_epoch": sum(min(n, cfg["max_length"]) for n in lengths),
        "imports_s": round(imports_s, 2),
        "setup_and_train_s": round(sft_call_s, 2),  # lora report + nbalign.sft (load, data, train, save)
        "cpu_s": round(cpu_s, 1),  # CPU seconds over the same span
        "tokens_per_cpu_s": round(summary["tokens"] / cpu_s, 2) if summary.get("tokens") else None,
        "wall_to_trained_s": round(trained_s, 2),
        "rss_after_imports_mib": round(rss_after_imports, 1),
        "peak_rss_train_mib": round(rss_train, 1),
        "cuda_peak_train_mib": cuda_train,
        "bf16": trl_config.get("bf16"),
        "gradient_checkpointing": trl_config.get("activation_checkpointing", trl_config.get("gradient_checkpointing")),
        "logging_steps": trl_config.get("logging_steps"),
        "learning_rate": trl_config.get("learning_rate"),
        "max_length": trl_config.get("max_length"),
        "use_cpu": trl_config.get("use_cpu"),
        "notes": [],
    }
    if summary.get("tokens") is None:
        result["notes"].append("status.json has no token count: tokens/s not available from nbalign")

    if cfg["eval"]:
        rows_h, prompts, is_json = _heldout()
        span = Span()
        answers = run.generate(prompts, max_new_tokens=48)
        from nbalign.generation import load_for_inference
        from nbalign.generation import CACHE

        # The tuned model as run.generate loads it (base + adapter merged), without keeping two copies.
        CACHE.release()
        model, tok = load_for_inference(str(run.path))
        nll, n = answer_nll(model, tok, rows_h)
        result.update(_eval_fields(answers, prompts, is_json, nll, n, span.elapsed()))
    return result


def worker_trl(cfg: dict, variant: str) -> dict:
    _import_stack()
    imports_s = now()
    rss_after_imports = peak_rss_mib()

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from nbalign.examples import json_answers

    rows = json_answers("train")
    notes = []
    kwargs = {
        "output_dir": cfg["out"],
        "learning_rate": cfg["learning_rate"],
        "per_device_train_batch_size": BATCH_SIZE,
        "max_length": cfg["max_length"],
        **TRL_VARIANTS[variant],
    }
    if cfg["max_steps"]:
        kwargs["max_steps"] = cfg["max_steps"]
    else:
        kwargs["num_train_epochs"] = cfg["epochs"]
    span = Span()
    try:
        config = SFTConfig(**kwargs)
    except ValueError as exc:
        # TRL's default bf16=True is refused on a machine without a bf16 GPU unless use_cpu is set; that
        # error names the fix, which is what a user would do: set it, and nothing else.
        if "use_cpu" not in str(exc):
            raise
        notes.append(f"SFTConfig with TRL defaults raised ValueError({str(exc)!r}); set use_cpu=True as it asks")
        kwargs["use_cpu"] = True
        config = SFTConfig(**kwargs)
    trainer = SFTTrainer(model=cfg["model_dir"], args=config, train_dataset=Dataset.from_list(rows),
                         peft_config=peft_lora_config())
    setup_s = span.elapsed()
    output = trainer.train()
    trainer.save_model(cfg["out"])
    span.stop()
    trained_s, cpu_s = span.end, span.cpu
    rss_train = peak_rss_mib()
    cuda_train = cuda_peak_mib()

    metrics = dict(output.metrics or {})
    logs = trainer.state.log_history
    last_loss, last_loss_step = _last(logs, "loss")
    logged_tokens, logged_tokens_step = _last(logs, "num_tokens")
    # num_tokens in the logs is the trainer's running total at the last *logged* step; TRL's default
    # logging_steps=10 logs no entry at a final step that is not a multiple of 10, so read the running
    # total itself (the same counter, over every step) and fall back to the log when it is missing.
    tokens = getattr(trainer, "_total_train_tokens", None)
    source = "SFTTrainer._total_train_tokens (the counter num_tokens logs), after the last step"
    if not tokens:
        tokens, source = logged_tokens, f"last logged num_tokens (step {logged_tokens_step})"
    runtime = metrics.get("train_runtime")

    ds = trainer.train_dataset
    lengths = [len(ids) for ids in ds["input_ids"]]
    if "completion_mask" in ds.column_names:
        loss_tokens = sum(sum(m) for m in ds["completion_mask"])
    elif "assistant_masks" in ds.column_names:
        loss_tokens = sum(sum(m) for m in ds["assistant_masks"])
    else:
        loss_tokens = sum(lengths)
    loss_on = (
        "completion tokens" if getattr(trainer, "completion_only_loss", False)
        else "assistant tokens" if config.assistant_only_loss else "every token (system, user and assistant turns)"
    )

    result = {
        "side": variant,
        "status": "finished",
        "steps": trainer.state.global_step,
        "epochs_done": round(float(trainer.state.epoch or 0), 3),
        "tokens": int(tokens) if tokens else None,
        "tokens_source": source,
        "tokens_logged": logged_tokens,
        "tokens_logged_at_step": logged_tokens_step,
        "tokens_expected": _expected_tokens(lengths, cfg["max_length"], cfg["epochs"], cfg["max_steps"]),
        "train_runtime_s": round(runtime, 2) if runtime else None,
        "tokens_per_s": round(tokens / runtime, 1) if tokens and runtime else None,
        "train_loss_mean": metrics.get("train_loss"),
        "final_loss": last_loss,
        "final_loss_step": last_loss_step,
        "loss_on": loss_on,
        "loss_tokens_per_epoch": loss_tokens,
        "input_tokens_per_epoch": sum(lengths),
        "imports_s": round(imports_s, 2),
        "setup_s": round(setup_s, 2),  # SFTConfig + SFTTrainer (model load, LoRA wrap, tokenisation)
        "cpu_s": round(cpu_s, 1),  # CPU seconds from SFTConfig to the saved adapter
        "tokens_per_cpu_s": round(tokens / cpu_s, 2) if tokens else None,
        "wall_to_trained_s": round(trained_s, 2),
        "rss_after_imports_mib": round(rss_after_imports, 1),
        "peak_rss_train_mib": round(rss_train, 1),
        "cuda_peak_train_mib": cuda_train,
        "bf16": config.bf16,
        "gradient_checkpointing": getattr(config, "activation_checkpointing", config.gradient_checkpointing),
        "logging_steps": config.logging_steps,
        "learning_rate": config.learning_rate,
        "max_length": config.max_length,
        "use_cpu": config.use_cpu,
        "sft_config_kwargs": {k: v for k, v in kwargs.items() if k != "output_dir"},  # all else: TRL defaults
        "notes": notes,
    }

    if cfg["eval"]:
        from nbalign.generation import generate_with

        rows_h, prompts, is_json = _heldout()
        span = Span()
        model, tok = trainer.model, trainer.processing_class
        model.eval()
        answers = generate_with(model, tok, prompts, max_new_tokens=48)
        nll, n = answer_nll(model, tok, rows_h)
        result.update(_eval_fields(answers, prompts, is_json, nll, n, span.elapsed()))
    return result


def _eval_fields(answers, prompts, is_json, nll, n, seconds) -> dict:
    return {
        "heldout_json": sum(bool(is_json(a)) for a in answers),
        "heldout_total": len(answers),
        "heldout_answer_nll": round(nll, 4),
        "heldout_answer_tokens": n,
        "heldout_answers": [{"prompt": p, "answer": a, "json": bool(is_json(a))} for p, a in zip(prompts, answers)],
        "eval_s": round(seconds, 2),
    }


def worker_main(side: str, cfg_path: str, out_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    result = worker_nbalign(cfg) if side == "nbalign" else worker_trl(cfg, side)
    result["process_s"] = round(now(), 2)
    result["peak_rss_end_mib"] = round(peak_rss_mib(), 1)
    result["cuda_peak_end_mib"] = cuda_peak_mib()
    write_result(out_path, result)


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------
def run_side(side: str, cfg: dict, workdir: Path, log_dir: Path, repeat: int = 0) -> dict:
    tag = side if repeat == 0 else f"{side}-{repeat}"
    out = workdir / tag
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / f"{tag}.cfg.json"
    cfg_path.write_text(json.dumps({**cfg, "out": str(out)}))
    log = log_dir / f"sft-{tag}.log"
    print(f"[bench] {tag}: running (log: {log}) ...", flush=True)
    try:
        done = run_worker(
            __file__, ["--worker", side, "--cfg", str(cfg_path)], result=workdir / f"{tag}.result.json", log=log,
            env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},  # no network lookups on either side
            cwd=str(workdir),
        )
    except WorkerFailed as exc:
        raise SystemExit(f"[bench] {tag} failed (exit {exc.returncode}); last lines of {log}:\n{exc.tail()}") from None
    result = done.result
    result["process_wall_s"] = round(done.wall_s, 2)
    result["loadavg_before"] = done.loadavg_before
    result["loadavg_after"] = done.loadavg_after
    print(
        f"[bench] {tag}: {result['steps']} steps, {result['tokens_per_s']} tok/s, "
        f"peak RSS {result['peak_rss_train_mib']:.0f} MiB, process {done.wall_s:.1f} s",
        flush=True,
    )
    return result


# Per-run numbers that vary with the machine's load: the report shows their median over --repeats.
AGGREGATED = ("train_runtime_s", "tokens_per_s", "cpu_s", "tokens_per_cpu_s", "wall_to_trained_s",
              "peak_rss_train_mib", "cuda_peak_train_mib", "imports_s")


def aggregate_side(rs: list[dict]) -> dict:
    """The first run (the one evaluated), with the load-dependent numbers replaced by their median."""
    out = aggregate(rs, AGGREGATED)
    out["tokens_per_s_each"] = [r["tokens_per_s"] for r in rs if r.get("tokens_per_s") is not None]
    return out


def markdown(report: dict) -> str:
    res = report["results"]
    sides = [s for s in SIDES if s in res]
    nb, trl = res.get("nbalign"), res.get("trl")
    cuda = any(r.get("cuda_peak_train_mib") is not None for r in res.values())
    evald = all("heldout_json" in r for r in res.values())

    many = max(r.get("repeats", 1) for r in res.values()) > 1
    rows = [
        # (label, key or function, digits, ratio?)
        ("optimizer steps", "steps", 0, False),
        ("tokens trained (non-padding inputs, all steps)", "tokens", 0, False),
        ("training time, `train_runtime` (s)", "train_runtime_s", 1, True),
        ("**tokens / s**", "tokens_per_s", 1, True),
        ("CPU seconds, config to saved adapter", "cpu_s", 1, True),
        ("tokens / CPU second", "tokens_per_cpu_s", 2, True),
        ("**peak RSS after training (MiB)**", "peak_rss_train_mib", 0, True),
        ("peak RSS at process end (MiB)", "peak_rss_end_mib", 0, True),
        ("RSS after imports (MiB)", "rss_after_imports_mib", 0, False),
    ]
    if many:
        rows.insert(4, ("tokens / s, each run", lambda r: ", ".join(f"{v:.1f}" for v in r["tokens_per_s_each"]), 0, False))
    if cuda:
        rows += [("CUDA max allocated during training (MiB)", "cuda_peak_train_mib", 0, True)]
    rows += [
        ("**wall to trained model, incl. imports + load + save (s)**", "wall_to_trained_s", 1, True),
        ("process wall, incl. interpreter start and held-out eval (s)", "process_wall_s", 1, True),
        ("bf16", "bf16", 0, False),
        ("gradient checkpointing", "gradient_checkpointing", 0, False),
        ("loss computed on", "loss_on", 0, False),
        ("loss tokens / input tokens per epoch",
         lambda r: f"{r['loss_tokens_per_epoch']:,} / {r['input_tokens_per_epoch']:,}", 0, False),
        ("training loss, mean over run", "train_loss_mean", 3, False),
        ("last logged training loss (step)",
         lambda r: "-" if r.get("final_loss") is None else f"{r['final_loss']:.3f} (step {r['final_loss_step']})", 0, False),
    ]
    if evald:
        rows += [
            ("held-out answer NLL / token (same mask both sides)", "heldout_answer_nll", 3, False),
            ("**held-out answers that are valid JSON**", lambda r: f"{r['heldout_json']} / {r['heldout_total']}", 0, False),
        ]
    table = []
    for label, key, digits, with_ratio in rows:
        cells = [label]
        for s in sides:
            v = key(res[s]) if callable(key) else res[s].get(key)
            cells.append(fmt(v, digits) if not isinstance(v, str) else v)
        if nb and trl:
            q = ratio(nb.get(key), trl.get(key)) if with_ratio and not callable(key) else None
            cells.append(fmt_ratio(q, missing=""))
        table.append(cells)
    return md_table(["", *sides, *(["nbalign / trl"] if nb and trl else [])], table)


def render_report(report: dict) -> str:
    cfg, res, m = report["config"], report["results"], report["machine"]
    steps = f"max_steps={cfg['max_steps']}" if cfg["max_steps"] else f"{cfg['epochs']:g} epochs"
    parts = [
        "# SFT benchmark: nbalign vs plain TRL",
        "",
        f"{report['date']} · {m['processor']} · {m['cpus']} CPUs · device: {report['device']} · "
        f"torch {m['versions']['torch']}, transformers {m['versions']['transformers']}, "
        f"trl {m['versions']['trl']}, peft {m['versions']['peft']}",
        "",
        f"Job: SmolLM2-135M-Instruct, `json_answers('train')` ({cfg['rows']} conversations, `messages`), "
        f"LoRA r={LORA['r']} alpha={LORA['alpha']} dropout={LORA['dropout']} {LORA['target_modules']}, "
        f"lr {cfg['learning_rate']:g}, batch {BATCH_SIZE}, {steps}, max_length {cfg['max_length']}. "
        "Sides ran one after the other, each in its own process"
        + (f", {cfg['repeats']} times each, interleaved; timings and peak RSS are medians, the loss and "
           "held-out rows come from the first repeat." if cfg.get("repeats", 1) > 1 else "."),
        "",
        markdown(report),
        "",
        "Ratios are nbalign / trl: above 1 for tokens/s means nbalign is faster; below 1 for memory and "
        "time means nbalign uses less.",
        "",
    ]
    notes = []
    for side, r in res.items():
        for n in r.get("notes", []):
            notes.append(f"- {side}: {n}")
        if r.get("tokens_expected") is not None and r.get("tokens") is not None and r["tokens"] != r["tokens_expected"]:
            notes.append(
                f"- {side}: tokens counted {r['tokens']:,} but whole epochs of the tokenised data hold "
                f"{r['tokens_expected']:,}"
            )
        if r.get("tokens_logged") is not None and r.get("tokens") is not None and r["tokens_logged"] != r["tokens"]:
            notes.append(
                f"- {side}: the last logged num_tokens ({r['tokens_logged']:,} at step {r['tokens_logged_at_step']}) "
                f"is not the total over all {r['steps']} steps ({r['tokens']:,})"
            )
        loads = (r.get("loadavg_before"), r.get("loadavg_after"))
        if all(loads):
            notes.append(f"- {side}: load average before/after {loads[0][0]} / {loads[1][0]} (1 min)")
    nb, trl = res.get("nbalign"), res.get("trl")
    if nb and trl and nb.get("steps") != trl.get("steps"):
        notes.append(f"- WARNING: the sides ran different numbers of optimizer steps ({nb['steps']} vs {trl['steps']})")
    if notes:
        parts += ["Notes:", "", *notes, ""]
    if all("heldout_answers" in r for r in res.values()):
        parts += ["First held-out answers per side:", ""]
        for side, r in res.items():
            for a in r["heldout_answers"][:3]:
                parts.append(f"- {side}: {a['prompt']!r} -> {a['answer'][:100]!r}")
        parts.append("")
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=float, default=3.0, help="epochs on both sides (default 3: 21 optimizer steps)")
    p.add_argument("--max-steps", type=int, default=None, help="stop both sides after this many optimizer steps")
    p.add_argument("--quick", action="store_true", help="smoke check: 4 optimizer steps per side")
    p.add_argument("--learning-rate", type=float, default=2e-4, help="both sides (nbalign's LoRA default; TRL's is 2e-5)")
    p.add_argument("--max-length", type=int, default=1024, help="both sides (the default of both)")
    p.add_argument("--sides", default="nbalign,trl",
                   help=f"comma-separated, run in this order; from {', '.join(SIDES)} (default nbalign,trl)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every side this many times, interleaved, and report medians (default 1)")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out generation and answer loss")
    p.add_argument("--results", default=str(RESULTS), help="folder for sft.json, sft.md and the worker logs")
    p.add_argument("--keep", action="store_true", help="keep the run folders (printed) instead of deleting them")
    add_worker_options(p)
    args = p.parse_args(argv)

    if args.worker:
        worker_main(args.worker, args.cfg, args.result)
        return 0

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES]
    if bad:
        p.error(f"unknown side(s) {bad}; pick from {', '.join(SIDES)}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    max_steps = 4 if args.quick and args.max_steps is None else args.max_steps

    from nbalign.examples import json_answers
    from nbalign.models import builtin_model_dir

    model_dir = str(builtin_model_dir())  # converted from GGUF once, before any timing starts
    rows = len(json_answers("train"))
    cfg = {
        "model_dir": model_dir,
        "epochs": args.epochs,
        "max_steps": max_steps,
        "learning_rate": args.learning_rate,
        "max_length": args.max_length,
        "eval": not args.no_eval,
        "rows": rows,
        "repeats": args.repeats,
    }
    steps = max_steps or max(1, int(math.ceil(rows / BATCH_SIZE) * args.epochs))
    print(f"[bench] {len(sides)} side(s), about {steps} optimizer steps each, sequentially", flush=True)

    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="nbalign-bench-sft-"))
    runs = {side: [] for side in sides}
    try:
        for repeat in range(args.repeats):  # interleaved: nbalign, trl, nbalign, trl, ...
            for side in sides:
                cfg_r = {**cfg, "eval": cfg["eval"] and repeat == 0}  # evaluate the first repeat only
                runs[side].append(run_side(side, cfg_r, workdir, results_dir, repeat))
    finally:
        if args.keep:
            print(f"[bench] run folders kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    results = {side: aggregate_side(rs) for side, rs in runs.items()}

    import torch

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "machine": machine(),
        "config": {k: v for k, v in cfg.items() if k != "model_dir"} | {"batch_size": BATCH_SIZE, "lora": LORA,
                                                                        "sides": sides},
        "results": results,
        "repeats": {side: [{k: r.get(k) for k in (*AGGREGATED, "loadavg_before", "loadavg_after")} for r in rs]
                    for side, rs in runs.items()},
    }
    nb, trl = results.get("nbalign"), results.get("trl")
    if nb and trl:
        report["ratios_nbalign_over_trl"] = ratios(nb, trl, ("tokens_per_s", "train_runtime_s", "peak_rss_train_mib",
                                                             "peak_rss_end_mib", "cuda_peak_train_mib",
                                                             "wall_to_trained_s", "process_wall_s"))
    text = render_report(report)
    (results_dir / "sft.json").write_text(json.dumps(report, indent=2, default=str))
    (results_dir / "sft.md").write_text(text)
    print()
    print(text)
    print(f"[bench] wrote {results_dir / 'sft.json'} and {results_dir / 'sft.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
