"""Shared fixtures: a tiny random Llama with the SmolLM2 tokenizer for fast engine tests, the real
built-in model for behaviour tests, and a clean session per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # this machine has no model hub; say so instead of waiting
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
    # The long real-model tests first: with two workers (make test) they start at once and the short ones fill
    # the gaps, instead of one long test starting last.
    items.sort(key=lambda item: "slow" not in item.keywords)


@pytest.fixture(autouse=True)
def _fresh_session():
    from nbalign import session

    session.reset()
    yield
    session.reset()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a safetensors folder (converted once from the GGUF)."""
    from nbalign.models import builtin_model_dir

    return builtin_model_dir()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm2_dir) -> str:
    """A 2-layer random Llama (about 3 M parameters) with the SmolLM2 tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run the test from an empty folder, so runs/ lands there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def kernel_name(tmp_path_factory):
    """The `python3` kernel spec; installed into a private Jupyter path when the environment lacks one."""
    from helpers import python3_kernel

    with pytest.MonkeyPatch.context() as mp:
        yield python3_kernel(tmp_path_factory.mktemp("jupyter"), mp)
