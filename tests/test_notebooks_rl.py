"""The reward-model and RLHF tutorials (02, 05), executed top to bottom by a real Jupyter kernel in quick mode.

Same machinery as tests/test_notebooks.py (helpers.py runs the notebook; the `kernel_name` fixture is in
conftest.py): NBALIGN_QUICK=1 is read by each notebook's first code cell, and the notebook ends with a
`RESULT {...}` line that these tests parse.
"""

from __future__ import annotations

import json

import pytest
from helpers import assert_no_errors, execute_notebook, figure_axes, result_of, stdout_of


def _finished(run_folder) -> None:
    assert json.loads((run_folder / "status.json").read_text())["status"] == "finished", run_folder


@pytest.mark.slow
def test_reward_model_notebook_trains_scores_and_shows_where_it_fails(tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("NBALIGN_QUICK", "1")  # the kernel inherits this process's environment
    nb = execute_notebook("02_reward_model.ipynb", tmp_path, kernel_name)
    assert_no_errors(nb)

    result = result_of(nb)
    assert result["status"] == "finished" and result["facts_status"] == "finished"
    # Quick mode, read by the first cell: 8 training pairs (the full notebook: 40) and 4 held-out (10); one
    # epoch of 8 pairs at batch size 4 = 2 steps (the full notebook: 3 epochs at batch size 8, 15 steps).
    assert (result["n_train"], result["n_heldout"]) == (8, 4)
    assert result["steps"] == 2
    # The terse style is easy: held-out pairs ranked right, and training widened the untrained head's margin.
    assert result["accuracy"] >= 0.75, result
    assert result["margin"] > result["untrained_margin"], result
    # rm.score on a new question: the terse answer above the ramble.
    assert result["new_scores"]["terse"] > result["new_scores"]["rambling"], result
    # Where it fails: the style model cannot tell a right terse answer from a wrong terse one; its margin on
    # those pairs is smaller than on the style pairs it learnt.
    assert abs(result["style_rm_on_facts_margin"]) < result["margin"], result
    # The right-vs-wrong accuracy by kind, on the 4 held-out questions of each kind: shares of 4.
    assert set(result["facts_by_kind"]) == {"capital", "sum", "opposite", "science"}
    assert all(4 * v == int(4 * v) for v in result["facts_by_kind"].values()), result["facts_by_kind"]

    for folder in ("rm", "rm-facts"):
        run = tmp_path / "runs" / folder
        _finished(run)
        assert (run / "evaluation.json").is_file() and (run / "adapter" / "adapter_config.json").is_file()

    text = stdout_of(nb)
    assert "untrained head on the held-out pairs" in text
    assert "right-vs-wrong accuracy on all 16 held-out questions" in text
    # The figures, in order: loss and margin curves, held-out scores untrained/trained, the probes.
    assert figure_axes(nb) == [2, 2, 1]


@pytest.mark.slow
def test_rlhf_notebook_trains_against_a_function_and_a_reward_model(tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("NBALIGN_QUICK", "1")
    nb = execute_notebook("05_rlhf.ipynb", tmp_path, kernel_name)
    assert_no_errors(nb)

    result = result_of(nb)
    assert result["rm_status"] == "finished"
    assert result["statuses"] == {"short": "finished", "rm": "finished", "rm_strong": "finished"}
    # Quick mode, read by the first cell: 2 training prompts x 4 answers = 8 answers = one step per run (the
    # full notebook: 8 prompts, 3 epochs, 12 steps); 4 comparison prompts, one sample each.
    assert result["steps"] == {"short": 1, "rm": 1, "rm_strong": 1}
    assert result["n_prompts"] == 2 and result["n_eval"] == 4
    assert result["betas"] == {"short": 0.05, "rm": 0.05, "rm_strong": 0.5}
    # The evaluation table: base model and the three runs; "correct" is a share of the 4 prompts' answers.
    assert set(result["models"]) == {"base", "short", "rm", "rm_strong"}
    for name, row in result["models"].items():
        assert 4 * row["correct_greedy"] == int(4 * row["correct_greedy"]), (name, row)
        assert 4 * row["correct_sampled"] == int(4 * row["correct_sampled"]), (name, row)
        assert row["length_greedy"] > 0, name
    # The optimised reward is brevity alone (names_answer weighs 0): minus the length / 100, below 0.
    assert result["reward_first"]["short"] < 0, result["reward_first"]
    # beta changes the update, not the start: both reward-model runs scored the same first answers alike.
    assert result["reward_first"]["rm"] == pytest.approx(result["reward_first"]["rm_strong"], abs=1e-3), result

    for folder in ("rm", "rl-short", "rl-rm", "rl-rm-beta-0.5"):
        _finished(tmp_path / "runs" / folder)
    # The monitor reward was computed every step but weighed 0: logged, not optimised.
    spec = json.loads((tmp_path / "runs" / "rl-short" / "spec.json").read_text())
    assert spec["trl_config"]["reward_weights"] == [1.0, 0.0]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "rl-rm" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/names_answer/mean" in r for r in rows) and any("kl" in r for r in rows)

    text = stdout_of(nb)
    assert "base model, greedy" in text
    # The figures, in order: the four curves of the function run, of the two reward-model runs, the evaluation.
    assert figure_axes(nb) == [4, 4, 3]
