import json

import pytest

from nbalign.data import load_records, to_conversations
from nbalign.tokens import tokenize_sft
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


def test_a_dict_of_columns_of_unequal_length_is_refused_not_cut():
    with pytest.raises(NbalignError) as info:
        load_records({"prompt": ["a", "b", "c"], "completion": ["x", "y"]}, "training data")
    assert str(info.value).startswith(
        "The training data is a dict of columns of different lengths (`prompt` has 3, `completion` has 2 values)")
    assert "Fix: give every column one value per row" in str(info.value)


GOOD_LINE = json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n"


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("single.jsonl", GOOD_LINE * 4 + "{\"prompt\": 'a', \"completion\": \"b\"}\n",
         "Line 5 of the training data file '{path}' is not valid JSON: a value is missing or is not JSON (a stray "
         "comma, a single-quoted string, a bare word), at character 12, near `{\"prompt\": 'a', \"completion\": \"b`. "
         "Fix: correct line 5 of the file"),
        ("blank.jsonl", GOOD_LINE + "\n\n" + '{"prompt": "a" "completion": "b"}\n',
         "Line 4 of the training data file '{path}' is not valid JSON: a comma is missing between two items"),
        ("trailing.jsonl", GOOD_LINE + '{"prompt": "a", "completion": "b",}\n',
         "Line 2 of the training data file '{path}' is not valid JSON: a key is not in double quotes, or a comma "
         "trails the last item"),
        ("pretty.jsonl", json.dumps({"prompt": "a", "completion": "b"}, indent=2),
         "Line 1 of the training data file '{path}' ends before its JSON value does: JSON Lines holds one whole "
         "row per line. Fix: write each row on one line"),
        ("lines.json", GOOD_LINE * 3,
         "The training data file '{path}' holds more than one JSON value (the next starts on line 2): it looks like "
         "JSON Lines, one row per line. Fix: rename it to .jsonl"),
        ("commas.json", "[\n" + GOOD_LINE.strip() + ",\n" + GOOD_LINE.strip() + ",,\n]\n",
         "Line 3 of the training data file '{path}' is not valid JSON: a value is missing or is not JSON"),
    ],
)
def test_json_errors_give_the_files_line_in_plain_words(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(NbalignError) as info:
        load_records(path, "training data")
    assert str(info.value).startswith(message.replace("{path}", str(path)))
    # json's own wording counts lines within the one line it was given, and ends in a full stop of its own.
    assert "line 1 column" not in str(info.value) and ".. " not in str(info.value)


def test_a_file_that_is_not_utf8_says_on_which_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes((GOOD_LINE * 2 + '{"prompt": "café", "completion": "b"}\n').encode("latin-1"))
    with pytest.raises(NbalignError, match=r"is not UTF-8 text \(byte 0xe9 on line 3\)\. Fix: save it again as UTF-8"):
        load_records(path, "training data")


def test_empty_cells_are_refused_not_trained_on_as_nan():
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["a", "b", None, "d"], "completion": ["w", float("nan"), "y", float("nan")]})
    with pytest.raises(NbalignError) as info:
        to_conversations(load_records(frame, "training data"), "training data")
    assert str(info.value) == (
        "Rows 1, 3 of the training data have no `completion` (empty cell: NaN/None); row 2 has no `prompt` (empty "
        "cell: NaN/None). Fix: drop or fill in those rows before training, e.g. "
        "df = df.dropna(subset=['completion', 'prompt'])."
    )
    # An optional Alpaca `input` left empty adds nothing to the prompt (not "nan").
    alpaca = pd.DataFrame({"instruction": ["Add", "Say hi"], "input": ["1 2", float("nan")], "output": ["3", "hi"]})
    rows = to_conversations(load_records(alpaca))
    assert [r["prompt"][0]["content"] for r in rows] == ["Add\n\n1 2", "Say hi"]


def test_message_lists_read_back_from_parquet(tmp_path):
    import pandas as pd

    from nbalign.preference_data import to_pairs

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    other = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]
    pd.DataFrame([{"chosen": turns, "rejected": other}]).to_parquet(tmp_path / "pairs.parquet")
    assert to_pairs(load_records(tmp_path / "pairs.parquet")) == [
        {"prompt": turns[:1], "chosen": turns[1:], "rejected": other[1:]}
    ]


def test_a_completion_that_repeats_its_prompt_is_read_as_the_answer_alone(capsys):
    prompt = [{"role": "user", "content": "2+2?"}]
    rows = to_conversations([{"prompt": "2+2?", "completion": prompt + [{"role": "assistant", "content": "4"}]}])
    assert rows == [{"prompt": prompt, "completion": [{"role": "assistant", "content": "4"}]}]
    assert capsys.readouterr().out == (
        "nbalign: the completions of 1 row repeat their prompt turns; read them as the answers alone.\n")


@pytest.mark.parametrize("method", ["sft", "dpo", "kto"])
def test_empty_cells_fail_the_run_before_anything_is_written(in_tmp, tiny_model, method):
    import pandas as pd

    import nbalign

    data = {
        "sft": pd.DataFrame({"prompt": ["a", "b"], "completion": ["x", None]}),
        "dpo": pd.DataFrame({"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": [float("nan"), "z"]}),
        "kto": pd.DataFrame({"prompt": ["a", "b"], "completion": ["x", "y"], "label": [True, None]}),
    }[method]
    with pytest.raises(NbalignError, match=r"Row [01] of the training data has no `(completion|rejected|label)` "
                                           r"\(empty cell: NaN/None\)\. Fix: .*dropna"):
        getattr(nbalign, method)(data, model=tiny_model, out="runs/nan", max_steps=1, batch_size=2)
    assert not (in_tmp / "runs").exists()
