"""The reward-model and RLHF tutorials (02, 05), executed top to bottom by a real Jupyter kernel in quick mode.

Same machinery as tests/test_notebooks.py (helpers.py runs the notebook; the `kernel_name` fixture is in
conftest.py): NBALIGN_QUICK=1 is read by each notebook's first code cell. The tests read the run folders the
notebook wrote under the test's working directory, and the outputs a reader sees: printed lines and the
tables the cells display.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from helpers import assert_no_errors, code_outputs, execute_notebook, figure_axes, logged, stdout_of

from nbalign import Run


def _finished(run_folder) -> Run:
    run = Run(run_folder)
    assert run.status == "finished", run_folder
    return run


def _printed(pattern: str, text: str) -> tuple[str, ...]:
    """The groups of the first match of `pattern` in what the notebook printed."""
    match = re.search(pattern, text)
    assert match, (pattern, text[-2000:])
    return match.groups()


class _Tables(HTMLParser):
    """The tables of an HTML output, each a list of rows of cell texts (header and data cells alike)."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("th", "td") and self.tables and self.tables[-1]:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _displayed_table(nb, *columns: str) -> dict[str, dict[str, str]]:
    """The first table the notebook displayed (a DataFrame or its Styler, read from the HTML a reader sees)
    whose header has `columns`, as {row label: {column: the text shown}}."""
    for output in code_outputs(nb):
        parser = _Tables()
        parser.feed(output.get("data", {}).get("text/html", ""))
        for rows in parser.tables:
            if rows and set(columns) <= set(rows[0]):
                header = rows[0]
                return {row[0]: dict(zip(header[1:], row[1:])) for row in rows[1:] if len(row) == len(header)}
    raise AssertionError(f"the notebook displayed no table with the columns {columns}")


@pytest.mark.slow
def test_reward_model_notebook_trains_scores_and_shows_where_it_fails(tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("NBALIGN_QUICK", "1")  # the kernel inherits this process's environment
    nb = execute_notebook("02_reward_model.ipynb", tmp_path, kernel_name)
    assert_no_errors(nb)
    text = stdout_of(nb)

    for folder in ("rm", "rm-facts"):
        run = _finished(tmp_path / "runs" / folder)
        assert (run.path / "evaluation.json").is_file() and (run.path / "adapter" / "adapter_config.json").is_file()
    rm = Run(tmp_path / "runs" / "rm")
    # Quick mode, read by the first cell: 8 training pairs (the full notebook: 40) and 4 held-out (10); one
    # epoch of 8 pairs at batch size 4 = 2 steps (the full notebook: 3 epochs at batch size 8, 15 steps).
    assert _printed(r"(\d+) training pairs, (\d+) held-out pairs", text) == ("8", "4")
    assert rm.summary["steps"] == 2
    # The terse style is easy: held-out pairs ranked right, and training widened the untrained head's margin
    # (printed, to two decimals, before training).
    accuracy, margin = rm.evaluation["accuracy"], rm.evaluation["margin"]
    assert accuracy >= 0.75, rm.evaluation
    untrained_margin = float(_printed(r"untrained head on the held-out pairs: accuracy \S+, margin (-?[\d.]+)", text)[0])
    assert margin > untrained_margin, (margin, untrained_margin)
    # rm.score on a new question, the table of scores the notebook shows: the terse answer above the ramble.
    new_scores = _displayed_table(nb, "answer", "score")
    assert float(new_scores["terse"]["score"]) > float(new_scores["rambling"]["score"]), new_scores
    # Where it fails: the style model cannot tell a right terse answer from a wrong terse one; its margin on
    # those pairs is smaller than on the style pairs it learnt.
    on_facts = float(_printed(r"the style reward model on right-vs-wrong held-out pairs: accuracy \S+, margin (-?[\d.]+)",
                              text)[0])
    assert abs(on_facts) < margin, (on_facts, margin)
    # The right-vs-wrong accuracy by kind, on the 4 held-out questions of each kind: shares of 4.
    by_kind = _displayed_table(nb, "untrained head", "style reward model", "right-vs-wrong reward model")
    assert set(by_kind) == {"capital", "sum", "opposite", "science"}, by_kind
    facts_by_kind = {kind: float(row["right-vs-wrong reward model"]) for kind, row in by_kind.items()}
    assert all(4 * v == int(4 * v) for v in facts_by_kind.values()), facts_by_kind

    assert "untrained head on the held-out pairs" in text
    assert "right-vs-wrong accuracy on all 16 held-out questions" in text
    # The figures, in order: loss and margin curves, held-out scores untrained/trained, the probes.
    assert figure_axes(nb) == [2, 2, 1]


@pytest.mark.slow
def test_rlhf_notebook_trains_against_a_function_and_a_reward_model(tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("NBALIGN_QUICK", "1")
    nb = execute_notebook("05_rlhf.ipynb", tmp_path, kernel_name)
    assert_no_errors(nb)
    text = stdout_of(nb)

    _finished(tmp_path / "runs" / "rm")
    runs = {name: _finished(tmp_path / "runs" / folder)
            for name, folder in {"short": "rl-short", "rm": "rl-rm", "rm_strong": "rl-rm-beta-0.5"}.items()}
    # Quick mode, read by the first cell: 2 training prompts x 4 answers = 8 answers = one step per run (the
    # full notebook: 8 prompts, 3 epochs, 12 steps); 4 comparison prompts, one sample each.
    assert {name: run.summary["steps"] for name, run in runs.items()} == {"short": 1, "rm": 1, "rm_strong": 1}
    assert _printed(r"(\d+) training prompts, (\d+) comparison prompts", text) == ("2", "4")
    betas = {name: run.spec["trl_config"]["beta"] for name, run in runs.items()}
    assert betas == {"short": 0.05, "rm": 0.05, "rm_strong": 0.5}
    # The evaluation table: base model and the three runs; "correct" is a share of the 4 prompts' answers.
    models = _displayed_table(nb, "correct_greedy", "correct_sampled", "length_greedy")
    assert set(models) == {"base model", "brevity, β 0.05", "reward model, β 0.05", "reward model, β 0.5"}, models
    for name, row in models.items():
        assert 4 * float(row["correct_greedy"]) == int(4 * float(row["correct_greedy"])), (name, row)
        assert 4 * float(row["correct_sampled"]) == int(4 * float(row["correct_sampled"])), (name, row)
        assert float(row["length_greedy"]) > 0, name
    reward_first = {name: run.summary["reward_first"] for name, run in runs.items()}
    # The optimised reward is brevity alone (names_answer weighs 0): minus the length / 100, below 0.
    assert reward_first["short"] < 0, reward_first
    # beta changes the update, not the start: both reward-model runs scored the same first answers alike.
    assert reward_first["rm"] == pytest.approx(reward_first["rm_strong"], abs=1e-3), reward_first

    # The monitor reward was computed every step but weighed 0: logged, not optimised.
    assert runs["short"].spec["trl_config"]["reward_weights"] == [1.0, 0.0]
    assert logged(runs["rm"], "rewards/names_answer/mean") and logged(runs["rm"], "kl")

    assert "base model, greedy" in text
    # The figures, in order: the four curves of the function run, of the two reward-model runs, the evaluation.
    assert figure_axes(nb) == [4, 4, 3]
