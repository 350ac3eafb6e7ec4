"""Smoke run of the trainer on the embedded SmolLM2 (a few steps, well under a minute)."""

from __future__ import annotations

import pytest
import torch

from trainer.config import TrainConfig
from trainer.data import load_examples
from trainer.loop import train_prompt
from trainer.publish import publish_result

pytestmark = pytest.mark.real_model

DATA = "examples/data/sentiment.train.jsonl"


def test_real_model_training_smoke_run_publishes_a_loadable_version(real_model, store):
    examples = load_examples(DATA)
    train, val = examples[:16], examples[16:24]
    weights = real_model.embedding.weight.detach().clone()
    config = TrainConfig(
        init_text="Classify the sentiment of this review as positive or negative.",
        steps=3, lr=1e-2, batch_size=4, warmup_steps=1, eval_every=3, eval_batch_size=8,
    )
    result = train_prompt(real_model, train, val, config)
    version = publish_result(store, "sentiment", real_model, result)
    loaded = store.load("sentiment-v1", expect=real_model.fingerprint)
    assert version.id.version == 1 and loaded.embeddings.shape == (result.embeddings.shape[0], 576)
    assert torch.equal(loaded.embeddings, result.embeddings)
    assert result.metrics["cosine_min"] >= 0.95 - 1e-6
    assert all(h["loss"] > 0 for h in result.history if h["split"] == "train")
    assert torch.equal(real_model.embedding.weight, weights)
    assert loaded.version.meta["metrics"]["val_before"] is not None
