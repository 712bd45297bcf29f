"""Benchmark: SFT, DPO, KTO and reward-model training through nbalign and through plain TRL scripts.

    python bench/bench_train.py                    # the four methods on ragged chat data, 1 epoch of 32 rows
    python bench/bench_train.py --quick            # smoke check: a 2-layer model, 8 short rows (CI runs it)
    python bench/bench_train.py --data long --methods sft,dpo   # rows of about 512 tokens: the MFU figure
    python bench/bench_train.py --repeats 2        # each side twice, order alternating; medians

Sides, each in its own subprocess, one at a time (never in parallel: their peaks are their own and they do
not share the CPU), the order alternating between repeats:
  nbalign    nbalign.<method>(rows, ...) with its defaults (the evaluation watch off: a plain script has none)
  trl        the plain TRL script with TRL's config defaults (use_cpu where TRL asks for it, logging every step)
  trl-same   the plain TRL script with nbalign's settings: every config field the nbalign run changed from
             TRL's default (read from its spec.json), its adapter config, and for SFT its tokenised rows
Same model, rows, LoRA, learning rate, batch size, epochs and seed on every side. Each side reports real
(non-padding) tokens per second of training (`train_runtime`), peak memory, the final loss, and its
model-FLOPs utilisation against the matrix-multiply peak measured on this machine first. Results:
bench/results/train.json, train.md and train.png. A benchmark: it asserts nothing about speed.
"""

from __future__ import annotations

from harness import (add_worker_options, LORA, WorkerFailed, fmt, fmt_ratio, loadavg, machine, md_table, now, peak_rss_mib,
                     peft_lora_config, preload, ratio, run_worker, write_result, cuda_peak_mib, aggregate)

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import data as bench_data

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = ("sft", "dpo", "kto", "reward")
SIDES = ("nbalign", "trl", "trl-same")
BATCH, LR = 8, 2e-4
# Config fields that name places or secrets, not settings: never copied from nbalign's run to trl-same.
NOT_SETTINGS = {"output_dir", "logging_dir", "hub_token", "eos_token", "pad_token", "run_name", "local_rank",
                "resume_from_checkpoint", "hub_model_id"}


# ------------------------------------------------------------------------------------------------
# the machine's matrix-multiply peak and the model's FLOPs
# ------------------------------------------------------------------------------------------------
def matmul_peak(seconds: float = 1.0) -> dict:
    """Best measured GFLOP/s of torch.matmul in fp32 and bf16 over a few shapes (square, and the token x
    hidden x MLP shape this model multiplies), on this process's threads or the GPU."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(2048, 2048, 2048), (4096, 576, 1536), (4096, 1536, 576)]
    out = {"device": device, "threads": torch.get_num_threads()}
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for m, k, n in shapes:
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)
            a @ b  # warm up
            reps, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / len(shapes):
                a @ b
                reps += 1
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9)
        out[str(dtype).removeprefix("torch.")] = round(best, 1)
    return out


def model_shape(model_dir: str) -> dict:
    """Parameters that multiply every token (all but the embedding lookup) and the LM head's (hidden x vocab),
    counted on the meta device; the layers and the attention's width (heads x head size) for attention's FLOPs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embed = model.get_input_embeddings().weight.numel()
    body = sum(p.numel() for n, p in model.named_parameters()) - embed  # tied head: counted once, as embedding
    head = config.hidden_size * config.vocab_size
    if not getattr(config, "tie_word_embeddings", False):
        body -= head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"params": body + embed, "body_params": body, "head_params": head, "layers": config.num_hidden_layers,
            "attention_width": config.num_attention_heads * head_dim}


def model_flops(method: str, shape: dict, counts: dict, full: bool) -> float:
    """About 6 x params x tokens for full fine-tuning and 4 x for LoRA (no weight gradients for frozen weights),
    the LM head only where the loss reads its logits; plus attention's own (each layer's scores and weighted sum,
    4 x width FLOPs per causal query-key pair of an example, as PaLM's MFU counts them; 3 x that to train, since
    LoRA or not the gradient runs through every layer's attention); plus the reference's forward (2 x) for DPO and
    KTO, and KTO's KL pass (policy and reference forwards over as many mismatched tokens)."""
    k = 6 if full else 4
    body, head = shape["body_params"], shape["head_params"]
    tokens, read = counts["tokens"], counts["loss_positions"]
    attention = 4 * shape["layers"] * shape["attention_width"] * counts["pairs"]
    train = k * (body * tokens + head * read) + 3 * attention
    if method == "reward":
        return k * body * tokens + 3 * attention
    forward = 2 * (body * tokens + head * read) + attention
    if method == "dpo":
        return train + forward
    if method == "kto":
        return train + 3 * forward
    return train


def token_counts(method: str, rows: list[dict], tokenizer, max_length: int) -> dict:
    """Real tokens one epoch feeds the model (both answers of a pair; prompt + completion otherwise) and the
    positions whose logits the loss reads (the answers; SFT: its completion mask), with nbalign's tokenisation
    (the same chat template TRL applies)."""
    from nbalign.data import to_conversations
    from nbalign.preference_data import to_pairs, to_unpaired
    from nbalign.text import completion_text
    from nbalign.tokens import tokenize_sft

    if method == "sft":
        enc = tokenize_sft(to_conversations(rows), tokenizer, completion_only=True)
        lengths = [min(len(ids), max_length) for ids in enc["input_ids"]]
        read = sum(sum(m[:max_length]) for m in enc["completion_mask"])
        return {"tokens": sum(lengths), "loss_positions": read, "longest": max(lengths), "rows": len(rows),
                "pairs": sum(n * (n + 1) // 2 for n in lengths)}
    tokens = read = longest = pairs = 0
    conv = to_unpaired(rows) if method == "kto" else to_pairs(rows)
    for r in conv:
        answers = (r["completion"],) if method == "kto" else (r["chosen"], r["rejected"])
        for answer in answers:
            head, tail = completion_text(tokenizer, r["prompt"], answer)
            n_head = len(tokenizer(head, add_special_tokens=False)["input_ids"])
            n_all = len(tokenizer(head + tail, add_special_tokens=False)["input_ids"])
            tokens += n_all
            read += n_all - n_head
            longest = max(longest, n_all)
            pairs += n_all * (n_all + 1) // 2
    return {"tokens": tokens, "loss_positions": read if method != "reward" else 0, "longest": longest,
            "rows": len(rows), "pairs": pairs}


# ------------------------------------------------------------------------------------------------
# the sides, each in its own process
# ------------------------------------------------------------------------------------------------
def _rows(cfg: dict) -> list[dict]:
    return bench_data.data(cfg["method"], cfg["rows"], cfg["data"])


def _last(logs: list[dict], key: str):
    return next((entry[key] for entry in reversed(logs) if key in entry), None)


def worker_nbalign(cfg: dict) -> dict:
    import nbalign

    rows = _rows(cfg)
    nbalign.lora(**LORA)
    fn = {"sft": nbalign.sft, "dpo": nbalign.dpo, "kto": nbalign.kto, "reward": nbalign.reward_model}[cfg["method"]]
    options = {"model": cfg["model"], "epochs": cfg["epochs"], "batch_size": BATCH, "learning_rate": LR,
               "max_length": cfg["max_length"]}
    if cfg["method"] != "reward":  # the reward model's evaluation runs after training, outside train_runtime
        options["watch"] = False
    if cfg["method"] == "sft":
        options["eval_split"] = 0  # train on every row, as the TRL sides do
    run = fn(rows, out=cfg["out"], overwrite=True, **options)
    s = run.summary
    logs = [json.loads(line) for line in (Path(cfg["out"]) / "metrics.jsonl").read_text().splitlines() if line]
    spec = json.loads((Path(cfg["out"]) / "spec.json").read_text())
    return {"status": run.status, "steps": s.get("steps"), "train_s": s.get("runtime_s"),
            "train_loss": s.get("train_loss"), "final_loss": _last(logs, "loss"), "time_s": s.get("time_s"),
            "memory_estimate_mib": s.get("memory_estimate_mib"), "memory_peak_mib": s.get("memory_peak_mib"),
            "batches_flattened": s.get("batches_flattened"), "batches_padded": s.get("batches_padded"),
            "padding_saved": s.get("padding_saved"), "bf16": spec["trl_config"].get("bf16"),
            "activation_checkpointing": spec["trl_config"].get("activation_checkpointing"),
            "trl_config": spec["trl_config"], "adapter_dir": str(Path(cfg["out"]) / "adapter")}


def _trl_classes(method: str):
    import trl

    return {"sft": (trl.SFTConfig, trl.SFTTrainer), "dpo": (trl.DPOConfig, trl.DPOTrainer),
            "kto": (trl.KTOConfig, trl.KTOTrainer), "reward": (trl.RewardConfig, trl.RewardTrainer)}[method]


def nbalign_settings(config_cls, trl_config: dict) -> dict:
    """The fields of nbalign's run config that differ from `config_cls`'s defaults: nbalign's settings."""
    defaults = config_cls(output_dir="unused", use_cpu=bool(trl_config.get("use_cpu"))).to_dict()
    return {k: v for k, v in trl_config.items()
            if k not in NOT_SETTINGS and k in defaults and v != defaults[k] and not str(v).startswith("<")}


def worker_trl(cfg: dict, side: str) -> dict:
    from datasets import Dataset

    from nbalign.preference_data import to_pairs, to_unpaired

    method, notes = cfg["method"], []
    config_cls, trainer_cls = _trl_classes(method)
    rows = _rows(cfg)
    kwargs = {"output_dir": cfg["out"], "learning_rate": LR, "per_device_train_batch_size": BATCH,
              "num_train_epochs": cfg["epochs"], "max_length": cfg["max_length"], "logging_steps": 1}
    peft_config = peft_lora_config()
    if method == "reward":
        peft_config.task_type = "SEQ_CLS"
    if method == "sft":
        train = rows
    else:
        train = to_unpaired(rows) if method == "kto" else to_pairs(rows)
    if side == "trl-same":
        from peft import LoraConfig

        kwargs.update(nbalign_settings(config_cls, cfg["nbalign_trl_config"]))
        kwargs["output_dir"] = cfg["out"]
        peft_config = LoraConfig.from_pretrained(cfg["nbalign_adapter_dir"])
        peft_config.inference_mode = False
        if method == "sft":  # nbalign's tokenised rows: its loss mask (assistant turns and their end token)
            from nbalign.data import to_conversations
            from nbalign.models import load_tokenizer, resolve
            from nbalign.tokens import tokenize_sft

            train = tokenize_sft(to_conversations(rows), load_tokenizer(resolve(cfg["model"])), completion_only=True)
            train = [dict(zip(train, values)) for values in zip(*train.values())]
        notes.append("nbalign's settings: " + ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items())
                                                         if k != "output_dir"))
    try:
        config = config_cls(**kwargs)
    except ValueError as exc:  # TRL's bf16 default on a machine without a bf16 GPU: it asks for use_cpu
        if "use_cpu" not in str(exc):
            raise
        notes.append(f"{config_cls.__name__} refused TRL's defaults ({exc}); set use_cpu=True as it asks")
        config = config_cls(**{**kwargs, "use_cpu": True})
    trainer = trainer_cls(model=cfg["model"], args=config, train_dataset=Dataset.from_list(train),
                          peft_config=peft_config)
    output = trainer.train()
    logs = trainer.state.log_history
    return {"status": "finished", "steps": trainer.state.global_step, "train_s": output.metrics["train_runtime"],
            "train_loss": output.metrics.get("train_loss"), "final_loss": _last(logs, "loss"),
            "bf16": config.bf16, "activation_checkpointing": getattr(config, "activation_checkpointing",
                                                                    config.gradient_checkpointing),
            "notes": notes}


AT_TRAIN_END: dict = {}


def _measure_at_train_end() -> None:
    """Every side's peak memory is read the same way, when `Trainer.train` returns: before nbalign's evaluation
    after training (the reward model's accuracy) or anything else a side does after."""
    import transformers

    train = transformers.Trainer.train

    def measured(self, *args, **kwargs):
        output = train(self, *args, **kwargs)
        AT_TRAIN_END.update(peak_rss_mib=round(peak_rss_mib()), cuda_peak_mib=cuda_peak_mib())
        return output

    transformers.Trainer.train = measured


def worker_main(side: str, cfg_path: str, out_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    preload("torch", "transformers", "trl", "peft", "datasets", "nbalign")  # outside the timed spans
    rss_imports = peak_rss_mib()
    _measure_at_train_end()
    result = worker_nbalign(cfg) if side == "nbalign" else worker_trl(cfg, side)
    result.update({"side": side, "method": cfg["method"], **AT_TRAIN_END, "peak_rss_end_mib": round(peak_rss_mib()),
                   "rss_after_imports_mib": round(rss_imports), "process_s": round(now(), 1)})
    write_result(out_path, result)


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------
def tiny_model(folder: Path) -> str:
    """A 2-layer model with the built-in model's width, tokenizer and chat template, random weights: --quick."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from nbalign.models import builtin_model_dir, load_tokenizer, resolve

    source = builtin_model_dir()
    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = 2
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    load_tokenizer(resolve(str(source))).save_pretrained(folder)
    return str(folder)


def run_side(side: str, cfg: dict, workdir: Path, results: Path, tag: str) -> dict:
    out = workdir / tag
    cfg_path = workdir / f"{tag}.cfg.json"
    cfg_path.write_text(json.dumps({**cfg, "out": str(out)}))
    log = results / f"train-{tag}.log"
    print(f"[bench] {tag} ... (log: {log})", flush=True)
    try:
        done = run_worker(__file__, ["--worker", side, "--cfg", str(cfg_path)], result=workdir / f"{tag}.json",
                          log=log, env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}, cwd=str(workdir))
    except WorkerFailed as exc:
        # Kept as a result: a plain TRL side killed for memory where nbalign's trained is a finding, and the sides
        # already measured are not lost with it. main() still exits non-zero (the smoke check stays strict).
        reason = failure(exc.returncode)
        print(f"[bench] {tag} failed ({reason}); last lines of {log}:\n{exc.tail()}", flush=True)
        return {"failed": reason, "log": str(log)}
    r = done.result
    r["tokens_per_s"] = round(cfg["counts"]["tokens"] / r["train_s"], 1)
    r["load_before"], r["load_after"] = done.loadavg_before, done.loadavg_after
    print(f"[bench] {tag}: {r['steps']} steps in {r['train_s']:.1f} s, {r['tokens_per_s']} real tok/s, "
          f"peak RSS {r['peak_rss_mib']:,} MiB, loss {r['train_loss']}", flush=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return r


def failure(returncode: int) -> str:
    if returncode == -9:
        return "killed by SIGKILL (the kernel's out-of-memory killer sends it, and so does a timeout)"
    return f"killed by signal {-returncode}" if returncode < 0 else f"exit {returncode}"


def summarise(method: str, runs: dict[str, list[dict]], counts: dict, shape: dict, peak: dict) -> dict:
    keys = ("train_s", "tokens_per_s", "peak_rss_mib", "cuda_peak_mib")
    done = {side: [r for r in rs if "failed" not in r] for side, rs in runs.items()}
    sides = {}
    for side, rs in runs.items():
        sides[side] = aggregate(done[side], keys) if done[side] else {"failed": rs[0]["failed"]}
        if done[side] and len(done[side]) < len(rs):  # some repeats failed: the figures are the others'
            sides[side]["failures"] = [r["failed"] for r in rs if "failed" in r]
    flops = model_flops(method, shape, counts, full=LORA.get("type") == "full")
    for side, r in sides.items():
        if "failed" in r:
            continue
        r["tokens_per_s_each"] = [x["tokens_per_s"] for x in done[side]]
        r.pop("trl_config", None)
        precision = "bfloat16" if r.get("bf16") else "float32"
        r["model_tflop"] = round(flops / 1e12, 3)
        r["achieved_gflops"] = round(flops / r["train_s"] / 1e9, 1)
        r["mfu"] = round(flops / r["train_s"] / 1e9 / peak[precision], 3)
        r["mfu_against"] = f"{precision} matmul peak {peak[precision]} GFLOP/s"
    memory = "cuda_peak_mib" if any(r.get("cuda_peak_mib") for r in sides.values()) else "peak_rss_mib"
    nb = sides.get("nbalign", {}) if "failed" not in sides.get("nbalign", {}) else {}
    out = {"counts": counts, "sides": sides, "memory_measure": memory, "ratios": {}}
    for other in ("trl", "trl-same"):
        if other in sides and nb and "failed" not in sides[other]:
            out["ratios"][f"nbalign/{other}"] = {
                "tokens_per_s": round(ratio(nb["tokens_per_s"], sides[other]["tokens_per_s"]), 3),
                "peak_memory": round(ratio(nb[memory], sides[other][memory]), 3),
                "train_loss": round(ratio(nb["train_loss"], sides[other]["train_loss"]), 3)
                if nb.get("train_loss") and sides[other].get("train_loss") else None,
            }
    return out


def render(report: dict) -> str:
    cfg, peak = report["config"], report["matmul_peak"]
    header = ["method", "side", "steps", "train s", "real tok/s", "vs trl", "vs trl-same", "peak MiB", "vs trl",
              "vs trl-same", "loss (mean)", "last loss", "MFU", "bf16", "ckpt", "padding saved"]
    rows = []
    for method, m in report["methods"].items():
        mem = m["memory_measure"]
        for side, r in m["sides"].items():
            if "failed" in r:
                rows.append([method, side, f"failed: {r['failed']}"] + [""] * (len(header) - 3))
                continue
            q = {o: m["ratios"].get(f"nbalign/{o}", {}) for o in ("trl", "trl-same")} if side == "nbalign" else {}
            rows.append([method, side, fmt(r["steps"]), fmt(r["train_s"]), fmt(r["tokens_per_s"]),
                         fmt_ratio(q.get("trl", {}).get("tokens_per_s"), ""),
                         fmt_ratio(q.get("trl-same", {}).get("tokens_per_s"), ""),
                         fmt(r.get(mem), 0), fmt_ratio(q.get("trl", {}).get("peak_memory"), ""),
                         fmt_ratio(q.get("trl-same", {}).get("peak_memory"), ""), fmt(r.get("train_loss"), 3),
                         fmt(r.get("final_loss"), 3), f"{100 * r['mfu']:.0f}%", fmt(r.get("bf16")),
                         fmt(r.get("activation_checkpointing")),
                         "" if r.get("padding_saved") is None else f"{100 * r['padding_saved']:.0f}%"])
    counts = "; ".join(f"{m}: {v['counts']['rows']} rows, {v['counts']['tokens']:,} real tokens, longest "
                       f"{v['counts']['longest']}" for m, v in report["methods"].items())
    return "\n".join([
        f"# Training benchmark: nbalign vs plain TRL ({cfg['data']} data{', quick' if cfg['quick'] else ''})", "",
        f"{report['date']} · {report['machine']['processor']} · {report['machine']['cpus']} CPUs · "
        f"device {peak['device']} · measured matmul peak: fp32 {peak['float32']} GFLOP/s, bf16 {peak['bfloat16']} "
        f"GFLOP/s ({peak['threads']} threads) · model {cfg['model_name']} ({report['model']['params'] / 1e6:.1f}M "
        f"params) · LoRA r={LORA['r']} · lr {LR} · batch {BATCH} · {cfg['epochs']:g} epoch(s) · "
        f"{cfg['repeats']} repeat(s), order alternating", "", counts, "",
        md_table(header, rows), "",
        "Real tokens: non-padding tokens the epoch feeds the model (both answers of a DPO/reward pair), the same "
        "count on every side; tokens/s over TRL's `train_runtime`. Memory: the process's peak RSS (CUDA: max "
        "allocated). MFU: model FLOPs (about 4 x params x tokens for LoRA, the LM head only where the loss reads "
        "it, attention's scores and sums, plus reference and KL forwards) per second over the measured matmul "
        "peak of the side's precision. "
        "The SFT loss of `trl` covers every token (TRL's default for `messages` rows), so it is not comparable.",
        "", f"load average at the end: {report['loadavg_end']}", ""])


def plot(report: dict, path: Path) -> None:
    """Three panels per method: tokens/s and peak memory as ratios to TRL's defaults, and MFU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(report["methods"])
    sides = [s for s in SIDES if any(s in report["methods"][m]["sides"] for m in methods)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    width = 0.8 / len(sides)

    def value(method: str, side: str, key: str):
        m = report["methods"][method]
        r, base = m["sides"].get(side, {}), m["sides"].get("trl", {})
        if key == "mfu":
            return 100 * r.get("mfu", 0)
        key = m["memory_measure"] if key == "memory" else key
        return ratio(r.get(key), base.get(key)) or 0

    for i, side in enumerate(sides):
        xs = [j + i * width for j in range(len(methods))]
        for ax, key in zip(axes, ("tokens_per_s", "memory", "mfu")):
            ax.bar(xs, [value(m, side, key) for m in methods], width, label=side)
    titles = ("real tokens / s, x TRL's defaults", "peak memory, x TRL's defaults", "model-FLOPs utilisation (%)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xticks([j + width * (len(sides) - 1) / 2 for j in range(len(methods))], methods)
    for ax in axes[:2]:
        ax.axhline(1.0, color="grey", linewidth=0.8)
    axes[0].legend()
    fig.suptitle(f"nbalign vs plain TRL, {report['config']['data']} data, {report['config']['model_name']}, "
                 f"{report['matmul_peak']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--data", default="ragged", choices=bench_data.KINDS)
    p.add_argument("--rows", type=int, default=32, help="rows per method (default 32: 4 steps of 8 per epoch)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--quick", action="store_true", help="a 2-layer random model, 8 short rows (one step): a smoke check")
    p.add_argument("--results", default=str(RESULTS))
    add_worker_options(p)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.cfg, args.result)
        return 0

    methods = [m for m in args.methods.split(",") if m]
    sides = [s for s in args.sides.split(",") if s]
    if set(methods) - set(METHODS) or set(sides) - set(SIDES):
        p.error(f"methods from {METHODS}, sides from {SIDES}")
    if "trl-same" in sides and "nbalign" not in sides:
        p.error("trl-same copies the settings of the nbalign side: run nbalign too")
    from nbalign.models import builtin_model_dir, load_tokenizer, resolve

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="nbalign-bench-train-"))
    rows = 8 if args.quick else args.rows
    if args.quick:
        args.data = "short"
    model = tiny_model(workdir / "tiny-model") if args.quick else str(builtin_model_dir())
    print("[bench] measuring the matrix-multiply peak ...", flush=True)
    peak = matmul_peak()
    print(f"[bench] peak: {peak}", flush=True)
    shape = model_shape(model)
    tokenizer = load_tokenizer(resolve(model))
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "matmul_peak": peak, "model": shape,
              "config": {"methods": methods, "sides": sides, "data": args.data, "rows": rows, "epochs": args.epochs,
                         "repeats": args.repeats, "quick": args.quick, "batch_size": BATCH, "learning_rate": LR,
                         "lora": LORA, "max_length": args.max_length,
                         "model_name": "2-layer random SmolLM2" if args.quick else "SmolLM2-135M-Instruct"},
              "methods": {}}
    try:
        for method in methods:
            counts = token_counts(method, bench_data.data(method, rows, args.data), tokenizer, args.max_length)
            cfg = {"method": method, "model": model, "rows": rows, "data": args.data, "epochs": args.epochs,
                   "max_length": args.max_length, "counts": counts}
            runs: dict[str, list[dict]] = {s: [] for s in sides}
            for rep in range(args.repeats):
                order = sides if rep % 2 == 0 else [s for s in reversed(sides) if s != "trl-same"] + (
                    ["trl-same"] if "trl-same" in sides else [])
                for side in order:
                    side_cfg = dict(cfg)
                    if side == "trl-same":
                        if "failed" in runs["nbalign"][-1]:
                            runs[side].append({"failed": "not run: the nbalign side whose settings it copies failed"})
                            continue
                        side_cfg["nbalign_trl_config"] = runs["nbalign"][-1]["trl_config"]
                        side_cfg["nbalign_adapter_dir"] = runs["nbalign"][-1]["adapter_dir"]
                    runs[side].append(run_side(side, side_cfg, workdir, results, f"{method}-{side}-{rep}"))
            report["methods"][method] = summarise(method, runs, counts, shape, peak)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["loadavg_end"] = loadavg()
    text = render(report)
    (results / "train.json").write_text(json.dumps(report, indent=2, default=str))
    (results / "train.md").write_text(text)
    plot(report, results / "train.png")
    print("\n" + text)
    print(f"[bench] wrote {results / 'train.json'}, train.md and train.png")
    failed = [f"{m}-{side}" for m, v in report["methods"].items() for side, r in v["sides"].items()
              if "failed" in r or "failures" in r]
    if failed:
        print(f"[bench] failed sides (in the table above): {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
