"""The EmbedGrad loop on a tiny random Llama: learning, freezing, trust region, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from core.modeling import from_loaded
from tests.tiny import tiny_llama
from trainer.batches import Encoder, collate, prefix_block, target_loss
from trainer.config import TrainConfig
from trainer.data import Example
from trainer.evaluate import Task, answers_match, detect_task, evaluate, is_degenerate, score_labels
from trainer.loop import TrainingCancelled, init_embeddings, lr_factor, train_prompt
from trainer.trust_region import project_to_cone, row_cosines

INIT = "Classify the sentiment"
WORDS = {"positive": "great fun wonderful", "negative": "dull boring bad"}


def sentiment_examples(n: int, offset: int = 0) -> list[Example]:
    labels = ["positive", "negative"]
    return [Example(f"the movie was {WORDS[labels[i % 2]]} {i}", labels[i % 2]) for i in range(offset, offset + n)]


def mean_loss(frozen, soft, examples) -> float:
    encoder = Encoder(frozen)
    batch = collate([encoder.encode(e) for e in examples], frozen.tokenizer.pad_token_id)
    with torch.no_grad():
        total, tokens = target_loss(frozen, prefix_block(frozen, encoder.head_ids, soft), batch)
    return float(total) / tokens


def weights_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def learnable(tokenizer):
    """A tiny Llama whose attention and MLP outputs are large enough for a prompt to steer
    it (the shared `frozen` fixture's standard init lets a prompt move the loss by <1%)."""
    model = tiny_llama(len(tokenizer))
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
                module.weight.normal_(0, 0.2)
        model.get_input_embeddings().weight.normal_(0, 0.3)
    return from_loaded(model, tokenizer, base_model="tiny-llama-learnable")


def test_training_lowers_the_loss_and_keeps_the_model_frozen(learnable):
    train = sentiment_examples(16)
    before_weights = weights_snapshot(learnable.model)
    config = TrainConfig(init_text=INIT, steps=25, lr=0.05, warmup_steps=2, eval_every=5, batch_size=8)
    result = train_prompt(learnable, train, train[:8], config)
    init_loss, final_loss = (
        mean_loss(learnable, result.init_embeddings, train),
        mean_loss(learnable, result.embeddings, train),
    )
    assert final_loss < 0.5 * init_loss, (init_loss, final_loss)
    train_losses = [row["loss"] for row in result.history if row["split"] == "train"]
    assert sum(train_losses[-5:]) < 0.5 * sum(train_losses[:5])
    after = weights_snapshot(learnable.model)
    assert all(torch.equal(before_weights[k], after[k]) for k in before_weights), "model weights changed"
    assert not any(p.requires_grad for p in learnable.model.parameters())
    assert result.embeddings.shape == result.init_embeddings.shape and result.embeddings.dtype == torch.float32
    assert min(result.cosines) >= 0.95 - 1e-6


def test_trust_region_holds_the_cosine_bound(learnable):
    config = TrainConfig(init_text=INIT, steps=15, lr=0.5, min_cosine=0.95, warmup_steps=1, eval_every=5)
    result = train_prompt(learnable, sentiment_examples(16), sentiment_examples(4, 16), config)
    assert any(row["projected_rows"] > 0 for row in result.history if row["split"] == "train"), "bound never active"
    assert min(result.cosines) >= 0.95 - 1e-6
    assert result.metrics["cosine_mean"] >= 0.95 - 1e-6 and len(result.cosines) == result.embeddings.shape[0]


def test_projection_moves_only_outside_rows_onto_the_cone_and_keeps_norms():
    torch.manual_seed(0)
    initial = torch.randn(6, 32)
    vectors = initial + torch.randn(6, 32) * torch.tensor([0.01, 0.01, 2, 2, 5, 5]).unsqueeze(-1)
    untouched = vectors[:2].clone()
    norms = vectors.norm(dim=-1)
    moved = project_to_cone(vectors, initial, 0.9, projection="keep_norm")
    cos = row_cosines(vectors, initial)
    assert moved == 4 and torch.equal(vectors[:2], untouched)
    assert torch.all(cos >= 0.9 - 1e-6) and torch.allclose(cos[2:], torch.full((4,), 0.9), atol=1e-4)
    torch.testing.assert_close(vectors.norm(dim=-1), norms)


def test_nearest_projection_is_the_closest_point_of_the_cone():
    torch.manual_seed(0)
    initial = torch.randn(6, 32, dtype=torch.float64)
    original = initial + torch.randn(6, 32, dtype=torch.float64) * torch.tensor([0.01, 0.01, 2, 2, 5, 5]).unsqueeze(-1)
    vectors = original.clone()
    moved = project_to_cone(vectors, initial, 0.9, projection="nearest")
    cos = row_cosines(vectors, initial)
    assert moved == 4 and torch.equal(vectors[:2], original[:2])
    assert torch.allclose(cos[2:], torch.full((4,), 0.9, dtype=torch.float64), atol=1e-4)
    # The residual of a projection onto a cone is orthogonal to the projected point ...
    residual = original - vectors
    assert torch.allclose((residual * vectors).sum(-1), torch.zeros(6, dtype=torch.float64), atol=1e-6)
    # ... no point of the cone is closer (random points inside it, each scaled to its best length) ...
    u0 = initial / initial.norm(dim=-1, keepdim=True)
    for _ in range(200):
        candidate = u0 + 0.4 * torch.randn(6, 32, dtype=torch.float64) / 32**0.5
        inside = row_cosines(candidate, initial) >= 0.9
        best = (original * candidate).sum(-1, keepdim=True).clamp_min(0) / candidate.norm(dim=-1, keepdim=True) ** 2
        distance = (original - best * candidate).norm(dim=-1)
        assert torch.all(distance[inside] >= (original - vectors).norm(dim=-1)[inside] - 1e-9)
    # ... and the norm shrinks (the sideways part of the step is dropped), unlike "keep_norm".
    assert torch.all(vectors[2:].norm(dim=-1) < original[2:].norm(dim=-1))


def test_nearest_projection_of_a_vector_opposite_its_start_keeps_a_direction():
    initial = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    vectors = -initial.clone()
    assert project_to_cone(vectors, initial, 0.95, projection="nearest") == 2
    assert torch.all(vectors.norm(dim=-1) > 0) and torch.all(row_cosines(vectors, initial) >= 0.95 - 1e-6)
    with pytest.raises(ValueError, match="projection must be one of"):
        project_to_cone(vectors, initial, 0.95, projection="sideways")


def test_training_is_reproducible_with_a_seed(frozen):
    config = TrainConfig(init_text=INIT, steps=4, lr=0.05, warmup_steps=1, eval_every=2, seed=3)
    first = train_prompt(frozen, sentiment_examples(12), sentiment_examples(4, 12), config)
    second = train_prompt(frozen, sentiment_examples(12), sentiment_examples(4, 12), config)
    assert torch.equal(first.embeddings, second.embeddings)
    assert [h.get("loss") for h in first.history] == [h.get("loss") for h in second.history]


def test_callback_reports_every_step_and_should_stop_cancels(frozen):
    seen = []
    config = TrainConfig(init_text=INIT, steps=4, eval_every=2, grad_accum=2, batch_size=4)
    train_prompt(frozen, sentiment_examples(12), sentiment_examples(4, 12), config, callback=seen.append)
    assert [p.step for p in seen] == [1, 2, 3, 4] and all(p.total == 4 for p in seen)
    assert [p.val_metric is not None for p in seen] == [False, True, False, True]
    assert seen[-1].eta_seconds == 0 and all(math.isfinite(p.loss) for p in seen)
    calls = iter([False, False, True])
    with pytest.raises(TrainingCancelled, match="after 2 of 4"):
        train_prompt(frozen, sentiment_examples(12), sentiment_examples(4, 12), config, should_stop=lambda: next(calls))


def test_patience_stops_early(frozen):
    config = TrainConfig(init_text=INIT, steps=50, lr=1e-6, eval_every=1, patience=2)
    result = train_prompt(frozen, sentiment_examples(8), sentiment_examples(4, 8), config)
    assert result.metrics["stopped_early"] and result.metrics["steps_run"] < 50


def test_label_scoring_with_a_repeated_cache_matches_full_forward_passes(frozen):
    """Scoring reuses the query's KV cache for every label; it must equal scoring each
    (query, label) pair from scratch (guards against cache API changes)."""
    encoder = Encoder(frozen)
    soft = init_embeddings(frozen, INIT)
    prefix = prefix_block(frozen, encoder.head_ids, soft)
    labels = ["great fun", "No", "the plot was dull"]  # different token lengths
    queries = [encoder.encode(e) for e in sentiment_examples(3)]
    fast = score_labels(frozen, prefix, queries, [encoder.layout.target_ids(label) for label in labels])
    for j, label in enumerate(labels):
        for i, example in enumerate(sentiment_examples(3)):
            batch = collate([encoder.encode(Example(example.input, label))], frozen.tokenizer.pad_token_id)
            with torch.no_grad():
                total, _ = target_loss(frozen, prefix, batch)
            assert float(fast[i, j]) == pytest.approx(-float(total), rel=1e-4, abs=1e-3)


def test_generation_task_reports_exact_match_and_loops(frozen):
    encoder = Encoder(frozen)
    examples = [Example("What is two plus three?", "5"), Example("Yes or No?", "Yes")]
    result = evaluate(
        frozen,
        encoder,
        init_embeddings(frozen, INIT),
        examples,
        Task("generation"),
        max_new_tokens=8,
        keep_predictions=2,
    )
    assert result["name"] == "exact_match" and 0 <= result["metric"] <= 1
    assert 0 <= result["degenerate_fraction"] <= 1 and len(result["samples"]) == 2


def test_task_detection():
    assert detect_task(sentiment_examples(6)) == Task("classification", ("negative", "positive"))
    assert detect_task([Example(str(i), str(i)) for i in range(6)]).kind == "generation"
    assert detect_task(sentiment_examples(6), "generation").kind == "generation"


def test_answer_normalization_and_repetition_guard():
    assert answers_match(" 42.\nbecause", "42") and answers_match("The answer is 1,200", "1200")
    assert answers_match("Positive!", "positive") and not answers_match("7", "70")
    assert is_degenerate([5, 6, 7, 8, 9, 1, 2, 1, 2, 1, 2]) and is_degenerate([3] * 10)
    assert not is_degenerate(list(range(12))) and not is_degenerate([1, 1, 1])


def test_learning_rate_warms_up_then_decays():
    config = TrainConfig(init_text=INIT, steps=20, warmup_steps=4, min_lr_ratio=0.1)
    factors = [lr_factor(s, config) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:])) and factors[-1] > 0.1


def test_long_inputs_keep_their_end(frozen):
    encoder = Encoder(frozen, max_input_tokens=6)
    long_text = "the movie was great fun " * 10 + "Yes or No?"
    query = frozen.tokenizer.decode(encoder.query_ids(long_text))
    assert query.startswith(
        frozen.tokenizer.decode(frozen.tokenizer(long_text, add_special_tokens=False).input_ids[-6:])
    )
    assert query.endswith("<|im_start|>assistant\n") and "Yes or No?" in query
