"""%%reward_model and %%rlhf: reward models that score the way TRL trained them, GRPO and RLOO with Python
rewards or a reward model run, clear errors for bad rewards; and (slow) real learning on the built-in model."""

import json

import pytest
from helpers import close, live_models, logged

import nbalign
from nbalign import NbalignError
from nbalign.examples import rambling_answer, style_pairs, terse_answer

PROMPTS = [f"What is {a} plus {b}?" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
FAST_RL = dict(batch_size=8, num_generations=4, max_completion_length=8, max_steps=2)


@pytest.fixture
def ip():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbalign")
    yield shell
    for name in ("rm", "run", "prefs", "held", "prompts", "polite"):
        shell.user_ns.pop(name, None)


def test_reward_model_magic_trains_and_scores_like_trl(tiny_model, in_tmp, ip):
    from transformers import AutoTokenizer
    from trl.data_utils import _tokenize, apply_chat_template

    from nbalign.runs import RewardModel
    from nbalign.scoring import reward_input_ids as encode

    ip.user_ns.update(prefs=style_pairs()[:8], held=style_pairs("heldout")[:4])
    rm = ip.run_cell_magic(
        "reward_model", f"--model {tiny_model} --data prefs --eval-data held --out runs/rm -o rm",
        "batch_size: 4\nmax_steps: 2\nlearning_rate: 1.0e-3\n",
    )
    assert isinstance(rm, RewardModel) and ip.user_ns["rm"] is rm and rm.status == "finished"
    assert live_models() == 0
    assert rm.summary["steps"] == 2 and {"heldout_accuracy", "heldout_margin"} <= set(rm.summary)
    assert rm.spec["trl_config"]["center_rewards_coefficient"] == 0.01
    assert rm.spec["trl_config"]["learning_rate"] == pytest.approx(1e-3)
    # PEFT's SEQ_CLS task saves the new score head with the adapter.
    adapter = json.loads((rm.path / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]

    # One prompt and answer give one number; strings and message lists are the same input.
    score, other = rm.score("What is 2 plus 2?", "Answer: 4."), rm.score("What is 2 plus 2?", "Four, I think.")
    assert type(score) is float and score != pytest.approx(other, rel=1e-3)  # the head reads the answer
    as_messages = rm.score([{"role": "user", "content": "What is 2 plus 2?"}],
                           [{"role": "assistant", "content": "Answer: 4."}])
    assert as_messages == close(score)
    # Several answers are scored in one padded batch, and agree with one at a time (to 1e-4: padding changes
    # float sums on some CPUs).
    assert rm.score("What is 2 plus 2?", ["Answer: 4.", "Four, I think."]) == close([score, other])
    assert rm.score(["Q1?", "Q2?"], ["A1.", "A2."]) == close([rm.score("Q1?", "A1."), rm.score("Q2?", "A2.")])

    # The reloaded model scores exactly as the in-memory one did at the end of training.
    evaluation = json.loads((rm.path / "evaluation.json").read_text())
    again = rm.accuracy(style_pairs("heldout")[:4])
    assert evaluation["split"] == "heldout" and evaluation["pairs"] == 4
    assert again["margin"] == pytest.approx(evaluation["margin"], abs=1e-4)
    assert again["accuracy"] == evaluation["accuracy"] == rm.summary["heldout_accuracy"]
    assert "reward model evaluation" in rm._repr_html_()

    # Scores read the tokens TRL's RewardTrainer trained on, and GRPO/RLOO give a reward model run.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = [{"role": "user", "content": "What is 2 plus 2?"}]
    answer = [{"role": "assistant", "content": "Answer: 4."}]
    trained_on = _tokenize(tokenizer, prompt + answer)["input_ids"]
    in_rl = tokenizer(apply_chat_template({"messages": prompt + answer}, tokenizer)["text"], add_special_tokens=False)
    assert encode(tokenizer, prompt, answer) == list(trained_on) == in_rl["input_ids"]


def test_reward_model_without_eval_data_reports_training_pairs_as_such(tiny_model, in_tmp):
    rm = nbalign.reward_model(style_pairs()[:8], model=tiny_model, out="runs/rm", batch_size=4, max_steps=1,
                              center_rewards=None)
    assert "train_accuracy" in rm.summary and "heldout_accuracy" not in rm.summary
    evaluation = json.loads((rm.path / "evaluation.json").read_text())
    assert evaluation["split"] == "train" and "not held-out" in evaluation["note"]
    assert rm.spec["trl_config"]["center_rewards_coefficient"] is None
    nbalign.sft([{"prompt": "a", "completion": "b"}], model=tiny_model, out="runs/s", max_steps=1)
    with pytest.raises(NbalignError, match="is a %%sft run, not a %%reward_model run"):
        nbalign.RewardModel("runs/s")


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_rlhf_trains_with_a_python_reward_and_logs_every_step(tiny_model, in_tmp, monkeypatch, algorithm):
    from nbalign.methods.rlhf import RLHF

    calls = []

    def brevity(prompts, completions, topic):  # no **kwargs: nbalign passes only what it declares
        calls.append({"prompts": prompts, "completions": completions, "topic": topic})
        return [-len(c) / 10 for c in completions]

    reference = {}
    original = RLHF.build_trainer

    def build_trainer(self, plan, model, callbacks):
        trainer = original(self, plan, model, callbacks)
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        reference.update(ref_model=trainer.ref_model, adapters=sorted(peft_model.peft_config))
        return trainer

    monkeypatch.setattr(RLHF, "build_trainer", build_trainer)
    data = [{"prompt": p, "topic": "sums"} for p in PROMPTS]
    run = nbalign.rlhf(data, reward=brevity, model=tiny_model, out="runs/rl", algorithm=algorithm, **FAST_RL)

    assert run.status == "finished" and run.summary["steps"] == 2 and live_models() == 0
    # One call per step: batch 8 = 2 prompts x 4 generations. Plain strings for a plain function (so len()
    # counts characters); the extra column arrives by name.
    assert len(calls) == 2
    for call in calls:
        assert len(call["completions"]) == 8 and all(isinstance(c, str) for c in call["completions"])
        assert set(call["prompts"]) <= set(PROMPTS) and call["topic"] == ["sums"] * 8
    # Reward, KL and answer length are logged at every step, for the live curve; the logged reward is the mean
    # of what the function returned at that step (its only reward, weight 1).
    steps = logged(run, "reward")
    assert [r["step"] for r in steps] == [1, 2]
    for row, call in zip(steps, calls):
        returned = sum(-len(c) / 10 for c in call["completions"]) / 8
        assert row["rewards/brevity/mean"] == close(returned) and row["reward"] == close(returned)
        assert row["completions/mean_length"] <= 8 and "kl" in row  # at most max_completion_length tokens
    assert run.summary["reward_first"] == pytest.approx(steps[0]["reward"], abs=1e-4)  # 2 steps: the first
    assert run.summary["reward_last"] == pytest.approx(steps[1]["reward"], abs=1e-4)  # and the last
    assert {"kl_final", "length_first", "length_last"} <= set(run.summary)
    # The evaluation at the start and the end: answers to the prompts, their length, KL, perplexity.
    evaluation = run.evaluation
    assert evaluation.before["kl"] == 0.0 and len(evaluation.examples()) == 4
    # The end is measured on the trained policy: its perplexity moved (a random model: near the vocabulary size).
    assert evaluation.after["perplexity"] != pytest.approx(evaluation.before["perplexity"], rel=1e-6)
    assert "length" in evaluation.after
    assert {"length", "length_before", "perplexity", "perplexity_before"} <= set(run.summary)
    config = run.spec["trl_config"]
    assert config["beta"] == 0.05 and config["num_generations"] == 4 and config["logging_steps"] == 1
    assert config["max_completion_length"] == 8 and config["temperature"] == 1.0
    # The KL reference is the adapter switched off: no second model, and no copied 'ref' adapter saved.
    assert reference == {"ref_model": None, "adapters": ["default"]}
    assert not (run.path / "adapter" / "ref").exists()


def test_rlhf_magic_with_a_reward_model_run_and_a_function_that_wants_messages(tiny_model, in_tmp, ip):
    nbalign.reward_model(style_pairs()[:8], model=tiny_model, out="runs/rm", batch_size=4, max_steps=1)
    seen = []

    def polite(completions: list[list[dict]], **kwargs) -> list[float]:  # annotated: TRL's message lists
        seen.extend(completions)
        return [float("please" in c[0]["content"]) for c in completions]

    ip.user_ns.update(prompts=PROMPTS, polite=polite)
    run = ip.run_cell_magic(
        "rlhf", f"--model {tiny_model} --data prompts --reward runs/rm,polite --out runs/rl -o run",
        "batch_size: 8\nnum_generations: 4\nmax_completion_length: 8\nmax_steps: 1\nalgorithm: rloo\n",
    )
    assert run.status == "finished" and live_models() == 0
    assert seen and all(c[0]["role"] == "assistant" for c in seen)
    logged = run.metrics.to_dict("records")[0]
    assert "rewards/rm/mean" in logged and "rewards/polite/mean" in logged
    assert run.spec["trl_config"]["beta"] == 0.05  # RLOO: the KL penalty goes into the reward


def _fake_run(folder, method, status):
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(json.dumps({"method": method, "spec": {"model": "smollm2-135m"}}))
    (folder / "status.json").write_text(json.dumps({"status": status}))


def _takes_no_completions(prompts):
    return [0.0] * len(prompts)


@pytest.mark.parametrize(
    "reward, message",
    [
        ("my_reward", "'my_reward' is neither a notebook function nor a folder.*def my_reward"),
        ("runs/nowhere", "'runs/nowhere' does not exist"),
        (42, "the reward 42 \\(an int\\) is neither a reward model run folder nor a Python function"),
        (lambda a, b: [0.0], r"reward function <lambda>\(a, b\) cannot be called.*'a', 'b' are neither"),
        (_takes_no_completions, "has no `completions` parameter"),
        ([], "the reward list is empty"),
        ("runs/sft", "is a %%sft run, not a reward model"),
        ("runs/half", "is interrupted, not finished.*--resume"),
        ("runs/plain", "not an nbalign run folder"),
    ],
)
def test_bad_rewards_fail_before_anything_is_written(tiny_model, in_tmp, reward, message):
    _fake_run(in_tmp / "runs" / "sft", "sft", "finished")
    _fake_run(in_tmp / "runs" / "half", "reward_model", "interrupted")
    (in_tmp / "runs" / "plain").mkdir()
    with pytest.raises(NbalignError, match=message):
        nbalign.rlhf(PROMPTS, reward=reward, model=tiny_model, out="runs/rl", **FAST_RL)
    assert not (in_tmp / "runs" / "rl").exists()


def test_a_reward_function_that_returns_the_wrong_thing_fails_the_run_clearly(tiny_model, in_tmp):
    def one_number(completions, **kwargs):
        return 1.0

    with pytest.raises(NbalignError, match="one_number returned 1.0, but it must return a list of 8 numbers"):
        nbalign.rlhf(PROMPTS, reward=one_number, model=tiny_model, out="runs/rl", **FAST_RL)
    assert json.loads((in_tmp / "runs/rl/status.json").read_text())["status"] == "failed"
    assert live_models() == 0

    def crashes(completions, **kwargs):
        return [c["content"] for c in completions]

    with pytest.raises(NbalignError, match="crashes raised TypeError.*given completions as strings"):
        nbalign.rlhf(PROMPTS, reward=crashes, model=tiny_model, out="runs/rl2", **FAST_RL)


def test_prompts_data_errors_name_the_fix(tiny_model, in_tmp):
    with pytest.raises(NbalignError, match=r"columns \['question'\].*rename.*'question': 'prompt'"):
        nbalign.rlhf([{"question": "Hi?"}], reward=lambda completions, **kw: [0.0] * len(completions),
                     model=tiny_model, out="runs/rl", **FAST_RL)
    with pytest.raises(NbalignError, match="exceeds max_length 64"):
        nbalign.rlhf(["word " * 80], reward=lambda completions, **kw: [0.0] * len(completions),
                     model=tiny_model, out="runs/rl", max_length=64, **FAST_RL)
    # TRL would generate a prompt-tuned policy's answers through PEFT's generate(), wrong under transformers 5.
    nbalign.lora(type="prompt", model=tiny_model)
    with pytest.raises(NbalignError, match="prompt tuning cannot train by reinforcement here.*use LoRA"):
        nbalign.rlhf(PROMPTS, reward=lambda completions, **kw: [0.0] * len(completions), model=tiny_model,
                     out="runs/rl", **FAST_RL)
    assert not (in_tmp / "runs").exists()


# ----------------------------------------------------------------------------------------------------
# The built-in SmolLM2-135M-Instruct (slow).


@pytest.mark.slow
def test_reward_model_learns_the_terse_style_on_the_builtin_model(in_tmp):
    import torch

    from nbalign.devices import pick_device
    from nbalign.models import load_model, load_tokenizer, resolve
    from nbalign.preference_data import to_pairs
    from nbalign.scoring import pair_metrics

    heldout = style_pairs("heldout")
    # The untrained head (initialised as the run initialises it, seed 42) already leans the right way on
    # these very different answers, so the test asks for a margin that grew, not only for accuracy.
    ref = resolve("smollm2-135m")
    torch.manual_seed(42)
    untrained = pair_metrics(load_model(ref, pick_device(), head="score"), load_tokenizer(ref), to_pairs(heldout))
    rm = nbalign.reward_model(style_pairs("train"), eval_data=heldout, out="runs/rm", epochs=1)  # defaults otherwise
    trained = rm.summary
    print(f"held-out accuracy {untrained['accuracy']:.2f} -> {trained['heldout_accuracy']:.2f}, "
          f"margin {untrained['margin']:.2f} -> {trained['heldout_margin']:.2f}")
    assert trained["heldout_accuracy"] >= 0.8
    assert trained["heldout_margin"] > max(1.0, 3 * untrained["margin"])
    question = "What is the capital of Finland?"
    terse = terse_answer("Helsinki")
    rambling = rambling_answer(3, "the capital city of Finland is Helsinki")
    scores = rm.score(question, [terse, rambling])
    assert scores[0] > scores[1] + 1.0, scores


@pytest.mark.slow
def test_grpo_with_a_brevity_reward_shortens_answers_with_bounded_kl(in_tmp):
    def brevity(completions, **kwargs):
        return [-len(c) / 100 for c in completions]

    # Two short factual prompts, both in every step, so the reward curve shows the policy, not the prompt mix.
    prompts = ["What is the capital of France?", "What is the capital of Greece?"]
    run = nbalign.rlhf(prompts, reward=brevity, out="runs/rl", max_steps=10, max_completion_length=24,
                       learning_rate=3e-4)
    s = run.summary
    kls = [r["kl"] for r in run.metrics.to_dict("records") if r.get("kl") == r.get("kl") and "kl" in r]
    print(f"reward {s['reward_first']:.3f} -> {s['reward_last']:.3f}, length {s['length_first']} -> "
          f"{s['length_last']} tokens, KL max {max(kls):.3f}, {s['runtime_s']} s")
    assert s["reward_last"] > s["reward_first"] + 0.1  # 10 characters shorter on average
    assert s["length_last"] < s["length_first"]
    assert max(kls) < 1.0  # per-token KL to the reference (beta 0.05)
