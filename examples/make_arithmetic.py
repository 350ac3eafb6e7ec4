"""Write the arithmetic task's fixed train/test split (examples/data/arithmetic.{train,test}.jsonl).

    .venv/bin/python examples/make_arithmetic.py            # rewrites the two files, byte for byte

Problems are 2- and 3-digit additions, subtractions (never negative) and multiplications, each in
one of several phrasings, seeded, so the files are reproducible; tests/test_arithmetic_data.py
checks that this script still makes exactly the committed files. The output is the number alone.
No problem (operands and operator, whatever the phrasing) is in both splits.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20261202
TRAIN, TEST = 2000, 500
OUT = Path(__file__).resolve().parent / "data"

PHRASINGS = {
    "+": [
        "What is {a} plus {b}?",
        "Compute {a} + {b}.",
        "Add {a} and {b}.",
        "How much is {a} + {b}?",
        "{a} + {b} = ?",
        "What is the sum of {a} and {b}?",
    ],
    "-": [
        "What is {a} minus {b}?",
        "Compute {a} - {b}.",
        "Subtract {b} from {a}.",
        "How much is {a} - {b}?",
        "{a} - {b} = ?",
        "What is the difference between {a} and {b}?",
    ],
    "x": [
        "What is {a} times {b}?",
        "Compute {a} x {b}.",
        "Multiply {a} by {b}.",
        "How much is {a} x {b}?",
        "{a} x {b} = ?",
        "What is the product of {a} and {b}?",
    ],
}


def operand(rng: random.Random) -> int:
    digits = rng.choice((2, 3))
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def problems(rng: random.Random, count: int) -> list[tuple[int, str, int]]:
    """`count` distinct (a, op, b) problems; subtraction keeps a >= b."""
    chosen: list[tuple[int, str, int]] = []
    seen: set[tuple[int, str, int]] = set()  # only asked for membership: str hashing varies per process
    while len(chosen) < count:
        a, op, b = operand(rng), rng.choice("+-x"), operand(rng)
        if op == "-" and a < b:
            a, b = b, a
        if (a, op, b) not in seen:
            seen.add((a, op, b))
            chosen.append((a, op, b))
    return chosen


def example(rng: random.Random, a: int, op: str, b: int) -> dict:
    answer = {"+": a + b, "-": a - b, "x": a * b}[op]
    return {"input": rng.choice(PHRASINGS[op]).format(a=a, b=b), "output": str(answer)}


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
        path = args.out / f"arithmetic.{split}.jsonl"
        path.write_text(jsonl(rows))
        print(f"wrote {len(rows)} examples to {path}")


if __name__ == "__main__":
    main()
