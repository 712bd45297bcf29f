"""The reward-model and RLHF tutorials (02, 05), executed top to bottom by a real Jupyter kernel in quick mode.

Same machinery as tests/test_notebooks.py: NBALIGN_QUICK=1 is read by each notebook's first code cell, and the
notebook ends with a `RESULT {...}` line that these tests parse.
"""

from __future__ import annotations

import json
import math

import pytest

from test_notebooks import NOTEBOOKS, assert_no_errors, execute, images_in, kernel_name, result_of, stdout_of  # noqa: F401

nbformat = pytest.importorskip("nbformat")

RL_NOTEBOOKS = ["02_reward_model.ipynb", "05_rlhf.ipynb"]


@pytest.mark.parametrize("name", RL_NOTEBOOKS)
def test_rl_notebooks_read_quick_mode_first(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert 'QUICK = os.environ.get("NBALIGN_QUICK") == "1"' in first.source


def _finished(run_folder) -> None:
    assert json.loads((run_folder / "status.json").read_text())["status"] == "finished", run_folder


@pytest.mark.slow
def test_reward_model_notebook_trains_scores_and_shows_where_it_fails(tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("NBALIGN_QUICK", "1")  # the kernel inherits this process's environment
    nb = execute("02_reward_model.ipynb", tmp_path, kernel_name)
    assert_no_errors(nb)

    result = result_of(nb)
    assert result["status"] == "finished" and result["facts_status"] == "finished"
    assert (result["n_train"], result["n_heldout"]) == (8, 4)  # quick mode
    assert result["steps"] == 2  # one epoch of 8 pairs at batch size 4
    # The terse style is easy: held-out pairs ranked right, and training widened the untrained head's margin.
    assert result["accuracy"] >= 0.75, result
    assert result["margin"] > result["untrained_margin"], result
    # rm.score on a new question: the terse answer above the ramble.
    assert result["new_scores"]["terse"] > result["new_scores"]["rambling"], result
    for key in ("untrained_accuracy", "style_rm_on_facts_accuracy", "facts_untrained_accuracy", "facts_accuracy"):
        assert 0 <= result[key] <= 1, key
    assert set(result["facts_by_kind"]) == {"capital", "sum", "opposite", "science"}
    for key in ("bare_beats_rambling", "bare_beats_word", "wrong_beats_right"):
        assert 0 <= result[key] <= result["n_heldout"], key
    assert math.isfinite(result["facts_final_loss"])

    for folder in ("rm", "rm-facts"):
        run = tmp_path / "runs" / folder
        _finished(run)
        assert (run / "evaluation.json").is_file() and (run / "adapter" / "adapter_config.json").is_file()

    text = stdout_of(nb)
    assert "untrained head on the held-out pairs" in text
    assert "right-vs-wrong accuracy on all 16 held-out questions" in text
    # The margin curve, the held-out scores before/after and the probes were drawn.
    assert images_in(nb, "axes[1].plot(steps") >= 1
    assert images_in(nb, "trained_chosen = rm.score") >= 1
    assert images_in(nb, "probe_rows = []") >= 1


@pytest.mark.slow
def test_rlhf_notebook_trains_against_a_function_and_a_reward_model(tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("NBALIGN_QUICK", "1")
    nb = execute("05_rlhf.ipynb", tmp_path, kernel_name)
    assert_no_errors(nb)

    result = result_of(nb)
    assert result["rm_status"] == "finished"
    assert result["statuses"] == {"short": "finished", "rm": "finished", "rm_strong": "finished"}
    assert result["steps"] == {"short": 1, "rm": 1, "rm_strong": 1}  # quick mode: one step of two prompts each
    assert result["betas"] == {"short": 0.05, "rm": 0.05, "rm_strong": 0.5}
    assert result["n_prompts"] == 2 and result["n_eval"] == 4
    for name, row in result["models"].items():  # the evaluation table: base model and the three runs
        assert 0 <= row["correct_greedy"] <= 1 and 0 <= row["correct_sampled"] <= 1, name
        assert row["length_greedy"] > 0 and math.isfinite(row["rm_score_sampled"]), name
    assert set(result["models"]) == {"base", "short", "rm", "rm_strong"}
    for name in ("short", "rm", "rm_strong"):
        assert math.isfinite(result["reward_first"][name]), name

    for folder in ("rm", "rl-short", "rl-rm", "rl-rm-beta-0.5"):
        _finished(tmp_path / "runs" / folder)
    # The monitor reward was computed every step but weighed 0: logged, not optimised.
    spec = json.loads((tmp_path / "runs" / "rl-short" / "spec.json").read_text())
    assert spec["trl_config"]["reward_weights"] == [1.0, 0.0]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "rl-rm" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/names_answer/mean" in r for r in rows) and any("kl" in r for r in rows)

    text = stdout_of(nb)
    assert "base model, greedy" in text
    # The curves of the function run, the beta comparison and the evaluation were drawn.
    assert images_in(nb, "curves([short]") >= 1
    assert images_in(nb, "curves([rl_rm, rl_rm_strong]") >= 1
    assert images_in(nb, "fig, axes = plt.subplots(1, 3") >= 1
