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
        steps=3,
        lr=1e-2,
        batch_size=4,
        warmup_steps=1,
        eval_every=3,
        eval_batch_size=8,
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


def test_real_model_arithmetic_loss_falls_in_a_few_steps(real_model):
    """Generation task, loss on the answer tokens only: the text prompt's model wants to write a
    sentence, so the first steps' loss on "62<end of turn>" is high, and it falls as the prompt learns the format."""
    examples = load_examples("examples/data/arithmetic.train.jsonl")
    train, val = examples[:96], examples[96:104]
    config = TrainConfig(
        init_text="Solve the problem. Answer with the number only.",
        task="generation",
        max_new_tokens=8,
        steps=12,
        lr=3e-2,
        batch_size=8,
        warmup_steps=1,
        eval_every=12,
        eval_batch_size=8,
    )
    result = train_prompt(real_model, train, val, config)
    losses = [h["loss"] for h in result.history if h["split"] == "train"]
    first, last = sum(losses[:2]) / 2, sum(losses[-3:]) / 3
    assert result.metrics["task"] == "generation" and result.metrics["metric_name"] == "exact_match"
    assert last < 0.75 * first, losses
    assert result.metrics["cosine_min"] >= 0.95 - 1e-6
