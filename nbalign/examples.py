"""Small built-in data sets for the demo, the tutorials, the tests and the benchmarks.

`json_answers`: questions answered as a one-line JSON object {"answer": ..., "category": ...}. The
built-in model answers these in prose, so whether tuning taught the format is easy to measure.
"""

from __future__ import annotations

import json

_CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Egypt", "Cairo"), ("Brazil", "Brasilia"),
    ("India", "New Delhi"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Peru", "Lima"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Mexico", "Mexico City"), ("Russia", "Moscow"), ("China", "Beijing"),
    ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Argentina", "Buenos Aires"),
]
_SUMS = [(7, 5), (12, 9), (3, 4), (20, 22), (15, 6), (8, 8), (31, 11), (9, 14), (40, 2), (6, 17), (25, 25),
         (13, 7), (18, 5), (11, 30), (4, 19)]
_OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
              ("early", "late"), ("full", "empty"), ("open", "closed"), ("strong", "weak"), ("high", "low"),
              ("young", "old"), ("wet", "dry"), ("rich", "poor"), ("push", "pull"), ("day", "night")]
_SCIENCE = [
    ("What gas do plants absorb from the air?", "carbon dioxide"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("At what temperature in Celsius does water boil at sea level?", "100"),
    ("What is the chemical symbol for gold?", "Au"),
    ("How many legs does a spider have?", "8"),
    ("What force keeps us on the ground?", "gravity"),
    ("What is the closest star to Earth?", "the Sun"),
    ("What organ pumps blood through the body?", "the heart"),
    ("What is H2O commonly called?", "water"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("How many days does the Earth take to orbit the Sun?", "365"),
    ("What is the hardest natural material?", "diamond"),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
    ("How many continents are there?", "7"),
]


def _row(question: str, answer: str, category: str) -> dict:
    completion = json.dumps({"answer": answer, "category": category})
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": completion}]}


def _all_rows() -> list[list[dict]]:
    groups = [
        [_row(f"What is the capital of {c}?", city, "geography") for c, city in _CAPITALS],
        [_row(f"What is {a} plus {b}?", str(a + b), "math") for a, b in _SUMS],
        [_row(f"What is the opposite of '{w}'?", o, "language") for w, o in _OPPOSITES],
        [_row(q, a, "science") for q, a in _SCIENCE],
    ]
    return groups


def _split(groups: list[list[dict]], split: str) -> list[dict]:
    """The last 4 rows of each category are held out; the rest train."""
    if split == "train":
        return [row for group in groups for row in group[:-4]]
    if split == "heldout":
        return [row for group in groups for row in group[-4:]]
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def json_answers(split: str = "train") -> list[dict]:
    """Conversations in the `messages` format. "train": 51 rows; "heldout": 16 others (4 per category)."""
    return _split(_all_rows(), split)


def is_json_answer(text: str) -> bool:
    """True when `text` is exactly one JSON object with a string `answer` and a string `category`."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        return False
    return (
        isinstance(value, dict)
        and set(value) == {"answer", "category"}
        and all(isinstance(v, str) and v for v in value.values())
    )


# ----------------------------------------------------------------------------------------------------
# `style_pairs`: the same questions, answered tersely ("Answer: Paris.") or in a rambling, padded style.
# The built-in model answers in prose of about 85 characters, so a preference for the terse style is
# visible in both the implicit reward and the greedy answers.

_OPENERS = [
    "Great question! Let me think about this carefully before I answer.",
    "That is a really interesting thing to wonder about, and many people ask it.",
    "Thanks for asking! There is quite a lot that could be said here.",
    "What a wonderful question. I am happy to walk you through it step by step.",
    "Good question! It is worth taking a moment to consider it properly.",
]
_CLOSERS = [
    "I hope this explanation helps, and please let me know if you have any other questions!",
    "Feel free to ask me anything else you are curious about, I am always glad to help.",
    "I hope that clears things up for you. Do not hesitate to ask a follow-up question!",
    "Let me know if you would like more detail on any part of this answer.",
    "Thanks again for such a thoughtful question, and have a wonderful day!",
]


def _plain_questions() -> list[list[tuple[str, str, str]]]:
    return [
        [(f"What is the capital of {c}?", city, f"the capital city of {c} is {city}") for c, city in _CAPITALS],
        [(f"What is {a} plus {b}?", str(a + b), f"adding {a} and {b} together gives {a + b}") for a, b in _SUMS],
        [(f"What is the opposite of '{w}'?", o, f"the word most people use as the opposite of '{w}' is '{o}'")
         for w, o in _OPPOSITES],
        [(q, a, f"the answer to that is {a}") for q, a in _SCIENCE],
    ]


def terse_answer(answer: str) -> str:
    return f"Answer: {answer}."


def rambling_answer(i: int, fact: str) -> str:
    return f"{_OPENERS[i % len(_OPENERS)]} As it turns out, {fact}. {_CLOSERS[(i * 3 + 1) % len(_CLOSERS)]}"


def style_pairs(split: str = "train") -> list[dict]:
    """Preference pairs {"prompt", "chosen", "rejected"}: chosen is the terse "Answer: X." style, rejected a
    rambling reply with the same fact. "train": 51 pairs; "heldout": 16 others (4 per category)."""
    groups, i = [], 0
    for group in _plain_questions():
        rows = []
        for question, answer, fact in group:
            rows.append({"prompt": question, "chosen": terse_answer(answer), "rejected": rambling_answer(i, fact)})
            i += 1
        groups.append(rows)
    return _split(groups, split)


def style_thumbs(split: str = "train") -> list[dict]:
    """Unpaired thumbs {"prompt", "completion", "label"} from the same questions, as a labelling session
    gives them: every terse answer up, and the rambling answers to only some prompts down (skewed classes)."""
    rows = []
    for k, pair in enumerate(style_pairs(split)):
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        if k % 3 != 2:  # two thirds of the prompts also got a rambling answer, rated down
            rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return rows


def is_terse(text: str) -> bool:
    """True when `text` is in the preferred style: starts with "Answer:" and is one short line."""
    text = text.strip()
    return text.startswith("Answer:") and len(text) <= 60 and "\n" not in text


# General English for the forgetting watch: perplexity before and after tuning. Plain descriptive prose
# unrelated to the tuning tasks, written for nbalign.
GENERAL_TEXT = [
    "The river runs slowly through the valley in late summer, and the fields on either side turn from green "
    "to gold as the harvest approaches. Farmers rise early to bring in the grain before the afternoon heat.",
    "A library is more than a room full of books. It is a place where people come to read, to study, to meet "
    "friends, and to find quiet. Many libraries now lend tools, musical instruments and even seeds.",
    "Bread is made from flour, water, salt and yeast. The yeast feeds on the sugars in the flour and releases "
    "gas, which makes the dough rise. Baking sets the structure and browns the crust.",
    "In the morning the market square fills with stalls selling fruit, vegetables, cheese and flowers. By noon "
    "most of the best produce has been sold, and the traders begin to pack away their tables.",
    "Trains connect the large cities of the country, and many people commute by rail every day. A delay of a few "
    "minutes at one station can ripple through the whole network during the busy hours.",
    "Learning to play the piano takes patience. Beginners practise scales and simple pieces, slowly building the "
    "strength and coordination of their fingers, before they move on to more demanding music.",
    "The old lighthouse stands on a rocky point at the mouth of the harbour. For more than a century its lamp "
    "guided fishing boats home through fog and storms, until an automatic beacon replaced it.",
    "Good sleep matters for health. Adults generally need between seven and nine hours a night, and keeping a "
    "regular schedule helps the body know when it is time to rest and when it is time to wake.",
    "Volunteers spent the weekend cleaning the beach, collecting plastic bottles, fishing nets and bags. They "
    "sorted what they found so that as much of it as possible could be recycled.",
    "The museum's new exhibition shows how people lived in the city two hundred years ago, with furniture, "
    "clothing, letters and tools arranged as they might have been in an ordinary family home.",
    "Cycling to work has become more popular as cities build separate lanes for bicycles. Riders say the lanes "
    "make them feel safer, and shop owners on those streets report more customers passing by.",
    "When the snow finally melted, the mountain paths reopened and hikers returned to the high meadows, where "
    "small flowers appear within days of the ground thawing.",
]
