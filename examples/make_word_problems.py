"""Write the two-step word-problem task's fixed train/test split (examples/data/word_problems.{train,test}.jsonl).

    .venv/bin/python examples/make_word_problems.py         # rewrites the two files, byte for byte

Each problem takes two operations (+, -, x and exact division, in nine story templates about
shopping, reading, saving, classrooms, ...) and its output is the worked solution, one short
calculation per step, then the answer:

    {"input": "Maya has 23 stickers. She buys 4 packs with 12 stickers in each. How many stickers
     does she have now?", "output": "4 * 12 = 48. 23 + 48 = 71. The answer is 71.", "answer": "71"}

Seeded, so the files are reproducible (tests/test_word_problem_data.py checks this script still
makes exactly the committed files and that every solution's arithmetic is right). No two
problems share a calculation, so none is in both splits; answers are positive whole numbers.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20261205
TRAIN, TEST = 2000, 500
OUT = Path(__file__).resolve().parent / "data"

PEOPLE = [
    ("Maya", "she", "her"),
    ("Liam", "he", "his"),
    ("Sofia", "she", "her"),
    ("Noah", "he", "his"),
    ("Ava", "she", "her"),
    ("Omar", "he", "his"),
    ("Lena", "she", "her"),
    ("Ravi", "he", "his"),
    ("Chloe", "she", "her"),
    ("Mateo", "he", "his"),
]
THINGS = [
    ("stickers", "packs"),
    ("marbles", "bags"),
    ("cookies", "boxes"),
    ("pencils", "boxes"),
    ("apples", "crates"),
    ("cards", "decks"),
    ("beads", "jars"),
    ("stamps", "sheets"),
]


def _t(a: int, b: int) -> str:
    return f"{a} * {b} = {a * b}"


# name -> (numbers(rng) -> (a, b, c) or None when they do not make a fair problem, question, steps)
def _buy_more(rng):
    return rng.randint(10, 99), rng.randint(2, 9), rng.randint(6, 25)


def _sell_some(rng):
    a, b, c = rng.randint(60, 400), rng.randint(2, 9), rng.randint(4, 20)
    return (a, b, c) if a > b * c else None


def _read(rng):
    return rng.randint(8, 40), rng.randint(3, 9), rng.randint(5, 60)


def _save(rng):
    a, b, c = rng.randint(5, 30), rng.randint(3, 12), rng.randint(5, 90)
    return (a, b, c) if a * b > c else None


def _groups(rng):
    b = rng.randint(2, 8)
    return b * rng.randint(3, 15), b, rng.randint(2, 9)


def _give_then_buy(rng):
    a, b, c = rng.randint(20, 99), rng.randint(3, 40), rng.randint(3, 60)
    return (a, b, c) if a > b else None


def _rows_removed(rng):
    a, b, c = rng.randint(3, 12), rng.randint(4, 15), rng.randint(2, 30)
    return (a, b, c) if a * b > c else None


def _change(rng):
    a, b = rng.randint(2, 9), rng.randint(3, 15)
    c = rng.choice([x for x in (20, 50, 100, 200) if x > a * b] or [0])
    return (a, b, c) if c else None


def _two_pickings(rng):
    return rng.randint(5, 40), rng.randint(5, 40), rng.randint(2, 9)


TEMPLATES = {
    "buy_more": (
        _buy_more,
        "{P} has {a} {things}. {S} buys {b} {boxes} with {c} {things} in each. How many {things} does {s} have now?",
        lambda a, b, c: [(f"{_t(b, c)}", b * c), (f"{a} + {b * c} = {a + b * c}", a + b * c)],
    ),
    "sell_some": (
        _sell_some,
        "A shop had {a} {things}. It sold {b} {boxes} of {c} {things} each. How many {things} are left?",
        lambda a, b, c: [(_t(b, c), b * c), (f"{a} - {b * c} = {a - b * c}", a - b * c)],
    ),
    "read": (
        _read,
        "{P} reads {a} pages a day for {b} days, then {c} more pages. How many pages does {s} read in all?",
        lambda a, b, c: [(_t(a, b), a * b), (f"{a * b} + {c} = {a * b + c}", a * b + c)],
    ),
    "save": (
        _save,
        "{P} saves {a} dollars a week for {b} weeks, then spends {c} dollars. How many dollars does {s} have left?",
        lambda a, b, c: [(_t(a, b), a * b), (f"{a * b} - {c} = {a * b - c}", a * b - c)],
    ),
    "groups": (
        _groups,
        "{a} students are put into groups of {b}. Each group gets {c} {things}. How many {things} are handed out?",
        lambda a, b, c: [(f"{a} / {b} = {a // b}", a // b), (_t(a // b, c), a // b * c)],
    ),
    "give_then_buy": (
        _give_then_buy,
        "{P} had {a} {things}, gave {b} to a friend, then got {c} more. How many {things} does {s} have now?",
        lambda a, b, c: [(f"{a} - {b} = {a - b}", a - b), (f"{a - b} + {c} = {a - b + c}", a - b + c)],
    ),
    "rows_removed": (
        _rows_removed,
        "A box holds {a} rows of {b} {things}. {P} takes out {c} {things}. How many {things} are still in the box?",
        lambda a, b, c: [(_t(a, b), a * b), (f"{a * b} - {c} = {a * b - c}", a * b - c)],
    ),
    "change": (
        _change,
        "{P} buys {a} notebooks at {b} dollars each and pays with {c} dollars. How many dollars of "
        "change does {s} get?",
        lambda a, b, c: [(_t(a, b), a * b), (f"{c} - {a * b} = {c - a * b}", c - a * b)],
    ),
    "two_pickings": (
        _two_pickings,
        "{P} picks {a} apples in the morning and {b} in the afternoon, every day for {c} "
        "days. How many apples does {s} pick in all?",
        lambda a, b, c: [(f"{a} + {b} = {a + b}", a + b), (_t(a + b, c), (a + b) * c)],
    ),
}


def problems(rng: random.Random, count: int) -> list[tuple[str, int, int, int]]:
    """`count` (template, a, b, c) problems, templates at random, no two with the same calculation
    (two stories that come down to the same steps count as one problem)."""
    chosen, seen = [], set()
    names = sorted(TEMPLATES)
    while len(chosen) < count:
        template = rng.choice(names)
        numbers = TEMPLATES[template][0](rng)
        if numbers is None:
            continue
        steps = tuple(text for text, _ in TEMPLATES[template][2](*numbers))
        if steps in seen:
            continue
        seen.add(steps)
        chosen.append((template, *numbers))
    return chosen


def example(rng: random.Random, template: str, a: int, b: int, c: int) -> dict:
    _, question, solve = TEMPLATES[template]
    person, subject, _ = rng.choice(PEOPLE)
    things, boxes = rng.choice(THINGS)
    steps = solve(a, b, c)
    answer = steps[-1][1]
    solution = ". ".join(text for text, _ in steps) + f". The answer is {answer}."
    text = question.format(P=person, S=subject.capitalize(), s=subject, a=a, b=b, c=c, things=things, boxes=boxes)
    return {"input": text, "output": solution, "answer": str(answer)}


def build(seed: int = SEED) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    chosen = problems(rng, TRAIN + TEST)
    return {"train": [example(rng, *p) for p in chosen[:TRAIN]], "test": [example(rng, *p) for p in chosen[TRAIN:]]}


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    for split, rows in build().items():
        path = args.out / f"word_problems.{split}.jsonl"
        path.write_text(jsonl(rows))
        print(f"wrote {len(rows)} examples to {path}")


if __name__ == "__main__":
    main()
