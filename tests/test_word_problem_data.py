"""The committed word-problem split is what examples/make_word_problems.py makes: reproducible,
worked solutions whose every step is right, no problem in both splits, scored by their answer."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from trainer.data import load_examples
from trainer.evaluate import answers_match, extract_answer

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
STEP = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")


def _generator():
    spec = importlib.util.spec_from_file_location("make_word_problems", DATA.parent / "make_word_problems.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generator_makes_exactly_the_committed_files():
    generator = _generator()
    for split, rows in generator.build().items():
        assert (DATA / f"word_problems.{split}.jsonl").read_text() == generator.jsonl(rows), split


def test_every_step_of_every_solution_is_right_and_no_problem_is_in_both_splits():
    seen = {}
    for split, size in (("train", 2000), ("test", 500)):
        rows = [json.loads(line) for line in (DATA / f"word_problems.{split}.jsonl").read_text().splitlines()]
        assert len(rows) == size and len(load_examples(DATA / f"word_problems.{split}.jsonl")) == size
        for row in rows:
            *steps, stated = row["output"].rstrip(".").split(". ")
            assert len(steps) == 2 and stated == f"The answer is {row['answer']}", row
            results = []
            for step in steps:
                a, op, b, result = STEP.fullmatch(step).groups()
                a, b, result = int(a), int(b), int(result)
                assert result == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] and (op != "/" or a % b == 0), (
                    row
                )
                results.append(result)
            assert results[0] in {int(n) for n in re.findall(r"\d+", steps[1])}  # step 2 uses step 1's result
            assert str(results[-1]) == row["answer"] and int(row["answer"]) > 0
            assert set(map(int, re.findall(r"\d+", row["input"]))) <= {
                int(n) for n in re.findall(r"\d+", row["output"])
            }
        seen[split] = {row["output"].rsplit(". The answer", 1)[0] for row in rows}  # the calculation
        assert len(seen[split]) == size
    assert not seen["train"] & seen["test"]


def test_a_worked_solution_is_scored_by_its_stated_answer():
    target = "4 * 12 = 48. 23 + 48 = 71. The answer is 71."
    assert extract_answer(target) == "71"
    assert answers_match("4 * 12 = 48. 23 + 48 = 71. The answer is 71.", target)
    assert answers_match("The answer is 71", target) and answers_match("23 + 48 = 71", target)  # else the last number
    assert not answers_match("4 * 12 = 48. 23 + 48 = 72. The answer is 72.", target)
    assert not answers_match("To solve the problem, we need to follow these steps: 1. Calculate", target)
    assert answers_match("48 + 23 = 71. The answer is 71. Then 5 more", target)  # the stated answer wins
