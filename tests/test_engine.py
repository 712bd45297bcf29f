"""The engine on a tiny random Llama: run folders, adapters, interrupts, resume, errors, memory."""

import json
import os

import pytest
from helpers import chats, interrupt_at, live_models, moved_weights

import nbalign
from nbalign.clock import describe_times
from nbalign.errors import NbalignError
from nbalign.runfolder import read_metrics


def says_ok(answers) -> int:
    return sum(a.startswith("OK") for a in answers)


def test_sft_teaches_heldout_answers_and_writes_a_complete_run_folder(tiny_model, in_tmp):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nbalign.generation import generate_with

    train, heldout = chats(24)[:16], chats(24)[16:]
    prompts = [row["messages"][0]["content"] for row in heldout]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    before = generate_with(AutoModelForCausalLM.from_pretrained(tiny_model), tokenizer, prompts, max_new_tokens=3)

    nbalign.lora(r=8, model=tiny_model)
    run = nbalign.sft(train, model=tiny_model, out="runs/t", epochs=3, batch_size=4, learning_rate=3e-2)

    assert run.status == "finished"
    folder = in_tmp / "runs" / "t"
    assert {"spec.json", "status.json", "metrics.jsonl", "README.md", "adapter"} <= set(os.listdir(folder))
    spec = json.loads((folder / "spec.json").read_text())
    assert spec["method"] == "sft" and spec["seed"] == 42 and "trl" in spec["versions"]
    assert spec["spec"]["lora"]["r"] == 8  # the session's %%lora setting was used
    assert run.summary["steps"] == 12 and len(run.metrics) >= 12
    # The adapter is a plain PEFT adapter, and it learned: held-out prompts now get the taught answer.
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), folder / "adapter")
    after = generate_with(tuned, tokenizer, prompts, max_new_tokens=3)
    assert says_ok(before) == 0 and says_ok(after) == len(prompts), (before, after)
    assert says_ok(run.generate(prompts, max_new_tokens=3)) == len(prompts)
    listed = nbalign.list_runs("runs")
    assert listed.loc[0, "run"] == str(folder.relative_to(in_tmp)) and listed.loc[0, "status"] == "finished"
    assert "<img" in run._repr_html_() and "finished" in repr(run)


def test_a_finished_run_is_never_overwritten_by_accident(tiny_model, in_tmp):
    nbalign.sft(chats(4), model=tiny_model, out="runs/t", epochs=1, batch_size=4)
    status = (in_tmp / "runs/t/status.json").read_text()
    with pytest.raises(NbalignError, match="already holds a finished run.*--overwrite"):
        nbalign.sft(chats(4), model=tiny_model, out="runs/t", epochs=1)
    assert (in_tmp / "runs/t/status.json").read_text() == status
    run = nbalign.sft(chats(4), model=tiny_model, out="runs/t", epochs=2, batch_size=4, overwrite=True)
    assert run.summary["steps"] == 2


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lr_scheduler_typ": "cosine"}, "did you mean 'lr_scheduler_type'"),
        ({"lora": {"target_modules": ["qkv_proj"]}}, "has no module named 'qkv_proj'.*q_proj"),
        ({"model": "someone/not-cached-model"}, "not in the Hugging Face cache"),
        ({"data": []}, "is empty"),
        ({"data": [{"question": "q", "answer": "a"}]}, "needs `messages`"),
        ({"output_dir": "elsewhere"}, "set by nbalign from --out"),
        ({"lora": 3}, "'lora' must be a mapping"),
    ],
)
def test_bad_runs_fail_before_anything_is_written(tiny_model, in_tmp, options, message):
    values = {"data": chats(4), "model": tiny_model, "out": "runs/bad", **options}
    with pytest.raises(NbalignError, match=message):
        nbalign.sft(**values)
    assert not (in_tmp / "runs").exists()


@pytest.mark.parametrize(
    "adapter, saved",
    [({"type": "dora", "r": 4}, "adapter"), ({"type": "full"}, "model"), ({"quantize": "4bit", "r": 4}, "adapter")],
)
def test_dora_full_and_qlora_train_and_save(tiny_model, in_tmp, adapter, saved):
    nbalign.lora(model=tiny_model, **adapter)
    # No evaluation watch: generating with bitsandbytes' 4-bit CPU kernels fails on the tiny model's 16-wide
    # layers (shape '[32, 0]'); the built-in model's QLoRA run (test_behaviour) evaluates as usual.
    run = nbalign.sft(chats(8), model=tiny_model, out="runs/a", epochs=1, batch_size=4, learning_rate=1e-3,
                      watch=False)
    assert run.status == "finished" and (in_tmp / "runs/a" / saved / "config.json").exists() == (saved == "model")
    config = json.loads((in_tmp / "runs/a/spec.json").read_text())["spec"]["lora"]
    assert config == {**config, **adapter}
    if saved == "adapter":
        peft_config = json.loads((in_tmp / "runs/a/adapter/adapter_config.json").read_text())
        assert peft_config["use_dora"] == (adapter.get("type") == "dora") and peft_config["r"] == 4
    # 8 chats at batch 4, one epoch = 2 steps, and they trained: LoRA's B matrices start at zero and moved;
    # full fine-tuning moved the attention weights of the base.
    assert run.summary["steps"] == 2
    moved = moved_weights(tiny_model, in_tmp / "runs/a" / saved)
    if saved == "adapter":
        assert len(moved) == 14, moved  # every lora_B of 2 layers x 7 linear modules (all-linear)
    else:
        assert "model.layers.0.self_attn.q_proj.weight" in moved, moved
    run.generate("Say the number 3.", max_new_tokens=4)  # generating from the saved weights works


def test_qlora_report_shrinks_base_memory_and_matches_the_loaded_model(tiny_model):
    from nbalign.devices import pick_device
    from nbalign.models import load_model, resolve
    from nbalign.adapters import AdapterSpec

    plain = nbalign.lora(r=4, model=tiny_model)
    quant = nbalign.lora(r=4, quantize="4bit", model=tiny_model)
    assert quant.base_bytes < plain.base_bytes and quant.trainable == plain.trainable
    loaded = load_model(resolve(tiny_model), pick_device(), AdapterSpec(quantize="4bit"))
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert abs(loaded.get_memory_footprint() - quant.base_bytes) / quant.base_bytes < 0.1


def test_cell_override_and_packing(tiny_model, in_tmp):
    nbalign.lora(r=16, model=tiny_model)
    run = nbalign.sft(chats(8), model=tiny_model, out="runs/p", epochs=1, batch_size=2, packing=True,
                      max_length=128, lora={"r": 2, "target_modules": ["q_proj"]})
    spec = json.loads((run.path / "spec.json").read_text())
    assert spec["spec"]["lora"]["r"] == 2 and spec["trl_config"]["packing"] is True
    # 8 chats of about 40 tokens packed into rows of 128: fewer optimizer steps than 8 / 2 unpacked.
    assert run.summary["steps"] < 4


def test_a_run_folder_continues_from_its_adapter(tiny_model, in_tmp):
    first = nbalign.sft(chats(16), model=tiny_model, out="runs/one", epochs=3, batch_size=4, learning_rate=3e-2)
    # Generating from a run folder uses its tuned weights.
    assert says_ok(nbalign.generate("runs/one", ["Say the number 99."], max_new_tokens=3)) == 1
    second = nbalign.sft(chats(16), model="runs/one", out="runs/two", epochs=1, batch_size=4, learning_rate=3e-2)
    spec = json.loads((second.path / "spec.json").read_text())
    assert spec["parent_runs"] == [str((in_tmp / "runs/one").resolve())]
    first_losses = [r["loss"] for r in read_metrics(first.path) if "loss" in r]
    second_losses = [r["loss"] for r in read_metrics(second.path) if "loss" in r]
    # It starts near where the first run ended, not from the random base.
    assert first_losses[0] - second_losses[0] > 0.5 * (first_losses[0] - first_losses[-1]), (first_losses, second_losses)
    with pytest.raises(NbalignError, match="is interrupted, not finished"):
        (in_tmp / "runs/one/status.json").write_text(json.dumps({"status": "interrupted"}))
        nbalign.sft(chats(4), model="runs/one", out="runs/three")


def test_interrupt_saves_then_resume_finishes_the_same_run(tiny_model, in_tmp, monkeypatch):
    data = chats(16)
    interrupt_at(monkeypatch, step=3)
    run = nbalign.sft(data, model=tiny_model, out="runs/i", epochs=2, batch_size=4)
    assert run.status == "interrupted" and "--resume" in run.message
    assert (in_tmp / "runs/i/adapter/adapter_model.safetensors").exists()
    stopped_at = run.summary["steps"]
    assert 3 <= stopped_at < 8  # the step after the interrupt arrived, not the end
    assert [p.name for p in (in_tmp / "runs/i/checkpoints").glob("checkpoint-*")] == [f"checkpoint-{stopped_at}"]
    assert live_models() == 0
    with pytest.raises(NbalignError, match="interrupted; its final weights"):
        run.generate("hi")
    with pytest.raises(NbalignError, match="holds an interrupted run.*--resume"):
        nbalign.sft(data, model=tiny_model, out="runs/i", epochs=2, batch_size=4)
    with pytest.raises(NbalignError, match="data differs"):
        nbalign.sft(chats(15), model=tiny_model, out="runs/i", epochs=2, batch_size=4, resume=True)

    resumed = nbalign.sft(data, model=tiny_model, out="runs/i", epochs=2, batch_size=4, resume=True)
    assert resumed.status == "finished" and resumed.summary["steps"] == 8
    steps = [r["step"] for r in read_metrics(resumed.path) if "loss" in r]
    assert steps == list(range(1, 9))  # continued after the saved step: none trained twice, none skipped


def test_second_interrupt_stops_at_once_and_still_saves(tiny_model, in_tmp, monkeypatch):
    interrupt_at(monkeypatch, step=2, times=2)
    run = nbalign.sft(chats(16), model=tiny_model, out="runs/h", epochs=2, batch_size=4)
    assert run.status == "interrupted" and "before any checkpoint; start again with --overwrite" in run.message
    assert (in_tmp / "runs/h/adapter/adapter_config.json").exists()
    assert live_models() == 0


def test_a_crash_marks_the_run_failed_and_keeps_no_model_alive(tiny_model, in_tmp, monkeypatch):
    from nbalign.methods.sft import SFT

    def broken(self, plan, model, callbacks):
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(SFT, "build_trainer", broken)
    with pytest.raises(NbalignError, match="simulated out of memory.*error.log") as info:
        nbalign.sft(chats(4), model=tiny_model, out="runs/f")
    # The error a notebook would keep (sys.last_traceback) holds no frame with the model in it.
    assert info.value.__context__ is None and live_models() == 0
    assert json.loads((in_tmp / "runs/f/status.json").read_text())["status"] == "failed"
    assert "RuntimeError" in (in_tmp / "runs/f/error.log").read_text()


def test_rerunning_a_cell_leaves_no_model_behind(tiny_model, in_tmp):
    for _ in range(2):
        nbalign.sft(chats(4), model=tiny_model, out="runs/r", epochs=1, batch_size=4, overwrite=True)
        assert live_models() == 0


def test_max_steps_from_the_body_sizes_the_run(tiny_model, in_tmp, capsys):
    run = nbalign.sft(chats(16), model=tiny_model, out="runs/m", epochs=30, batch_size=4, max_steps=5)
    assert run.summary["steps"] == 5 and "5 steps" in capsys.readouterr().out
    logged = [r["step"] for r in read_metrics(run.path) if "loss" in r]
    assert logged == [1, 2, 3, 4, 5]  # ~50 points per run: every step of a 5-step run


def test_a_failing_evaluation_loses_the_evaluation_not_the_training(tiny_model, in_tmp, monkeypatch, capsys):
    """The watch measured before training, then its measurement after training broke (here: made to raise):
    the run still finishes and saves its adapter, says what failed, and writes no evaluation that looks whole."""
    import nbalign.evaluation

    real, calls = nbalign.evaluation.measure, []

    def measure(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("generation broke")
        return real(*args, **kwargs)

    monkeypatch.setattr(nbalign.evaluation, "measure", measure)
    monkeypatch.setenv("NBALIGN_EVAL_CACHE", "0")  # every measurement made here, none reused
    nbalign.lora(model=tiny_model, r=4)
    run = nbalign.sft(chats(8), model=tiny_model, eval_data=chats(4), out="runs/a", epochs=1, batch_size=4,
                      eval_points=0, probe=False, fewshot=0)
    assert run.status == "finished" and (in_tmp / "runs/a/adapter/adapter_config.json").is_file()
    assert len(calls) == 2 and run.summary["evaluation_failed"] == "RuntimeError: generation broke"
    assert not (in_tmp / "runs/a/evaluation.json").exists() and run.evaluation is None
    assert "the evaluation failed after training (RuntimeError: generation broke)" in capsys.readouterr().out


def test_the_summary_says_where_the_time_went(tiny_model, in_tmp, monkeypatch, capsys):
    """Loading, data, training, evaluation and saving add up to the run's wall time, and the evaluation measured
    during training is counted as evaluation, not training (here each measurement is made to take 0.6 s more)."""
    import time

    import nbalign.evaluation

    real = nbalign.evaluation.measure

    def slow_measure(*args, **kwargs):
        time.sleep(0.6)
        return real(*args, **kwargs)

    monkeypatch.setattr(nbalign.evaluation, "measure", slow_measure)
    monkeypatch.setenv("NBALIGN_EVAL_CACHE", "0")
    nbalign.lora(model=tiny_model, r=4)
    start = time.perf_counter()
    run = nbalign.sft(chats(8), model=tiny_model, eval_data=chats(4), out="runs/t", epochs=1, batch_size=4,
                      eval_points=1, probe=False, fewshot=0)
    wall = time.perf_counter() - start
    times = run.summary["time_s"]
    assert list(times) == ["loading", "data", "training", "evaluation", "saving"]
    assert all(v >= 0 for v in times.values()) and times["data"] > 0 and times["training"] > 0, times
    # Outside the phases: building the spec, writing the status, printing (well under a second, even on a busy
    # machine once the garbage collection that frees the model was counted as saving).
    assert wall - 1.0 <= sum(times.values()) <= wall, (times, wall)
    assert times["evaluation"] >= 3 * 0.6, times  # before, at the middle step, after
    # The trainer's own clock holds the measurements made during training; the training phase does not.
    assert times["training"] <= run.summary["runtime_s"] - 2 * 0.6 + 0.2, (times, run.summary)
    # The printed total is the phases' sum, in the clock's format ("9.8 s", or "18 s" on a loaded machine).
    assert f"sft: finished after {describe_times(times)}" in capsys.readouterr().out
    page = run._repr_html_()
    assert page.index("<th style='text-align:left;padding-right:1em'>time</th>") < page.index(">model</th>")
    assert "| time | " in (run.path / "README.md").read_text()


def test_the_untrained_models_numbers_are_measured_once_per_model_and_data(tiny_model, in_tmp, monkeypatch, capsys):
    """A second run from the same model files on the same evaluation data reuses the first run's "before" and
    prompting numbers (and says so) instead of measuring them again; other data measures its answers anew but
    keeps the model's own measures (perplexity, the probe); another start model (a run) or NBALIGN_EVAL_CACHE=0
    measure everything anew."""
    import nbalign.evaluation

    real, calls = nbalign.evaluation.measure, []
    real_own, own_calls = nbalign.evaluation.model_measures, []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("same_as_reference", False))
        return real(*args, **kwargs)

    def counted_own(*args, **kwargs):
        own_calls.append(1)
        return real_own(*args, **kwargs)

    monkeypatch.setattr(nbalign.evaluation, "measure", counted)
    monkeypatch.setattr(nbalign.evaluation, "model_measures", counted_own)
    monkeypatch.setenv("NBALIGN_EVAL_CACHE", str(in_tmp / "cache"))
    nbalign.lora(model=tiny_model, r=4)
    options = dict(model=tiny_model, epochs=1, batch_size=4, eval_points=0, probe=False, fewshot=2)

    first = nbalign.sft(chats(8), eval_data=chats(4), out="runs/a", **options)
    assert calls == [True, False]  # before, after
    assert len(own_calls) == 2  # the model's own measures (perplexity here), before and after
    assert "reused" not in capsys.readouterr().out
    again = nbalign.sft(chats(8), eval_data=chats(4), out="runs/b", learning_rate=1e-3, **options)
    assert calls == [True, False, False]  # only after: the same base, data and settings
    assert "the untrained model's numbers on these prompts are reused" in capsys.readouterr().out
    assert again.evaluation.before == first.evaluation.before
    assert again.evaluation.baseline == first.evaluation.baseline and first.evaluation.baseline["k"] == 2
    assert json.loads((in_tmp / "runs/b/evaluation_before.json").read_text())["answers"] == first.evaluation.before[
        "answers"]

    third = nbalign.sft(chats(8), eval_data=chats(5), out="runs/c", **options)  # other data: measured...
    assert calls[-2:] == [True, False]
    assert len(own_calls) == 2 + 1 + 1  # runs/b measured its after only; runs/c too: its before's were kept
    assert len(third.evaluation.before["answers"]) == 5
    # ...but what depends on the model alone (here the general text's perplexity; the probe too when on) is kept.
    assert "knowledge probe and general-text perplexity are reused" in capsys.readouterr().out
    assert third.evaluation.before["perplexity"] == first.evaluation.before["perplexity"]
    fourth = nbalign.sft(chats(8), model="runs/a", eval_data=chats(4), out="runs/d", epochs=1, batch_size=4,
                         eval_points=0, probe=False, fewshot=2)  # from a run: its adapter's files are part of the start
    assert calls[-2:] == [True, False] and len(own_calls) == 4 + 2
    assert "reused" not in capsys.readouterr().out
    assert fourth.evaluation.before["perplexity"] != first.evaluation.before["perplexity"]
    monkeypatch.setenv("NBALIGN_EVAL_CACHE", "0")
    nbalign.sft(chats(8), eval_data=chats(4), out="runs/e", **options)
    assert calls[-2:] == [True, False]
    assert "reused" not in capsys.readouterr().out


def test_a_prefix_or_prompt_runs_untrained_numbers_are_its_own(tiny_model):
    """A fresh LoRA, DoRA or IA3 adapter leaves the base's answers as they were, but a fresh prefix or prompt
    adapter answers through virtual tokens drawn at random from the seed: the untrained numbers kept for reuse
    (evalcache) are those of its own adapter settings and seed, not of another run's adapter."""
    from nbalign.adapters import AdapterSpec
    from nbalign.devices import pick_device
    from nbalign.evalcache import StartModel
    from nbalign.models import resolve

    ref, device = resolve(tiny_model), pick_device()

    def key(seed=0, **adapter):
        return StartModel.of(ref, AdapterSpec(**adapter), device, seed).identity

    assert key(type="lora") == key(seed=1, type="lora", r=4) == key(type="dora") == key(type="ia3")
    prompt = key(type="prompt")
    assert prompt == key(type="prompt")  # the same cell again: reused
    assert len({prompt, key(type="lora"), key(type="prefix"), key(seed=1, type="prompt"),
                key(type="prompt", virtual_tokens=8)}) == 5


def test_the_training_steps_bf16_weight_copies_are_dropped_before_each_evaluation(tiny_model, in_tmp, monkeypatch):
    """Under CPU bf16 autocast the frozen weights' bf16 copies are kept across training steps (fastpaths); the
    evaluation runs in fp32, so it must not hold them beside its own peak."""
    import nbalign.evaluation
    from nbalign import fastpaths

    monkeypatch.setenv("NBALIGN_CPU_BF16", "1")  # autocast on any CPU (emulated where there is no bf16: tiny model)
    monkeypatch.setenv("NBALIGN_EVAL_CACHE", "0")
    held_at_forget, held_at_measure = [], []
    real_forget, real_measure = fastpaths.forget_casts, nbalign.evaluation.measure

    def forget():
        held_at_forget.append(len(fastpaths._KEPT))
        real_forget()

    def measure(*args, **kwargs):
        held_at_measure.append(len(fastpaths._KEPT))
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(fastpaths, "forget_casts", forget)
    monkeypatch.setattr(nbalign.evaluation, "measure", measure)
    nbalign.lora(model=tiny_model, r=4)
    run = nbalign.sft(chats(8), eval_data=chats(4), model=tiny_model, out="runs/a", epochs=2, batch_size=4,
                      eval_points=2, probe=False, fewshot=0)
    assert run.status == "finished"
    assert len(held_at_measure) >= 3 and not any(held_at_measure), held_at_measure  # before, during, after
    assert max(held_at_forget) >= 14, held_at_forget  # the steps did keep them: 2 layers x 7, and the head
    assert not fastpaths._KEPT
