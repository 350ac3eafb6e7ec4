"""The committed arithmetic split is what examples/make_arithmetic.py makes: reproducible,
correct answers, no problem in both splits, parseable by the trainer."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from trainer.data import load_examples

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
NUMBERS = re.compile(r"\d+")


def _generator():
    spec = importlib.util.spec_from_file_location("make_arithmetic", DATA.parent / "make_arithmetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generator_makes_exactly_the_committed_files():
    generator = _generator()
    for split, rows in generator.build().items():
        assert (DATA / f"arithmetic.{split}.jsonl").read_text() == generator.jsonl(rows), split


def test_answers_are_right_and_no_problem_is_in_both_splits():
    operators = {
        "plus": "+",
        "+": "+",
        "Add": "+",
        "sum": "+",
        "minus": "-",
        "-": "-",
        "Subtract": "-",
        "difference": "-",
        "times": "x",
        "x": "x",
        "Multiply": "x",
        "product": "x",
    }
    problems = {}
    for split in ("train", "test"):
        examples = load_examples(DATA / f"arithmetic.{split}.jsonl")
        assert len(examples) == {"train": 2000, "test": 500}[split]
        keys = set()
        for e in examples:
            a, b = map(int, NUMBERS.findall(e.input))
            op = next(
                symbol for word, symbol in operators.items() if word in e.input.split() or f" {word} " in f" {e.input} "
            )
            if e.input.startswith("Subtract"):
                a, b = b, a  # "Subtract b from a."
            assert int(e.output) == {"+": a + b, "-": a - b, "x": a * b}[op], e
            assert 10 <= a <= 999 and 10 <= b <= 999 and int(e.output) >= 0
            keys.add((a, op, b))
        assert len(keys) == len(examples)  # no repeats within a split
        problems[split] = keys
    assert not problems["train"] & problems["test"]
