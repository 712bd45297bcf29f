import json

import pytest

from nbalign.data import load_records, to_conversations, tokenize_sft
from nbalign.errors import NbalignError


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


ROWS = [{"prompt": "2+2?", "completion": "4"}, {"prompt": "3+3?", "completion": "6"}]


def test_reads_every_container_and_file_type(tmp_path):
    import pandas as pd
    from datasets import Dataset

    frame = pd.DataFrame(ROWS)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    sources = [ROWS, frame, Dataset.from_list(ROWS), {"prompt": ["2+2?", "3+3?"], "completion": ["4", "6"]}]
    sources += [tmp_path / n for n in ("d.jsonl", "d.json", "d.csv", "d.parquet", "saved")]
    for source in sources:
        records = load_records(source)
        assert [(r["prompt"], str(r["completion"])) for r in records] == [("2+2?", "4"), ("3+3?", "6")], source


def test_formats_are_normalised_to_conversations():
    alpaca = to_conversations([{"instruction": "Translate", "input": "chat", "output": "cat"}])
    assert alpaca[0]["prompt"][0]["content"] == "Translate\n\nchat"
    assert alpaca[0]["completion"] == [{"role": "assistant", "content": "cat"}]
    pc = to_conversations(ROWS)
    assert pc[0]["prompt"] == [{"role": "user", "content": "2+2?"}]
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert to_conversations([{"messages": msgs}]) == [{"messages": msgs}]
    # Message lists stored as JSON text (CSV round trips) are read back.
    assert to_conversations([{"messages": json.dumps(msgs)}]) == [{"messages": msgs}]


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "is empty"),
        ([{"question": "q", "answer": "a"}], r"rename the columns, e.g. df.rename\(columns=\{'answer': 'completion'"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant message"),
        ([{"messages": [{"role": "bot", "content": "hi"}]}], "role 'bot'"),
        ([{"prompt": "q", "completion": "  "}], "empty completion"),
        ("no/such/file.jsonl", "neither a notebook variable nor an existing file"),
        (42, "cannot read"),
    ],
)
def test_bad_data_gets_one_clear_error(data, message):
    with pytest.raises(NbalignError, match=message):
        to_conversations(load_records(data))


def _learned_text(tokenizer, ids, mask):
    return tokenizer.decode([t for t, m in zip(ids, mask) if m])


def test_loss_mask_covers_assistant_turns_and_their_end_of_turn_only(tokenizer):
    conversation = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And Italy?"},
        {"role": "assistant", "content": "Rome"},
    ]
    out = tokenize_sft([{"messages": conversation}], tokenizer)
    learned = _learned_text(tokenizer, out["input_ids"][0], out["completion_mask"][0])
    # Both assistant turns (multi-turn), each with the EOS that makes the model stop; nothing else.
    assert learned == "Paris<|im_end|>Rome<|im_end|>"


def test_few_shot_assistant_turns_in_a_prompt_are_not_targets(tokenizer):
    row = to_conversations([{
        "prompt": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                   {"role": "user", "content": "2+2?"}],
        "completion": "4",
    }])
    out = tokenize_sft(row, tokenizer)
    assert _learned_text(tokenizer, out["input_ids"][0], out["completion_mask"][0]) == "4<|im_end|>"
    everything = tokenize_sft(row, tokenizer, completion_only=False)
    assert all(everything["completion_mask"][0])
