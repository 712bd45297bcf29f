"""Every converter against the data people hold: bad inputs get one paragraph that names the rows and the fix,
and data as it is published (UltraFeedback, ShareGPT, Dolly, HH-RLHF) becomes TRL's standard rows, saying so
once."""

import pytest

from nbalign.data import load_records, to_conversations
from nbalign.errors import NbalignError
from nbalign.preference_data import to_pairs, to_prompts, to_unpaired

NAN = float("nan")


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def frame(**columns):
    import pandas as pd

    return pd.DataFrame(columns)


def kto_unpair(records, what):
    return to_unpaired(records, what, unpair=True)


def run(convert, data):
    if convert is to_prompts:
        return to_prompts(data, "prompts")
    return convert(load_records(data, "training data"), "training data")


PAIRS = [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}]
THUMBS = [{"prompt": "Capital of France?", "completion": "Paris.", "label": True}]
DEMOS = [{"prompt": "Capital of France?", "completion": "Paris."}]
HH = {
    "chosen": "\n\nHuman: Capital of France?\n\nAssistant: Paris.",
    "rejected": "\n\nHuman: Capital of France?\n\nAssistant: Lyon.",
}

BAD = {
    to_conversations: [
        (frame(prompt=["a", "b", "c", "d"], completion=["w", NAN, "y", None]),
         "Rows 1, 3 of the training data have no `completion` (empty cell: NaN/None). "
         "Fix: drop or fill in those rows before training, e.g. df = df.dropna(subset=['completion'])."),
        (frame(prompt=["a", None, "c"], completion=["w", "x", NAN]),
         "Row 1 of the training data has no `prompt` (empty cell: NaN/None); row 2 has no `completion`"),
        ([{"messages": [user("Hi"), bot(None)]}, {"messages": [user("Hi"), bot("Hello")]},
          {"messages": [user("Hi"), bot(NAN)]}],
         "Rows 0, 2 of the training data have an assistant turn with no content (None/NaN) in `messages`"),
        (frame(instruction=["Add", "Sub"], input=["1 2", NAN], output=[None, "1"]),
         "Row 0 of the training data has no `output` (empty cell: NaN/None)"),
        (frame(instruction=["Add", "Sub"], context=["", ""], response=["3", NAN], category=["qa", "qa"]),
         "Row 1 of the training data has no `response` (empty cell: NaN/None)"),
        ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}],
         "has turns from ['bot'] in `conversations`"),
        ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": None}]}] * 2,
         "Rows 0, 1 of the training data have an assistant turn with no content (None/NaN) in `conversations`"),
        ([{"prompt": "Hi", "completion": {"text": "Hello"}}], "has a `completion` that is a dict, not text"),
        (PAIRS, "these are preference pairs (`chosen`/`rejected`), which %%sft cannot learn from"),
        (PAIRS, "Fix: use %%dpo, %%reward_model, or %%kto --unpair with this data."),
        ([HH], "Fix: use %%dpo, %%reward_model, or %%kto --unpair with this data."),
        (THUMBS, "%%sft would learn the thumbs-down answers as well as the thumbs-up ones. Fix: use %%kto"),
        ([{"prompt": "Capital of France?"}], "these are prompts without answers, which %%sft cannot learn from"),
        ([{"prompt": "Capital of France?"}], "Fix: use %%rlhf with this data"),
        ([{"question": "q", "answer": "a"}], "df.rename(columns={'answer': 'completion', 'question': 'prompt'})"),
    ],
    to_pairs: [
        (frame(prompt=["a", "b", "c", "d"], chosen=["w", "x", None, "z"], rejected=["1", NAN, "3", None]),
         "Rows 1, 3 of the training data have no `rejected` (empty cell: NaN/None); row 2 has no `chosen` "
         "(empty cell: NaN/None). Fix: drop or fill in those rows before training, e.g. "
         "df = df.dropna(subset=['rejected', 'chosen'])."),
        (frame(prompt=["a", NAN], chosen=["w", "x"], rejected=["y", "z"]),
         "Row 1 of the training data has no `prompt` (empty cell: NaN/None)"),
        ([{"prompt": "Hi", "chosen": [bot(None)], "rejected": [bot("Hey")]}],
         "has an assistant turn with no content (None/NaN) in `chosen`"),
        ([{"prompt": "Hi", "chosen": "Hello"}, {"prompt": "Hi", "chosen": "Hello", "rejected": "Hey"}],
         "Row 0 of the training data has no `rejected` (the key is absent)"),
        (THUMBS, "these are thumbs (answers with a `label`), which %%dpo or %%reward_model cannot learn from"),
        (THUMBS, "Fix: use %%kto with this data."),
        (DEMOS, "Fix: use %%sft with this data."),
        ([{"prompt": "Capital of France?"}], "Fix: use %%rlhf with this data"),
        ([{"prompt": "What is 2+2?", "chosen": [user("What is 3+3?"), bot("6")], "rejected": [user("What is 2+2?"), bot("5")]}],
         "Row 0 of the training data has a `chosen` conversation that starts with a user turn other than the `prompt`"),
        ([{**HH, "rejected": "Lyon."}], "a `chosen` transcript in HH-RLHF form but a `rejected` one that is not"),
        ([{"prompt": "q", "chosen": "same", "rejected": "same"}] * 2,
         "Rows 0, 1 of the training data have identical chosen and rejected answers"),
        ([{"question": "q", "good": "a", "bad": "b"}],
         "df.rename(columns={'bad': 'rejected', 'good': 'chosen', 'question': 'prompt'})"),
    ],
    to_unpaired: [
        (frame(prompt=["a", "b", "c"], completion=["x", None, NAN], label=[True, False, True]),
         "Rows 1, 2 of the training data have no `completion` (empty cell: NaN/None)"),
        (frame(prompt=["a", "b", "c"], completion=["x", "y", "z"], label=[True, None, False]),
         "Row 1 of the training data has no `label` (empty cell: NaN/None). Fix: drop or fill in those rows before "
         "training, e.g. df = df.dropna(subset=['label'])."),
        (frame(prompt=["a", "b"], completion=["x", "y"], label=[1.0, NAN]), "Row 1 of the training data has no `label`"),
        ([{**THUMBS[0], "label": "maybe"}] * 2, "Rows 0, 1 of the training data have label 'maybe', which is neither"),
        (DEMOS, "these are demonstrations (answers to imitate, without thumbs or pairs), which %%kto cannot learn from"),
        (DEMOS, "Fix: use %%sft with this data."),
        ([{"prompt": "Capital of France?"}], "Fix: use %%rlhf with this data"),
        (PAIRS, "pass --unpair"),
        ([{"prompt": "Hi", "completion": "Hello", "thumbs": True}], "df.rename(columns={'thumbs': 'label'})"),
    ],
    kto_unpair: [
        (frame(prompt=["a", "b"], chosen=["w", "x"], rejected=[None, "z"]),
         "Row 0 of the training data has no `rejected` (empty cell: NaN/None)"),
    ],
    to_prompts: [
        (frame(prompt=["a", None, NAN]), "Rows 1, 2 of the prompts have no `prompt` (empty cell: NaN/None)"),
        (["Capital of France?", None], "Row 1 of the prompts has no `prompt` (empty cell: NaN/None)"),
        ([{"prompt": "  "}], "Row 0 of the prompts has an empty prompt"),
        ([{"question": "q"}], "df.rename(columns={'question': 'prompt'})"),
        ([{"completion": "x", "label": True}], "Fix: use %%kto with this data."),
        ([{"text": "Once upon a time"}], "The prompts have columns ['text'], but %%rlhf needs"),
        ([{"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": None}]}],
         "has an assistant turn with no content (None/NaN) in `conversations`"),
    ],
}
CASES = [(convert, data, fragment) for convert, table in BAD.items() for data, fragment in table]


@pytest.mark.parametrize("convert, data, fragment", CASES,
                         ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_bad_data_is_one_paragraph_naming_rows_and_fix(convert, data, fragment):
    with pytest.raises(NbalignError) as info:
        run(convert, data)
    message = str(info.value)
    assert fragment in message
    assert "Fix:" in message and "\n" not in message


# Rows as their datasets publish them, each with the rows nbalign makes of them and the one line it prints.
ULTRAFEEDBACK = [
    {
        "prompt": "Which of these is a fruit: carrot, apple, or celery?",
        "prompt_id": "8f1c",
        "chosen": [user("Which of these is a fruit: carrot, apple, or celery?"), bot("The apple is the fruit.")],
        "rejected": [user("Which of these is a fruit: carrot, apple, or celery?"), bot("Carrot.")],
        "messages": [user("Which of these is a fruit: carrot, apple, or celery?"), bot("The apple is the fruit.")],
        "score_chosen": 8.5,
        "score_rejected": 3.0,
    },
    {
        "prompt": "Say hi in French.",
        "prompt_id": "a2d0",
        "chosen": [user("Say hi in French."), bot("Bonjour !")],
        "rejected": [user("Say hi in French."), bot("Hola.")],
        "messages": [user("Say hi in French."), bot("Bonjour !")],
        "score_chosen": 9.0,
        "score_rejected": 1.0,
    },
]
SHAREGPT = [
    {"id": "QWJhYv_0", "conversations": [
        {"from": "system", "value": "You are terse."},
        {"from": "human", "value": "What is the boiling point of water?"},
        {"from": "gpt", "value": "100 °C at sea level."},
        {"from": "human", "value": "In Fahrenheit?"},
        {"from": "gpt", "value": "212 °F."},
    ]},
    {"id": "QWJhYv_1", "conversations": [
        {"from": "user", "value": "Name a prime."},
        {"from": "assistant", "value": "7"},
    ]},
]
DOLLY = [
    {"instruction": "When did Virgin Australia start operating?",
     "context": "Virgin Australia commenced services on 31 August 2000 as Virgin Blue.",
     "response": "Virgin Australia commenced services on 31 August 2000.", "category": "closed_qa"},
    {"instruction": "Which is a species of fish? Tope or Rope", "context": "",
     "response": "Tope", "category": "classification"},
]
HH_RLHF = [
    {"chosen": "\n\nHuman: What are some cuss words in english?\n\nAssistant: I'd rather not list them."
               "\n\nHuman: Why not?\n\nAssistant: They could hurt people.",
     "rejected": "\n\nHuman: What are some cuss words in english?\n\nAssistant: I'd rather not list them."
                 "\n\nHuman: Why not?\n\nAssistant: Fine, here is a list."},
    {"chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt, then bake.",
     "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: Buy it."},
]
HH_PROMPT = [user("What are some cuss words in english?"), bot("I'd rather not list them."), user("Why not?")]
UF_LINE = ("nbalign: the `chosen`/`rejected` conversations of 2 rows repeat their `prompt` turns (UltraFeedback "
           "form); read them as the answers alone.")
HH_LINE = ("nbalign: read 2 rows in HH-RLHF form (chosen/rejected transcripts with Human:/Assistant: turns) as "
           "conversational pairs.")
SHAREGPT_LINE = "nbalign: read 2 rows in ShareGPT form (conversations with from/value) as messages."
DOLLY_LINE = "nbalign: read 2 rows in Dolly form (instruction/context/response) as prompt + completion."

PUBLISHED = [
    ("ultrafeedback", to_pairs, ULTRAFEEDBACK, [
        {"prompt": [user("Which of these is a fruit: carrot, apple, or celery?")],
         "chosen": [bot("The apple is the fruit.")], "rejected": [bot("Carrot.")]},
        {"prompt": [user("Say hi in French.")], "chosen": [bot("Bonjour !")], "rejected": [bot("Hola.")]},
    ], UF_LINE),
    ("ultrafeedback-kto", kto_unpair, ULTRAFEEDBACK[1:], [
        {"prompt": [user("Say hi in French.")], "completion": [bot("Bonjour !")], "label": True},
        {"prompt": [user("Say hi in French.")], "completion": [bot("Hola.")], "label": False},
    ], UF_LINE.replace("2 rows", "1 row")),
    ("ultrafeedback-rl", to_prompts, ULTRAFEEDBACK[1:], [
        {"prompt": [user("Say hi in French.")], **{k: v for k, v in ULTRAFEEDBACK[1].items() if k not in ("prompt", "messages")}},
    ], None),
    ("sharegpt", to_conversations, SHAREGPT, [
        {"messages": [{"role": "system", "content": "You are terse."}, user("What is the boiling point of water?"),
                      bot("100 °C at sea level."), user("In Fahrenheit?"), bot("212 °F.")]},
        {"messages": [user("Name a prime."), bot("7")]},
    ], SHAREGPT_LINE),
    ("sharegpt-rl", to_prompts, SHAREGPT, [
        {"prompt": [{"role": "system", "content": "You are terse."}, user("What is the boiling point of water?"),
                    bot("100 °C at sea level."), user("In Fahrenheit?")], "id": "QWJhYv_0"},
        {"prompt": [user("Name a prime.")], "id": "QWJhYv_1"},
    ], SHAREGPT_LINE),
    ("dolly", to_conversations, DOLLY, [
        {"prompt": [user("When did Virgin Australia start operating?\n\n"
                         "Virgin Australia commenced services on 31 August 2000 as Virgin Blue.")],
         "completion": [bot("Virgin Australia commenced services on 31 August 2000.")]},
        {"prompt": [user("Which is a species of fish? Tope or Rope")], "completion": [bot("Tope")]},
    ], DOLLY_LINE),
    ("dolly-rl", to_prompts, DOLLY[1:], [
        {"prompt": [user("Which is a species of fish? Tope or Rope")], **DOLLY[1]},
    ], DOLLY_LINE.replace("2 rows", "1 row")),
    ("hh-rlhf", to_pairs, HH_RLHF, [
        {"prompt": HH_PROMPT, "chosen": [bot("They could hurt people.")], "rejected": [bot("Fine, here is a list.")]},
        {"prompt": [user("How do I bake bread?")], "chosen": [bot("Mix flour, water, yeast and salt, then bake.")],
         "rejected": [bot("Buy it.")]},
    ], HH_LINE),
    ("hh-rlhf-kto", kto_unpair, HH_RLHF[:1] * 2, [
        {"prompt": HH_PROMPT, "completion": [bot("They could hurt people.")], "label": True},
        {"prompt": HH_PROMPT, "completion": [bot("Fine, here is a list.")], "label": False},
    ] * 2, HH_LINE),
    ("hh-rlhf-rl", to_prompts, HH_RLHF[:1], [{"prompt": HH_PROMPT, **HH_RLHF[0]}], HH_LINE.replace("2 rows", "1 row")),
]


@pytest.mark.parametrize("convert, data, expected, line", [p[1:] for p in PUBLISHED], ids=[p[0] for p in PUBLISHED])
def test_published_formats_become_standard_rows_and_say_so_once(convert, data, expected, line, capsys):
    assert run(convert, data) == expected
    printed = capsys.readouterr().out
    assert printed == (f"{line}\n" if line else "")


def test_ultrafeedback_for_sft_trains_on_its_messages():
    # The train_prefs rows carry `messages` (the chosen conversation), which is what %%sft learns from.
    assert to_conversations(ULTRAFEEDBACK[1:]) == [{"messages": [user("Say hi in French."), bot("Bonjour !")]}]
