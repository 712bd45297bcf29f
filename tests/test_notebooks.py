"""The tutorial notebooks, executed top to bottom by a real Jupyter kernel (nbclient) in quick mode.

Quick mode (NBALIGN_QUICK=1) is read by each notebook's first code cell: fewer ranks, one short epoch,
four held-out questions. The tests read what the notebook leaves behind: the run folders it wrote under the
test's working directory (status, spec, metrics, evaluation), and the outputs a reader sees.
"""

from __future__ import annotations

import json
import re

import pytest
from helpers import assert_no_errors, execute_notebook, figure_axes, stdout_of

from nbalign import Run


def _printed(pattern: str, text: str) -> re.Match:
    """The first match of `pattern` in what the notebook printed (a failed search shows the pattern)."""
    match = re.search(pattern, text)
    assert match, (pattern, text[-2000:])
    return match


@pytest.mark.slow
def test_lora_sft_notebook_runs_and_teaches_the_format(tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("NBALIGN_QUICK", "1")  # the kernel inherits this process's environment
    nb = execute_notebook("01_lora_sft.ipynb", tmp_path, kernel_name)

    assert_no_errors(nb)
    text = stdout_of(nb)

    # The run folder went to the notebook's working directory, complete.
    run = Run(tmp_path / "runs" / "json-sft")
    assert run.status == "finished"
    assert (run.path / "adapter" / "adapter_config.json").is_file()
    assert (run.path / "metrics.jsonl").stat().st_size > 0
    # Quick mode, read by the first cell: one question per category (16 held-out questions, every 4th) and
    # one epoch of 46 examples at batch size 4 = 12 steps: %%sft holds 5 of the 51 rows out for its own
    # evaluation (eval_split) when no --eval-data is given (the full notebook trains 3 epochs).
    assert run.summary["steps"] == 12
    # The comparison the notebook prints under its before/after table.
    base_ok, n, tuned_ok, n_tuned = map(int, _printed(r"valid JSON answers: base (\d+)/(\d+), tuned (\d+)/(\d+)",
                                                      text).groups())
    assert n == n_tuned == 4
    assert tuned_ok > base_ok, (base_ok, tuned_ok)
    assert tuned_ok >= 3, tuned_ok  # quick mode reached 4/4 when written

    assert "trainable parameters 4,884,480" in text  # the %%lora cell's report (r=16, all-linear)
    assert "QLoRA keeps the base in" in text
    # The figures, in order: parameters against rank (quick mode's 3 ranks), the loss curve.
    assert figure_axes(nb) == [1, 1]


@pytest.mark.slow
def test_dpo_notebook_runs_the_defaults_the_sweep_and_pure_dpo(tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("NBALIGN_QUICK", "1")
    nb = execute_notebook("03_dpo.ipynb", tmp_path, kernel_name)
    assert_no_errors(nb)
    text = stdout_of(nb)

    runs = tmp_path / "runs"
    for folder in ("dpo", "dpo-beta-0.5", "dpo-pure"):
        assert Run(runs / folder).status == "finished", folder
        assert (runs / folder / "evaluation.json").is_file() and (runs / folder / "adapter" / "adapter_config.json").is_file()
    run, pure = Run(runs / "dpo"), Run(runs / "dpo-pure")
    # Quick mode, read by the first cell: every 8th of 16 held-out pairs, every 26th of 51 training pairs
    # (two) for one epoch at batch size 1 = 2 steps (the full notebook: 51 pairs, 21 steps), betas 0.1 and 0.5:
    # the %%dpo run is the sweep's 0.1, and the sweep trained one more run.
    assert int(_printed(r"\d+ training pairs, (\d+) held-out pairs", text).group(1)) == 2
    assert run.summary["steps"] == 2
    assert sorted(p.name for p in runs.glob("dpo-beta-*")) == ["dpo-beta-0.5"]
    assert [Run(runs / f).spec["trl_config"]["beta"] for f in ("dpo", "dpo-beta-0.5")] == [0.1, 0.5]
    evaluation = run.evaluation
    assert evaluation.before["accuracy"] == 0.5  # the policy starts as the reference: every pair a tie
    assert evaluation.after["accuracy"] > 0.5, evaluation  # quick mode reached 1.0 when written
    # The base model rambles: none of its answers is terse (the count the notebook prints under the evaluation).
    terse_before = int(_printed(r"terse answers: (\d+) -> \d+ of 2;", text).group(1))
    assert terse_before == 0, text
    assert evaluation.after["kl"] > 0
    # Pure DPO ranks the held-out pairs too (the notebook's point: ranking, not answers, is what it learns).
    assert pure.evaluation.after["accuracy"] > 0.5, pure.evaluation
    # The pure run really trained without the SFT term; the default run with it.
    assert pure.spec["trl_config"]["loss_type"] == ["sigmoid"]
    assert run.spec["trl_config"]["loss_type"] == ["sigmoid", "sft"]

    assert "preference accuracy" in text  # the evaluation table, printed
    # The figures, in order: loss and five watch curves (2 x 3), the beta sweep (4 panels), the pure-DPO
    # comparison (3 panels).
    assert figure_axes(nb) == [6, 4, 3]


@pytest.mark.slow
def test_kto_notebook_balances_thumbs_and_unpairs_pairs(tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("NBALIGN_QUICK", "1")
    nb = execute_notebook("04_kto_thumbs.ipynb", tmp_path, kernel_name)
    assert_no_errors(nb)
    text = stdout_of(nb)

    for folder in ("kto", "kto-unpair"):
        assert Run(tmp_path / "runs" / folder).status == "finished", folder
        assert (tmp_path / "runs" / folder / "evaluation.json").is_file()
    run, unpaired = Run(tmp_path / "runs" / "kto"), Run(tmp_path / "runs" / "kto-unpair")
    # Quick mode, read by the first cell: every 8th of 16 held-out pairs; the first six thumbs, four up and two
    # down, balanced by weighing each thumbs-down twice; one epoch of six rows at batch size 3 = 2 steps.
    rows, up, down, heldout = map(int, _printed(r"(\d+) thumbs \((\d+) up, (\d+) down\) on \d+ prompts; (\d+) held-out",
                                                text).groups())
    assert (rows, up, down, heldout) == (6, 4, 2, 2)
    assert run.spec["examples"] == 6
    config = run.spec["trl_config"]
    assert (config["desirable_weight"], config["undesirable_weight"]) == (1.0, 2.0)
    assert run.summary["steps"] == 2
    evaluation = run.evaluation
    assert evaluation.before["accuracy"] == 0.5
    assert evaluation.after["accuracy"] > 0.5, evaluation  # quick mode reached 1.0 when written
    assert evaluation.after["kl"] > 0
    unpair_config = unpaired.spec["trl_config"]
    assert unpaired.spec["examples"] == 4  # two pairs, as four thumbs...
    assert [unpair_config["desirable_weight"], unpair_config["undesirable_weight"]] == [1.0, 1.0]  # ...balanced
    # The pairs, as thumbs, teach the same preference.
    assert unpaired.evaluation.after["accuracy"] > 0.5, unpaired.evaluation

    assert "4 thumbs up vs 2 down; balanced with desirable_weight 1, undesirable_weight 2" in text
    assert "preference accuracy" in text
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
    text = stdout_of(nb)

    run = Run(tmp_path / "runs" / "dpo-labels")
    assert run.status == "finished"
    # What the notebook prints: the store after labelling, the pairs it gives, the held-out answers compared.
    assert int(_printed(r"LabelStore\('[^']*concise\.sqlite'\): \d+ items, (\d+) labelled", text).group(1)) == 4
    pairs = int(_printed(r"the prompted-concise answer won \d+ of (\d+) pairs", text).group(1))
    assert int(_printed(r"\d+ of (\d+) held-out answers changed", text).group(1)) == 2
    assert pairs == run.spec["examples"] >= 1
    with sqlite3.connect(tmp_path / "labels" / "concise.sqlite") as db:
        labels = db.execute("SELECT choice, origin FROM labels").fetchall()
        sources = [json.loads(r[0]) for r in db.execute("SELECT source_a FROM items")]
    assert len(labels) == 4 and {origin for _, origin in labels} == {"human"}
    assert all(s["model"] == "smollm2-135m" and "sampling" in s for s in sources)
    assert sum("system" in s for s in sources) not in (0, len(sources)) or len(sources) < 3  # sides shuffled
    rows = [json.loads(x) for x in (run.path / "data" / "data.jsonl").read_text().splitlines()]
    assert len(rows) == pairs and all(r["labelled_by"] == "human" for r in rows)
    assert (tmp_path / "labels" / "concise.jsonl").is_file()


@pytest.mark.slow
def test_alignment_tax_notebook_flags_the_run_that_forgets_and_the_run_that_over_refuses(tmp_path, monkeypatch,
                                                                                         kernel_name):
    """Tutorial 07 in quick mode. Its two runs that make the point are the issue's tests of the outcome
    warnings: learning rate 1e-3 (five times the default) for 2 epochs takes the JSON form and loses knowledge,
    and is told so; a run whose data refuses innocent prompts too is flagged for over-refusal, with both shares.
    The other runs (defaults, replay, the reasoning-first form, the two %%sft -> %%dpo chains on refusals) train
    one step here."""
    monkeypatch.setenv("NBALIGN_QUICK", "1")
    nb = execute_notebook("07_alignment_tax.ipynb", tmp_path, kernel_name, timeout=900)
    assert_no_errors(nb)
    runs = {name: Run(tmp_path / "runs" / name) for name in ("forgets", "defaults", "replay", "reasoned", "refuse-sft",
                                                             "refuse-dpo", "refuse-long", "refuse-fix", "scared")}
    assert all(r.status == "finished" for r in runs.values()), {k: r.status for k, r in runs.items()}

    forgets = runs["forgets"].evaluation
    before, after = forgets.before, forgets.after
    assert after["form_n"] >= 6 > before["form_n"]  # the behaviour asked for was learnt (8 held out)...
    # ...and knowledge went with it, and the run says so: each warning where its own rule finds a loss, at least
    # one of them. What this run loses moves between runs near both rules' edges: the stored full run lost the
    # probe (20/20 -> 14/20) and kept the held-out facts (7 -> 7); quick mode in bf16 on 2026-12-07 gave probe 18/20
    # -> 12/20 (warned) with the facts kept, then 18 -> 14 (not significant) with the facts 4/8 -> 3/8 (warned).
    from nbalign.results import significant_loss

    assert after["probe_n"] <= before["probe_n"] - 3
    text = " ".join(forgets.warnings)
    probe_dropped = significant_loss(before["probe_right"], after["probe_right"])
    assert ("knowledge probe dropped" in text) == probe_dropped, forgets.warnings
    assert ("lost the facts" in text) == forgets.form_lost_content, forgets.warnings
    assert probe_dropped or forgets.form_lost_content, forgets.warnings

    scared = runs["scared"].evaluation
    assert scared.after["refused"] >= 0.8  # the harmful prompts are refused...
    assert scared.after["over_refused"] >= 0.5  # ...and so are the innocent ones that share their words
    assert scared.before["over_refused"] <= 0.2
    assert any(w.startswith("Over-refusal") for w in scared.warnings), scared.warnings

    # The other runs train one step each (0.1 epochs) and measure nothing in quick mode.
    others = ("defaults", "replay", "reasoned", "refuse-sft", "refuse-dpo", "refuse-long", "refuse-fix")
    assert all(runs[k].summary["steps"] == 1 for k in others), {k: runs[k].summary.get("steps") for k in others}
    # The evaluation's HTML is what the cells show: the table, the warnings, model text escaped.
    page = json.dumps([o.get("data", {}).get("text/html", "") for c in nb.cells if c.cell_type == "code"
                       for o in c.get("outputs", [])])
    assert "knowledge probe answered right" in page and "&quot;answer&quot;" in page
    assert (tmp_path / "runs" / "forgets" / "evaluation.json").is_file()
