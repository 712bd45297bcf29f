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
