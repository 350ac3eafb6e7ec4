"""The input cache: a whole input seen before skips its prefill, and gives the tokens an uncached
engine gives (greedy and seeded, alone and mixed with new inputs in one prefill); its logits are
never changed by sampling; a new prompt version is a new input; the memory bound holds."""

from __future__ import annotations

import pytest
import torch

from core.modeling import from_loaded
from server.engine import runner
from server.engine.prefill import input_cache
from tests.engine_helpers import make_engine, submit_together, untied_llama
from tests.test_engine import TEXTS, _cases, _engine


@pytest.fixture(scope="module")
def mixing(tokenizer):
    return from_loaded(untied_llama(len(tokenizer)), tokenizer, base_model="tiny-untied")


@pytest.fixture(scope="module")
def softs():
    torch.manual_seed(7)
    return {("a", 1, "x"): torch.randn(3, 64), ("b", 1, "y"): torch.randn(9, 64), ("b", 2, "z"): torch.randn(5, 64)}


@pytest.fixture
def forwards(monkeypatch):
    """How many rows went through a prefill forward pass."""
    rows = []
    prefill = runner.prefill

    def counted(model, inputs, pad):
        rows.append(len(inputs))
        return prefill(model, inputs, pad)

    monkeypatch.setattr(runner, "prefill", counted)
    return rows


@pytest.mark.parametrize("params", [dict(max_new_tokens=12), dict(max_new_tokens=12, temperature=1.3, seed=5)])
def test_repeated_inputs_skip_the_prefill_and_give_the_uncached_tokens(mixing, tokenizer, softs, forwards, params):
    cached, plain = _engine(mixing, input_cache=input_cache(1 << 26)), _engine(mixing)
    cases = _cases(softs)
    # two new inputs beside two repeated ones
    mixed_cases = [cases[0], ("a question never asked", None, None), cases[3], (TEXTS[1] + " too", None, None)]
    try:
        reference = submit_together(plain, tokenizer, cases, **params)
        mixed_reference = submit_together(plain, tokenizer, mixed_cases, **params)
        forwards.clear()
        first = submit_together(cached, tokenizer, cases, **params)
        assert forwards == [4]
        again = submit_together(cached, tokenizer, cases, **params)
        assert forwards == [4]  # no row prefilled the second time
        mixed = submit_together(cached, tokenizer, mixed_cases, **params)
        assert forwards == [4, 2]  # one forward, for the two new rows only
        stats = cached.stats()["input_cache"]
    finally:
        cached.stop(), plain.stop()
    tokens = [[d.token_ids for d in run] for run in (reference, first, again)]
    assert tokens[0] == tokens[1] == tokens[2]
    assert [d.token_ids for d in mixed] == [d.token_ids for d in mixed_reference]
    assert stats["hits"] == len(cases) + 2 and stats["entries"] == len(cases) + 2


def test_sampling_never_changes_the_cached_logits(mixing, tokenizer, softs):
    engine = _engine(mixing, input_cache=input_cache(1 << 26))
    try:
        case = [_cases(softs)[1]]
        greedy = submit_together(engine, tokenizer, case, max_new_tokens=8)
        submit_together(engine, tokenizer, case, max_new_tokens=8, temperature=0.3, top_p=0.5, seed=1)
        submit_together(engine, tokenizer, case, max_new_tokens=8, temperature=2.0, logprobs=3, seed=2)
        again = submit_together(engine, tokenizer, case, max_new_tokens=8)
    finally:
        engine.stop()
    assert greedy[0].token_ids == again[0].token_ids


def test_a_new_prompt_version_is_a_new_input(mixing, tokenizer, softs, forwards):
    engine = _engine(mixing, input_cache=input_cache(1 << 26))
    try:
        soft = softs[("b", 1, "y")]
        submit_together(engine, tokenizer, [("same words", ("b", 1, "y"), soft)], max_new_tokens=2)
        submit_together(engine, tokenizer, [("same words", ("b", 2, "other checksum"), soft)], max_new_tokens=2)
        submit_together(engine, tokenizer, [("same words", ("b", 1, "y"), soft)], max_new_tokens=2)
    finally:
        engine.stop()
    assert forwards == [1, 1]


def test_the_input_cache_stays_within_its_bytes(mixing, tokenizer):
    cache = input_cache(200_000)
    engine = make_engine("torch", mixing, input_cache=cache)
    engine.start()
    try:
        inputs = [(f"input number {i} " * 3, None, None) for i in range(12)]
        submit_together(engine, tokenizer, inputs, max_new_tokens=2)
    finally:
        engine.stop()
    stats = cache.stats()
    assert 0 < stats["bytes"] <= 200_000 and stats["entries"] < 12


def test_an_input_larger_than_the_whole_cache_is_not_kept(mixing, tokenizer):
    cache = input_cache(10_000)  # smaller than any input's key/values
    engine = make_engine("torch", mixing, input_cache=cache)
    engine.start()
    try:
        [done] = submit_together(engine, tokenizer, [("a long input " * 20, None, None)], max_new_tokens=2)
    finally:
        engine.stop()
    assert done.completion_tokens == 2 and cache.stats()["entries"] == 0 and cache.stats()["bytes"] == 0
