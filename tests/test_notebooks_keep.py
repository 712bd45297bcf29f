"""Tutorials 08 (merge and export) and 09 (the PEFT family), executed top to bottom by a real Jupyter kernel in
quick mode (NBALIGN_QUICK=1: two optimizer steps per run, a few held-out prompts). What is checked is what the
notebook leaves behind: its run folders and exports, and the outputs a reader sees."""

from __future__ import annotations

import json
import re

import pytest
from helpers import assert_no_errors, code_outputs, execute_notebook, figure_axes, stdout_of

import nbalign


def _html(nb) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in code_outputs(nb))


@pytest.mark.slow
def test_merge_and_export_notebook_merges_compares_chats_and_exports(tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("NBALIGN_QUICK", "1")
    nb = execute_notebook("08_merge_and_export.ipynb", tmp_path, kernel_name)
    assert_no_errors(nb)
    runs = tmp_path / "runs"
    for name in ("json", "refuse", "both", "cat-0.5", "ties"):
        assert nbalign.Run(runs / name).status == "finished", name
    both = nbalign.Run(runs / "both")
    assert both.spec["method"] == "merge" and both.summary["merge"] == "cat"
    assert both.spec["spec"]["weights"] == [1.0, 0.5]
    assert [p.rsplit("/", 1)[-1] for p in both.spec["spec"]["sources"]] == ["json", "refuse"]
    assert "runs/json" in (runs / "both" / "README.md").read_text()  # the card names its sources

    text = stdout_of(nb)
    # The exported safetensors model, loaded by plain transformers, answers as the run does.
    plain = re.search(r"^plain transformers: (.*)$", text, re.M).group(1)
    run = re.search(r"^the run: +(.*)$", text, re.M).group(1)
    assert plain.strip() == run.strip() and plain.strip()
    exported = tmp_path / "exports" / "json-and-safe"
    assert (exported / "model.safetensors").is_file() and (exported / "chat_template.jinja").is_file()
    assert (tmp_path / "exports" / "json-and-safe-f16.gguf").stat().st_size > 100 * 2**20
    html = _html(nb)
    assert re.search(r"json-and-safe-f16\.gguf</td>\s*<td>\d+</td>\s*<td>2/2</td>", html), "GGUF answers differ"
    # The comparison shows a prompt's markup as text, and the chat box was drawn with the conversation sent.
    assert "Write &lt;b&gt;bold&lt;/b&gt; in HTML." in html and "Write <b>bold</b>" not in html
    widgets = [o for o in code_outputs(nb) if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert any("chat with runs/both" in o["data"]["text/plain"] for o in widgets)
    card = "".join(o.get("data", {}).get("text/markdown", "") for o in code_outputs(nb))
    assert "base_model_relation: merge" in card and "Tutorial 08: how two behaviours survive a merge" in card
    assert figure_axes(nb) == [1]  # the weight sweep


@pytest.mark.slow
def test_peft_family_notebook_trains_each_type_and_plots_cost_and_result(tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("NBALIGN_QUICK", "1")
    nb = execute_notebook("09_peft_family.ipynb", tmp_path, kernel_name)
    assert_no_errors(nb)
    peft_types = {"lora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING"}  # quick mode's three of six
    for kind, peft_type in peft_types.items():
        run = nbalign.Run(tmp_path / "runs" / kind)
        assert run.status == "finished", kind
        config = json.loads((run.path / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == peft_type
        assert run.evaluation is not None and run.evaluation.after["n"] == 4  # measured on the held-out four
        assert run.summary["memory_peak_mib"] > 0 and run.summary["time_s"]["training"] > 0
    # The cost-and-result table shows one row per type, in order, with the measured peak beside the estimate.
    table = next(o["data"]["text/html"] for o in code_outputs(nb) if "memory peak MiB" in o.get("data", {}).get(
        "text/html", ""))
    assert re.findall(r"<tr>\s*<th>(\w+)</th>", table) == ["type", *peft_types], table  # the index name, the rows
    assert "memory estimate MiB" in table
    assert figure_axes(nb) == [4]  # parameters, memory, time, held-out answers
