"""Comparing prompts on the same examples: the statistics, the table and `softprompt eval`."""

from __future__ import annotations

import json
import math

import pytest
import torch

import core.modeling
from core.modeling import from_loaded
from server.cli import main as softprompt
from tests.engine_helpers import untied_llama
from tests.eval_helpers import LABELS, ROWS, jsonl, publish_random
from trainer.batches import Encoder
from trainer.compare import (
    ReferenceError,
    data_identity,
    load_references,
    model_scorer,
    record_results,
    reference_specs,
    run_comparison,
)
from trainer.data import parse_examples
from trainer.evaluate import Task
from trainer.stats import compare_paired, mcnemar_exact, wilson_interval


@pytest.fixture(scope="module")
def untied(tokenizer):
    """A model whose label choice depends on the prompt (the tied tiny model always picks one label)."""
    return from_loaded(untied_llama(len(tokenizer)), tokenizer, base_model="tiny-untied")


def test_mcnemar_exact_matches_the_binomial_by_hand():
    # 1 example favours A and 9 favour B: p = 2 * P(X <= 1), X ~ Binomial(10, 1/2) = 2 * 11 / 1024.
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(9, 1) == pytest.approx(22 / 1024)
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(5, 5) == pytest.approx(1.0)
    assert mcnemar_exact(0, 0) == 1.0


def test_wilson_interval_by_hand():
    # 5 of 10: centre (p + z^2/2n) / (1 + z^2/n), half-width z * sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    z, n, p = 1.959963984540054, 10, 0.5
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(centre - half) and high == pytest.approx(centre + half)
    assert wilson_interval(0, 20)[0] == 0.0 and 0 < wilson_interval(0, 20)[1] < 0.2


def test_paired_counts():
    paired = compare_paired([True, True, False, False, True], [True, False, True, False, False])
    assert (paired.both, paired.only_a, paired.only_b, paired.neither) == (1, 2, 1, 1)
    assert paired.difference == pytest.approx(0.2)
    with pytest.raises(ValueError):
        compare_paired([True], [True, False])


def test_reference_specs_are_validated():
    assert [s.label for s in reference_specs(["math-v2"], ["Solve it."], bare=True)] == [
        "math-v2",
        "text: Solve it.",
        "(bare)",
    ]
    assert [s.label for s in reference_specs(["bare"], bare=True)] == ["bare", "(bare)"]  # a prompt may be named bare
    assert len(reference_specs(["a", "a"])) == 1
    for prompts, texts, bare in (
        ([], [], False),
        ([""], [], False),
        ([f"p{i}" for i in range(9)], [], False),
        ([], ["\ud800"], False),
    ):
        with pytest.raises(ReferenceError):
            reference_specs(prompts, texts, bare)


def test_two_versions_on_the_same_data_agree_with_their_table(untied, store):
    frozen = untied
    publish_random(store, frozen, "senti", seed=1)
    publish_random(store, frozen, "senti", seed=2)
    examples = parse_examples(jsonl(ROWS).decode().splitlines())
    references = load_references(frozen, store, reference_specs(["senti-v1", "senti-v2"], ["Classify it."], bare=True))
    task = Task("classification", LABELS)
    score = model_scorer(frozen, Encoder(frozen), task, max_new_tokens=4, batch_size=8)
    parts = []
    table = run_comparison(
        score,
        references,
        examples,
        task,
        data=data_identity(jsonl(ROWS), "senti.jsonl", len(ROWS)),
        max_new_tokens=4,
        chunk_size=16,
        on_progress=lambda p: parts.append((p.done, p.total)),
    )
    assert parts[-1] == (12, 12) and [d for d, _ in parts] == list(range(1, 13))  # 3 chunks x 4 references
    labels = [r["reference"] for r in table["results"]]
    assert labels == ["senti-v1", "senti-v2", "text: Classify it.", "(bare)"]
    rows = table["examples"]
    assert [r["output"] for r in rows] == [e.output for e in examples]
    for result in table["results"]:  # each score is the count of its per-example outcomes
        correct = sum(row["correct"][result["reference"]] for row in rows)
        assert result["correct"] == correct and result["score"] == pytest.approx(correct / len(ROWS))
        assert all(
            row["correct"][result["reference"]] == (row["predicted"][result["reference"]] == row["output"])
            for row in rows
        )
        low, high = result["ci95"]
        assert low <= result["score"] <= high
    assert len(table["comparisons"]) == 6
    assert any(pair["only_a"] + pair["only_b"] for pair in table["comparisons"]), (
        "the prompts never disagree: a vacuous check"
    )
    for pair in table["comparisons"]:  # and each pair's counts are its per-example agreement
        a = [row["correct"][pair["a"]] for row in rows]
        b = [row["correct"][pair["b"]] for row in rows]
        assert pair["only_a"] == sum(x and not y for x, y in zip(a, b))
        assert pair["only_b"] == sum(y and not x for x, y in zip(a, b))
        assert pair["both"] + pair["only_a"] + pair["only_b"] + pair["neither"] == len(ROWS)
        assert pair["p_value"] == pytest.approx(mcnemar_exact(pair["only_a"], pair["only_b"]))
    v1, v2 = (next(r for r in table["results"] if r["reference"] == ref) for ref in ("senti-v1", "senti-v2"))
    assert v1["checksum"] == store.resolve("senti-v1").checksum
    # Scoring a version alone gives the same outcomes as scoring it beside others.
    alone = run_comparison(score, references[:1], examples, task, data=table["data"], max_new_tokens=4)
    assert [r["correct"]["senti-v1"] for r in alone["examples"]] == [r["correct"]["senti-v1"] for r in rows]
    assert record_results(store, table, source="test") == ["senti-v1", "senti-v2"]
    kept = store.evaluations("senti-v2")
    assert kept[-1]["score"] == v2["score"] and kept[-1]["data"]["sha256"] == table["data"]["sha256"]
    assert kept[-1]["data"]["name"] == "senti.jsonl" and kept[-1]["at"] and kept[-1]["source"] == "test"


def test_evaluations_live_outside_the_immutable_version_and_go_with_it(frozen, store):
    version = publish_random(store, frozen, "keep", seed=3)
    files = sorted(p.name for p in version.path.iterdir()) if version.path is not None else None
    tensor = store.load(version).embeddings
    store.record_evaluation("keep", {"score": 0.5})
    store.record_evaluation("keep-v1", {"score": 0.75})
    assert [e["score"] for e in store.evaluations("keep")] == [0.5, 0.75]
    if files is not None:  # a folder store: nothing was added to the version's folder
        assert sorted(p.name for p in version.path.iterdir()) == files
    assert store.resolve("keep-v1").meta == version.meta and torch.equal(store.load("keep-v1").embeddings, tensor)
    store.delete("keep-v1")
    publish_random(store, frozen, "keep", seed=4)
    assert store.evaluations("keep-v2") == []


@pytest.fixture
def tiny_loader(monkeypatch, untied):
    monkeypatch.setattr(core.modeling, "load_frozen_model", lambda spec=None, **_: untied)


def test_softprompt_eval_prints_the_table_and_records_it(tmp_path, tiny_loader, untied, capsys):
    frozen = untied
    from prompt_store import open_store

    store = open_store(tmp_path / "store")
    publish_random(store, frozen, "senti", seed=1)
    publish_random(store, frozen, "senti", seed=2)
    (tmp_path / "test.jsonl").write_bytes(jsonl(ROWS))
    out_json = tmp_path / "table.json"
    code = softprompt(
        [
            "eval",
            "--data",
            str(tmp_path / "test.jsonl"),
            "--prompt",
            "senti-v1",
            "--prompt",
            "senti",
            "--bare",
            "--store",
            str(tmp_path / "store"),
            "--json",
            str(out_json),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    table = json.loads(out_json.read_text())
    assert [r["reference"] for r in table["results"]] == ["senti-v1", "senti", "(bare)"]
    assert table["results"][1]["version"] == "senti-v2" and table["task"] == "classification"
    for line in ("senti-v1", "(bare)", "McNemar", "95 % interval"):
        assert line in printed
    assert "recorded with senti-v1, senti-v2" in printed
    assert store.evaluations("senti-v1")[0]["data"]["sha256"] == table["data"]["sha256"]
    code = softprompt(["prompts", "--store", str(tmp_path / "store"), "show", "senti-v2"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["evaluations"][0]["score"] == table["results"][1]["score"]


def test_softprompt_eval_refuses_bad_data_with_its_line(tmp_path, tiny_loader, capsys):
    (tmp_path / "bad.jsonl").write_text('{"input": "a", "output": "b"}\n{"input": "no output"}\n')
    code = softprompt(["eval", "--data", str(tmp_path / "bad.jsonl"), "--bare", "--store", str(tmp_path / "store")])
    assert code == 2 and "line 2" in capsys.readouterr().err
    code = softprompt(["eval", "--data", str(tmp_path / "bad.jsonl"), "--store", str(tmp_path / "store")])
    assert code == 2 and "nothing to score" in capsys.readouterr().err


def test_labels_come_from_the_prompts_too(untied, store):
    """A test file holding one class must not make the other unpredictable (or score 100 %)."""
    from trainer.compare import TaskHint, choose_max_new_tokens, choose_task

    one_class = parse_examples(jsonl([r for r in ROWS if r["output"] == "positive"]).decode().splitlines())
    trained = TaskHint("classification", LABELS, 4)
    assert choose_task([trained], one_class).labels == LABELS
    with pytest.raises(ValueError, match="at least 2 labels"):
        choose_task([], one_class, "classification")
    assert choose_task([], one_class).kind == "generation"  # auto, one answer throughout: exact match
    assert choose_max_new_tokens([TaskHint(max_new_tokens=10**6)], None, limit=256) == 256
    assert choose_max_new_tokens([trained], None) == 4 and choose_max_new_tokens([], None) == 16
    version = store.publish(
        "tagged",
        torch.zeros(2, untied.fingerprint.hidden_size),
        fingerprint=untied.fingerprint,
        base_model="x",
        metrics={"task": "classification", "labels": list(LABELS)},
        training_config={"max_new_tokens": 6},
    )
    [reference] = load_references(untied, store, reference_specs(["tagged"]))
    assert reference.hint == TaskHint("classification", LABELS, 6) == TaskHint.from_meta(version.meta)
