"""The CUDA paths: bf16 and QLoRA through bitsandbytes' GPU kernels (skipped without CUDA)."""

import json

import pytest
from helpers import chats

import nbalign

pytestmark = pytest.mark.gpu


def test_cuda_is_picked_with_bf16_where_supported():
    import torch

    from nbalign.devices import pick_device

    device = pick_device()
    assert device.type == "cuda" and device.bf16 == torch.cuda.is_bf16_supported()


@pytest.mark.parametrize("quantize", [None, "4bit"])
def test_lora_and_qlora_train_on_the_gpu(tiny_model, in_tmp, quantize):
    nbalign.lora(r=8, quantize=quantize, model=tiny_model)
    run = nbalign.sft(chats(16), model=tiny_model, out="runs/g", epochs=3, batch_size=4, learning_rate=3e-2)
    spec = json.loads((run.path / "spec.json").read_text())
    assert spec["device"].startswith("CUDA") and spec["trl_config"]["bf16"] == ("bf16" in spec["device"])
    answers = run.generate([f"Say the number {i}." for i in range(20, 24)], max_new_tokens=3)
    assert sum(a.startswith("OK") for a in answers) == 4, answers


@pytest.mark.parametrize("method, quantize", [("sft", None), ("sft", "4bit"), ("dpo", None)])
def test_the_memory_estimate_is_within_a_quarter_of_the_cuda_peak(smollm2_dir, in_tmp, method, quantize):
    """The estimate made before loading against torch's own allocator peak over the run (H100, bf16, 2026-11-24:
    SFT LoRA 1.04, QLoRA 0.98, DPO 1.19 at larger batches)."""
    import torch

    text = " ".join(f"word{i % 50}" for i in range(60))
    nbalign.lora(r=16, quantize=quantize)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    if method == "sft":
        rows = [{"messages": [{"role": "user", "content": f"Question {i}: {text}"},
                              {"role": "assistant", "content": f"Answer {i}: {text}"}]} for i in range(16)]
        run = nbalign.sft(rows, out="runs/m", batch_size=8, max_steps=2, watch=False)
    else:
        rows = [{"prompt": f"Question {i}: {text}", "chosen": f"Yes {i}: {text}",
                 "rejected": f"No {i}: {text} {text}"} for i in range(8)]
        run = nbalign.dpo(rows, out="runs/m", batch_size=4, max_steps=2, watch=False)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    ratio = run.summary["memory_estimate_mib"] / peak
    print(f"{method} {quantize}: estimate {run.summary['memory_estimate_mib']} MiB, peak {peak:.0f} MiB ({ratio:.2f})")
    assert 0.75 <= ratio <= 1.25
