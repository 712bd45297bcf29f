"""The model card a run writes: metadata block, intended use, data with examples, settings, evaluation, limits."""

import nbalign
from helpers import chats


def test_the_card_is_written_from_the_run_itself(tiny_model, in_tmp):
    nbalign.lora(r=4, model=tiny_model)
    rows = chats(8)
    rows[0]["messages"][1]["content"] = "<script>alert(1)</script>"
    run = nbalign.sft(rows, model=tiny_model, eval_data=chats(4), out="runs/card", epochs=1, batch_size=4,
                      eval_points=1, probe=False, fewshot=0, intended_use="Answers quiz questions in one line.")
    card = run.card
    head, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "base_model:" in head and "library_name: peft" in head and "- sft" in head and "- lora" in head
    assert "## Intended use\n\nAnswers quiz questions in one line." in body
    assert "8 examples from in-memory" in body and "```json" in body and "<script>alert(1)</script>" in body
    assert "| learning_rate |" in body and "| num_train_epochs | 1" in body
    assert "## Evaluation" in body and "| answers in the reference answer's form |" in body
    assert "### Warnings" in body and "## Limitations" in body and "| hardware | CPU" in body
    page = run._repr_html_()
    assert "model card (README.md)" in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert(1)</script>" not in page

    bare = nbalign.sft(chats(8), model=tiny_model, out="runs/bare", epochs=1, batch_size=4, eval_points=1,
                       probe=False, fewshot=0)
    assert "_Not stated." in bare.card and "intended_use" in bare.card
