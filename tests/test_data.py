from __future__ import annotations

import json

import pytest

from trainer.config import TrainConfig, TrainConfigError
from trainer.data import DataError, Example, jsonl_lines, load_examples, parse_examples, split_examples


def lines(*records) -> list[str]:
    return [r if isinstance(r, str) else json.dumps(r) for r in records]


def test_valid_lines_parse_and_blank_lines_are_skipped():
    examples = parse_examples(
        lines({"input": "a", "output": "x"}, "", {"input": "b", "output": "y", "split": "validation", "movie": "m"})
    )
    assert examples == [Example("a", "x"), Example("b", "y", "validation")]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        ('["input", "output"]', "expected a JSON object"),
        ({"output": "x"}, "missing field 'input'"),
        ({"input": "a"}, "missing field 'output'"),
        ({"input": 3, "output": "x"}, "field 'input' must be a string"),
        ({"input": "a", "output": "   "}, "field 'output' is empty"),
        ({"input": "a", "output": "x", "split": "test"}, "unknown split 'test'"),
    ],
)
def test_malformed_line_is_refused_with_source_and_line_number(bad, message):
    with pytest.raises(DataError, match=message) as caught:
        parse_examples(lines({"input": "ok", "output": "ok"}, bad), source="train.jsonl")
    assert "train.jsonl, line 2" in str(caught.value)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_examples(path)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")


def test_split_is_deterministic_and_seeded():
    examples = [Example(str(i), "x") for i in range(100)]
    first = split_examples(examples, 0.2, seed=1)
    assert first == split_examples(examples, 0.2, seed=1)
    assert len(first[1]) == 20 and len(first[0]) == 80
    assert set(first[0]).isdisjoint(first[1])
    assert split_examples(examples, 0.2, seed=2)[1] != first[1]


def test_explicit_split_fields_win():
    examples = [Example("a", "x", "train"), Example("b", "x"), Example("c", "y", "validation")]
    train, val = split_examples(examples, 0.5, seed=0)
    assert [e.input for e in train] == ["a", "b"] and [e.input for e in val] == ["c"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", 0.0),
        ("steps", 0),
        ("min_cosine", 1.0),
        ("task", "regression"),
        ("batch_size", 2.5),
        ("patience", 0),
        ("eval_fraction", 1.0),
        ("init_text", " "),
    ],
)
def test_bad_config_names_the_field(field, value):
    settings = {"init_text": "hello", field: value}
    with pytest.raises(TrainConfigError) as caught:
        TrainConfig(**settings)
    assert caught.value.field == field and str(caught.value).startswith(field)


def test_config_from_dict_refuses_unknown_keys_and_round_trips():
    config = TrainConfig(init_text="hi", steps=5)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TrainConfigError, match="learning_rate"):
        TrainConfig.from_dict({"init_text": "hi", "learning_rate": 1.0})


def test_records_holding_unicode_line_separators_stay_whole(tmp_path):
    """JSON strings may hold U+2028, U+2029 and U+0085 raw (a review in the shipped test split does);
    str.splitlines would cut such a record in two."""
    rows = [{"input": "one\u2028two\x85three\u2029four", "output": "positive"}, {"input": "next", "output": "negative"}]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\r\n" for row in rows)
    assert [(e.input, e.output) for e in parse_examples(jsonl_lines(text))] == [(r["input"], r["output"]) for r in rows]
    path = tmp_path / "data.jsonl"
    path.write_bytes(text.encode())
    assert load_examples(path) == parse_examples(jsonl_lines(text))
