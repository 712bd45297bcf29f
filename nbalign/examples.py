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


def json_answers(split: str = "train") -> list[dict]:
    """Conversations in the `messages` format. "train": 51 rows; "heldout": 16 others (4 per category)."""
    train, heldout = [], []
    for group in _all_rows():
        heldout.extend(group[-4:])
        train.extend(group[:-4])
    if split == "train":
        return train
    if split == "heldout":
        return heldout
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


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
