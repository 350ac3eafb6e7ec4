"""`python -m trainer` / `softprompt train` end to end on the tiny model, and publishing."""

from __future__ import annotations

import json

import pytest

import core.modeling
from prompt_store import open_store
from trainer.__main__ import main
from trainer.config import TrainConfig
from trainer.curves import write_curves
from trainer.data import Example
from trainer.loop import train_prompt
from trainer.publish import publish_result


def write_jsonl(path, n: int, *, extra: str = "") -> None:
    labels = ["positive", "negative"]
    rows = [
        json.dumps({"input": f"review {i} was {'great fun' if i % 2 == 0 else 'dull'}", "output": labels[i % 2]})
        for i in range(n)
    ]
    path.write_text("\n".join(rows) + "\n" + extra)


@pytest.fixture
def tiny_loader(monkeypatch, frozen):
    monkeypatch.setattr(core.modeling, "load_frozen_model", lambda spec=None, **_: frozen)


def test_cli_trains_evaluates_and_publishes_a_loadable_version(tmp_path, store_location, tiny_loader, frozen, capsys):
    write_jsonl(tmp_path / "train.jsonl", 12)
    write_jsonl(tmp_path / "test.jsonl", 4)
    code = main(
        [
            "--data",
            str(tmp_path / "train.jsonl"),
            "--init",
            "Classify the sentiment",
            "--name",
            "sentiment",
            "--eval",
            str(tmp_path / "test.jsonl"),
            "--steps",
            "3",
            "--eval-every",
            "2",
            "--batch-size",
            "4",
            "--store",
            store_location,
            "--runs-dir",
            str(tmp_path / "runs"),
            "--no-progress",
        ]
    )
    assert code == 0
    assert "published sentiment-v1" in capsys.readouterr().out
    store = open_store(store_location)
    loaded = store.load("sentiment-v1", expect=frozen.fingerprint)
    meta = loaded.version.meta
    assert meta["training_config"]["steps"] == 3 and meta["init_text"] == "Classify the sentiment"
    for key in (
        "val_before",
        "val_after",
        "test_before",
        "test_after",
        "test_hard_prompt",
        "cosine_mean",
        "nearest_tokens",
        "cosines",
    ):
        assert key in meta["metrics"], key
    assert meta["num_virtual_tokens"] == loaded.embeddings.shape[0] == len(meta["metrics"]["cosines"])
    run_dir = next((tmp_path / "runs").iterdir())
    assert {p.name for p in run_dir.iterdir()} >= {"curve.csv", "curve.json", "curve.png", "metrics.json"}


def test_cli_reports_malformed_data_with_line_number(tmp_path, tiny_loader, capsys):
    write_jsonl(tmp_path / "train.jsonl", 3, extra='{"input": "x", "output": ""}\n')
    code = main(
        ["--data", str(tmp_path / "train.jsonl"), "--init", "hi", "--name", "x", "--store", str(tmp_path / "s")]
    )
    assert code == 2
    assert "line 4: field 'output' is empty" in capsys.readouterr().err


def test_cli_reports_bad_settings_by_flag_name(tmp_path, tiny_loader, capsys):
    write_jsonl(tmp_path / "train.jsonl", 4)
    code = main(["--data", str(tmp_path / "train.jsonl"), "--init", "hi", "--name", "x", "--lr", "-1"])
    assert code == 2 and "lr:" in capsys.readouterr().err


def test_publish_records_config_metrics_and_model(frozen, store):
    examples = [Example(f"review {i}", ["positive", "negative"][i % 2]) for i in range(8)]
    result = train_prompt(
        frozen, examples[:6], examples[6:], TrainConfig(init_text="Classify the sentiment", steps=2, eval_every=1)
    )
    version = publish_result(store, "sentiment", frozen, result, parent="sentiment-v0")
    meta = store.load("sentiment", expect=frozen.fingerprint).version.meta
    assert version.id.version == 1 and meta["parent"] == "sentiment-v0" and meta["base_model"] == "tiny-llama"
    assert meta["training_config"] == result.config.to_dict()
    assert meta["metrics"]["nearest_tokens"][0]["cosine"] == pytest.approx(1.0, abs=1e-3)


def test_curves_are_written_as_csv_json_and_png(tmp_path):
    history = [
        {"step": 0, "split": "validation", "val_metric": 0.5},
        {"step": 1, "split": "train", "loss": 2.0, "val_metric": 0.6},
    ]
    paths = write_curves(history, tmp_path / "run")
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert json.loads(paths["json"].read_text()) == history
    assert paths["csv"].read_text().splitlines()[0].startswith("step,split,loss")
