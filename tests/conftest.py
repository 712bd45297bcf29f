"""Shared fixtures: a tiny random Llama with the SmolLM2 tokenizer for fast engine tests, the real
built-in model for behaviour tests, and a clean session per test."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # this machine has no model hub; say so instead of waiting
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The untrained models' measurements are reused within one test session (the workers inherit this), never from
# an earlier one: a suite on a fresh machine and a suite here do the same work.
os.environ.setdefault("NBALIGN_EVAL_CACHE", tempfile.mkdtemp(prefix="nbalign-eval-cache-"))
# Runs that several tests read (the `shares` marker, helpers.shared_run): trained once per session by whichever
# worker asks first.
os.environ.setdefault("NBALIGN_TEST_SHARED_RUNS", tempfile.mkdtemp(prefix="nbalign-shared-runs-"))


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
    # Each xdist worker collects and orders the tests itself, and sees its worker count in workerinput (its own
    # `numprocesses` option is None): without this the plan below never applied and every slow test went first.
    workers = getattr(config, "workerinput", {}).get("workercount") or getattr(config.option, "numprocesses", 0)
    items[:] = scheduled(items, int(workers or 0))


# Seconds the longest tests took in `make test` (one thread each, bf16 CPU): a scheduling hint only. A wrong or
# missing entry costs time, never a result; other slow tests count as 40 s, fast ones as 1 s. Measured
# 2026-12-08.
LONGEST = {
    "test_alignment_tax_notebook_flags_the_run_that_forgets_and_the_run_that_over_refuses": 220,
    "test_kto_from_thumbs_reaches_the_same_target": 173,
    "test_labels_given_in_the_widget_train_dpo_to_move_the_answers_not_only_the_reward": 135,
    "test_dpo_notebook_runs_the_defaults_the_sweep_and_pure_dpo": 49,
    "test_sft_teaches_the_builtin_model_a_one_line_json_format": 113,
    "test_the_demo_task_on_the_line_defaults_keeps_the_held_out_answers_right": 113,
    "test_lora_sft_notebook_runs_and_teaches_the_format": 57,
    "test_rlhf_notebook_trains_against_a_function_and_a_reward_model": 93,
    "test_kto_notebook_balances_thumbs_and_unpairs_pairs": 49,
    "test_grpo_with_a_brevity_reward_shortens_answers_with_bounded_kl": 73,
    "test_reward_model_notebook_trains_scores_and_shows_where_it_fails": 63,
    "test_label_and_align_notebook_labels_model_answers_and_trains_on_them": 45,
    "test_reward_model_learns_the_terse_style_on_the_builtin_model": 54,
    "test_the_estimate_is_within_a_quarter_of_the_measured_peak": 106,
    "test_two_cpu_processes_under_accelerate_reach_the_single_process_loss": 25,
    # Without its shared JSON run, which counts under test_sft_teaches_the_builtin_model_a_one_line_json_format.
    "test_merging_a_format_adapter_with_a_refusal_adapter_keeps_half_of_each": 100,
    "test_each_type_moves_the_builtin_model_toward_the_data": 64,
    "test_the_builtin_model_tuned_exports_to_gguf_and_gives_the_runs_greedy_answers": 44,
    "test_merge_and_export_notebook_merges_compares_chats_and_exports": 135,
    "test_peft_family_notebook_trains_each_type_and_plots_cost_and_result": 85,
}


def expected_seconds(item) -> float:
    return LONGEST.get(item.originalname or item.name, 40 if "slow" in item.keywords else 1)


def scheduled(items: list, workers: int) -> list:
    """The order the workers get the tests in. Without workers: the slow real-model tests first. With `-n N`
    (make test: 2): xdist's worksteal scheduler hands each worker a contiguous 1/N of the list and lets an idle
    worker steal from the tail of a busy one, so each part starts with its share of the long tests, dealt
    longest first to the part with the least work so far (LPT), and ends with the short ones that even out the
    finish; before this, one part held every slow test and the other stole them by count, not by length."""
    slow = sorted((i for i in items if "slow" in i.keywords), key=expected_seconds, reverse=True)
    fast = [i for i in items if "slow" not in i.keywords]
    if workers < 2 or len(items) < 2 * workers:
        return slow + fast
    parts, work = [[] for _ in range(workers)], [0.0] * workers
    for unit in sorted(units(slow), key=lambda u: sum(map(expected_seconds, u)), reverse=True):
        k = work.index(min(work))
        parts[k].extend(unit)
        work[k] += sum(map(expected_seconds, unit))
    # xdist splits by count: part k holds the k-th len(items) // workers items (the last part the rest).
    sizes = [len(items) // workers] * (workers - 1) + [len(items) - (len(items) // workers) * (workers - 1)]
    rest = iter(fast)
    for part, size in zip(parts, sizes):
        while len(part) < size and (item := next(rest, None)) is not None:
            part.append(item)
    # A part over its size, or too few fast tests to fill one (`-n 2` on a file of slow tests): no plan.
    return [item for part in parts for item in part] if [len(p) for p in parts] == sizes else slow + fast


def units(slow: list) -> list[list]:
    """The slow tests in units that go to one worker together: those marked `shares(name)` read one run trained
    once per session (helpers.shared_run), or the untrained model's measurements on the same held-out data (the
    evaluation cache), and on one worker the second waits for nothing and measures nothing twice."""
    groups: dict = {}
    for item in slow:
        mark = item.get_closest_marker("shares")
        groups.setdefault(mark.args[0] if mark else id(item), []).append(item)
    return list(groups.values())


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


@pytest.fixture(scope="session")
def json_sft_run(smollm2_dir):
    """The built-in model taught the one-line JSON answers with the defaults (LoRA r=16 on all linear layers, 3
    epochs, all 51 training rows), evaluated on the 16 held-out questions: what `%sft --data train --eval-data
    heldout` gives. Trained once per session and read by test_behaviour (what the defaults reach), test_merge (one
    side of the two-behaviour merge) and test_export (back to GGUF); no test may change it."""
    from helpers import shared_run

    def train(out: str):
        import nbalign
        from nbalign import session
        from nbalign.examples import json_answers

        nbalign.lora(r=16, alpha=32, target_modules="all-linear")
        try:
            # All 51 rows: half of them (26 rows, 12 steps) left 0 of 16 held-out answers in the format (measured).
            return nbalign.sft(json_answers("train"), eval_data=json_answers("heldout"), out=out, epochs=3,
                               eval_points=0)
        finally:
            session.reset()

    return shared_run("json-sft", train)


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
