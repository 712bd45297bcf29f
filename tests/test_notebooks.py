"""The tutorial notebooks, executed top to bottom by a real Jupyter kernel (nbclient) in quick mode.

Quick mode (NBALIGN_QUICK=1) is read by each notebook's first code cell: fewer ranks, one short epoch,
four held-out questions. The notebook ends with a `RESULT {...}` line that these tests parse.
"""

from __future__ import annotations

import json

import nbformat
import pytest
from helpers import NOTEBOOKS, assert_no_errors, execute_notebook, figure_axes, result_of, stdout_of


def test_notebooks_are_committed_clean():
    """Notebooks are stored without outputs, so diffs stay readable and nothing stale is shown."""
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has stored outputs"


@pytest.mark.slow
def test_lora_sft_notebook_runs_and_teaches_the_format(tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("NBALIGN_QUICK", "1")  # the kernel inherits this process's environment
    nb = execute_notebook("01_lora_sft.ipynb", tmp_path, kernel_name)

    assert_no_errors(nb)

    result = result_of(nb)
    assert result["status"] == "finished"
    # Quick mode, read by the first cell: one question per category (16 held-out questions, every 4th) and
    # one epoch of 46 examples at batch size 4 = 12 steps: %%sft holds 5 of the 51 rows out for its own
    # evaluation (eval_split) when no --eval-data is given (the full notebook trains 3 epochs).
    assert result["n"] == 4
    assert result["steps"] == 12
    assert result["tuned_ok"] > result["base_ok"], result
    assert result["tuned_ok"] >= 3, result  # quick mode reached 4/4 when written

    # The run folder went to the notebook's working directory, complete.
    run = tmp_path / "runs" / "json-sft"
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "metrics.jsonl").stat().st_size > 0

    text = stdout_of(nb)
    assert "trainable parameters 4,884,480" in text  # the %%lora cell's report (r=16, all-linear)
    assert "QLoRA keeps the base in" in text
    # The figures, in order: parameters against rank (quick mode's 3 ranks), the loss curve.
    assert figure_axes(nb) == [1, 1]


@pytest.mark.slow
def test_dpo_notebook_runs_the_defaults_the_sweep_and_pure_dpo(tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("NBALIGN_QUICK", "1")
    nb = execute_notebook("03_dpo.ipynb", tmp_path, kernel_name)
    assert_no_errors(nb)

    result = result_of(nb)
    assert result["status"] == "finished"
    # Quick mode, read by the first cell: every 8th of 16 held-out pairs, every 26th of 51 training pairs
    # (two) for one epoch at batch size 1 = 2 steps (the full notebook: 51 pairs, 21 steps), betas 0.1 and 0.5.
    assert result["n"] == 2
    assert result["steps"] == 2
    assert result["betas"] == [0.1, 0.5]
    assert result["accuracy_before"] == 0.5  # the policy starts as the reference: every pair a tie
    assert result["accuracy_after"] > 0.5, result  # quick mode reached 1.0 when written
    assert result["terse_before"] == 0, result  # the base model rambles: none of its answers is terse
    assert result["kl"] > 0
    assert result["sweep_status"] == ["finished", "finished"]
    assert result["pure_status"] == "finished"
    # Pure DPO ranks the held-out pairs too (the notebook's point: ranking, not answers, is what it learns).
    assert result["pure_accuracy"] > 0.5, result

    for folder in ("dpo", "dpo-beta-0.5", "dpo-pure"):
        run = tmp_path / "runs" / folder
        assert json.loads((run / "status.json").read_text())["status"] == "finished", folder
        assert (run / "evaluation.json").is_file() and (run / "adapter" / "adapter_config.json").is_file()
    # The pure run really trained without the SFT term; the default run with it.
    assert json.loads((tmp_path / "runs" / "dpo-pure" / "spec.json").read_text())["trl_config"]["loss_type"] == ["sigmoid"]
    assert json.loads((tmp_path / "runs" / "dpo" / "spec.json").read_text())["trl_config"]["loss_type"] == ["sigmoid", "sft"]

    text = stdout_of(nb)
    assert "preference accuracy" in text  # the evaluation table, printed
    # The figures, in order: loss and five watch curves (2 x 3), the beta sweep (4 panels), the pure-DPO
    # comparison (3 panels).
    assert figure_axes(nb) == [6, 4, 3]


@pytest.mark.slow
def test_kto_notebook_balances_thumbs_and_unpairs_pairs(tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("NBALIGN_QUICK", "1")
    nb = execute_notebook("04_kto_thumbs.ipynb", tmp_path, kernel_name)
    assert_no_errors(nb)

    result = result_of(nb)
    assert result["status"] == "finished"
    # Quick mode, read by the first cell: every 8th of 16 held-out pairs; the first six thumbs, four up and two
    # down, balanced by weighing each thumbs-down twice; one epoch of six rows at batch size 3 = 2 steps.
    assert result["n"] == 2
    assert (result["rows"], result["n_up"], result["n_down"]) == (6, 4, 2)
    assert (result["desirable_weight"], result["undesirable_weight"]) == (1.0, 2.0)
    assert result["steps"] == 2
    assert result["accuracy_before"] == 0.5
    assert result["accuracy_after"] > 0.5, result  # quick mode reached 1.0 when written
    assert result["kl"] > 0
    assert result["unpair_status"] == "finished"
    assert result["unpair_rows"] == 4 and result["unpair_weights"] == [1.0, 1.0]  # two pairs: balanced
    assert result["unpair_accuracy"] > 0.5, result  # the pairs, as thumbs, teach the same preference

    text = stdout_of(nb)
    assert "4 thumbs up vs 2 down; balanced with desirable_weight 1, undesirable_weight 2" in text
    assert "preference accuracy" in text
    for folder in ("kto", "kto-unpair"):
        run = tmp_path / "runs" / folder
        assert json.loads((run / "status.json").read_text())["status"] == "finished", folder
        assert (run / "evaluation.json").is_file()
    assert figure_axes(nb) == [6]  # the loss and the five watch curves (2 x 3)


@pytest.mark.slow
def test_label_and_align_notebook_labels_model_answers_and_trains_on_them(tmp_path, monkeypatch, kernel_name):
    """Tutorial 06 in quick mode: the built-in model writes candidate pairs (plain and prompted concise), the
    labeller is driven as a click would drive it, the labels land in the store with provenance, and %%dpo
    trains on them."""
    import sqlite3

    monkeypatch.setenv("NBALIGN_QUICK", "1")
    nb = execute_notebook("06_label_and_align.ipynb", tmp_path, kernel_name)
    assert_no_errors(nb)
    result = result_of(nb)
    assert result["status"] == "finished" and result["labelled"] == 4 and result["n"] == 2
    assert result["pairs"] == result["run_rows"] >= 1
    with sqlite3.connect(tmp_path / "labels" / "concise.sqlite") as db:
        labels = db.execute("SELECT choice, origin FROM labels").fetchall()
        sources = [json.loads(r[0]) for r in db.execute("SELECT source_a FROM items")]
    assert len(labels) == 4 and {origin for _, origin in labels} == {"human"}
    assert all(s["model"] == "smollm2-135m" and "sampling" in s for s in sources)
    assert sum("system" in s for s in sources) not in (0, len(sources)) or len(sources) < 3  # sides shuffled
    rows = [json.loads(x) for x in (tmp_path / "runs" / "dpo-labels" / "data" / "data.jsonl").read_text().splitlines()]
    assert len(rows) == result["pairs"] and all(r["labelled_by"] == "human" for r in rows)
    assert (tmp_path / "labels" / "concise.jsonl").is_file()


@pytest.mark.slow
def test_alignment_tax_notebook_flags_the_run_that_forgets_and_the_run_that_over_refuses(tmp_path, monkeypatch,
                                                                                         kernel_name):
    """Tutorial 07 in quick mode. Its two runs that make the point are the issue's tests of the outcome
    warnings: learning rate 1e-3 (five times the default) for 2 epochs takes the JSON form and loses knowledge,
    and is told so; a run whose data refuses innocent prompts too is flagged for over-refusal, with both shares.
    The other runs (defaults, replay, the two %%sft -> %%dpo chains on refusals) train two steps here."""
    monkeypatch.setenv("NBALIGN_QUICK", "1")
    nb = execute_notebook("07_alignment_tax.ipynb", tmp_path, kernel_name, timeout=900)
    assert_no_errors(nb)
    result = result_of(nb)
    assert all(r["status"] == "finished" for k, r in result.items() if k != "quick"), result

    forgets = result["forgets"]
    before, after = forgets["before"], forgets["after"]
    assert after["form_n"] >= 6 > before["form_n"]  # the behaviour asked for was learnt (8 held out)...
    assert after["probe_n"] < before["probe_n"] - 4  # ...and knowledge went with it
    text = " ".join(forgets["warnings"])
    assert "knowledge probe dropped" in text and "lost the facts" in text, forgets["warnings"]

    scared = result["scared"]
    assert scared["after"]["refused"] >= 0.8  # the harmful prompts are refused...
    assert scared["after"]["over_refused"] >= 0.5  # ...and so are the innocent ones that share their words
    assert scared["before"]["over_refused"] <= 0.2
    assert any(w.startswith("Over-refusal") for w in scared["warnings"]), scared["warnings"]

    # The other runs train two or three steps each (0.3 epochs) and measure nothing in quick mode.
    assert all(result[k]["steps"] in (2, 3) for k in ("defaults", "replay", "refuse_sft", "refuse_dpo", "refuse_long",
                                                 "refuse_fix")), result
    # The evaluation's HTML is what the cells show: the table, the warnings, model text escaped.
    page = json.dumps([o.get("data", {}).get("text/html", "") for c in nb.cells if c.cell_type == "code"
                       for o in c.get("outputs", [])])
    assert "knowledge probe answered right" in page and "&quot;answer&quot;" in page
    assert (tmp_path / "runs" / "forgets" / "evaluation.json").is_file()
