"""New rows prefilled inside the running rows' decode step (server/engine/packed.py): the same
numbers as a prefill pass of their own, the same tokens as each request alone, and failures
that stay where they belong."""

from __future__ import annotations

import time

import pytest
import torch

from core.modeling import from_loaded
from server.engine import Engine, runner
from server.engine.attention import packs_prefills
from server.engine.prefill import input_cache
from server.engine.rewrites import prepare_for_serving
from server.engine.torch_backend import TorchBackend
from tests.engine_helpers import make_engine, make_job, untied_gguf, untied_llama
from tests.families import FAMILIES, SLIDING, tiny_family_model

TEXTS = ["What is two plus three?", "The movie was great fun", "Classify", "a bad movie", "hello there friend"]


def served_frozen(tokenizer, model=None):
    frozen = from_loaded(model or untied_llama(len(tokenizer)), tokenizer, base_model="tiny-untied")
    prepare_for_serving(frozen.model, max_batch_size=8)
    return frozen


def cases(width: int) -> list[tuple]:
    """(text, soft, key, max_new_tokens): soft prompts of several lengths (one longer than every
    running row, so the batch widens when it joins), the bare model, and a repeated input."""
    torch.manual_seed(7)
    softs = [torch.randn(3, width), torch.randn(9, width), None, torch.randn(24, width), None]
    made = [(TEXTS[i], soft, None if soft is None else ("p", i, "c"), 14) for i, soft in enumerate(softs)]
    return made + [made[2]]  # the same input again: an input-cache hit when that cache is on


def outcome(sink):
    """A job's DoneEvent, or the error it failed with."""
    try:
        return sink.result(30)[0]
    except Exception as exc:  # the FailedEvent's error
        return exc


def wait_waiting(engine: Engine, count: int) -> None:
    """The paused loop moves submitted requests to the waiting list; wait until `count` are there."""
    deadline = time.monotonic() + 10
    while len(engine.scheduler.waiting) < count:
        assert time.monotonic() < deadline, "requests never reached the waiting list"
        time.sleep(0.005)


def staggered(
    frozen, jobs: list[tuple], *, pack: bool = True, backend: str = "torch", gguf: str | None = None, **engine_kwargs
) -> tuple[list[list[int]], Engine]:
    """Tokens of `jobs` where the first two run alone for 3 steps, two more arrive while they
    decode, and the rest one step later: the loop's own steps, driven one at a time."""
    engine = make_engine(backend, frozen, gguf, max_batch_size=8, pack_prefills=pack, **engine_kwargs)
    engine.start()
    engine.pause()
    sinks = []

    def arrive(batch: list[tuple]) -> None:
        for text, soft, key, new_tokens in batch:
            job, sink = make_job(frozen.tokenizer, text, soft, key=key, max_new_tokens=new_tokens)
            engine.submit(job)
            sinks.append(sink)
        wait_waiting(engine, len(batch))

    try:
        with torch.inference_mode():
            arrive(jobs[:2])
            engine._admit()
            for _ in range(3):
                engine._decode_step()
            arrive(jobs[2:4])
            engine._admit()
            engine._decode_step()
            arrive(jobs[4:])
            engine._admit()
            while engine.batch.seqs:
                engine._decode_step()
        return [sink.result(10)[0].token_ids for sink in sinks], engine
    finally:
        engine.resume()
        engine.stop()


def alone(
    frozen, jobs: list[tuple], *, backend: str = "torch", gguf: str | None = None, **engine_kwargs
) -> list[list[int]]:
    engine = make_engine(backend, frozen, gguf, max_batch_size=8, **engine_kwargs)
    engine.start()
    try:
        out = []
        for text, soft, key, new_tokens in jobs:
            job, sink = make_job(frozen.tokenizer, text, soft, key=key, max_new_tokens=new_tokens)
            engine.submit(job)
            out.append(sink.result(30)[0].token_ids)
        return out
    finally:
        engine.stop()


@pytest.mark.parametrize(
    "options",
    [{}, {"use_prefix_cache": False}, {"input_cache": "on"}],
    ids=["prefix-cache", "no-prefix-cache", "input-cache"],
)
def test_rows_packed_into_a_decode_step_get_the_tokens_they_get_alone(tokenizer, options):
    frozen = served_frozen(tokenizer)
    jobs = cases(frozen.fingerprint.hidden_size)
    kwargs = dict(options)
    if kwargs.get("input_cache"):
        kwargs["input_cache"] = input_cache(1 << 24)
    packed, engine = staggered(frozen, jobs, **kwargs)
    assert engine.counters["packed_prefills"] == 2  # both later arrivals rode a decode step
    assert engine.stats()["backend"] == "torch"
    separate, plain_engine = staggered(frozen, jobs, pack=False, **kwargs)
    assert plain_engine.counters["packed_prefills"] == 0
    reference = alone(frozen, jobs, use_prefix_cache=options.get("use_prefix_cache", True))
    assert packed == separate == reference
    assert len({tuple(t) for t in packed}) > 2  # the inputs really lead to different outputs
    if options.get("input_cache"):
        assert kwargs["input_cache"].stats()["hits"] >= 1  # the repeated input joined from the cache


def test_newcomers_whose_whole_inputs_are_cached_join_without_a_pass(tokenizer):
    frozen = served_frozen(tokenizer)
    first = cases(frozen.fingerprint.hidden_size)[:2]
    cache = input_cache(1 << 24)
    got, engine = staggered(frozen, first + first + first[:1], input_cache=cache)
    assert engine.counters["packed_prefills"] == 0 and engine.counters["prefill_batches"] == 3
    assert cache.stats()["hits"] == 3
    assert got == alone(frozen, first + first + first[:1])


def test_a_packed_pass_computes_the_numbers_of_a_prefill_pass_and_a_decode_step(tokenizer):
    frozen = served_frozen(tokenizer)
    jobs = cases(frozen.fingerprint.hidden_size)
    first = [make_job(tokenizer, t, s, key=k)[0] for t, s, k, _ in jobs[:2]]
    later = [make_job(tokenizer, t, s, key=k)[0] for t, s, k, _ in jobs[2:5]]
    pad = tokenizer.pad_token_id
    reference, packed = TorchBackend(frozen, pad_id=pad), TorchBackend(frozen, pad_id=pad)
    assert packs_prefills(frozen.model)
    with torch.inference_mode():
        for backend in (reference, packed):
            state, logits = backend.prefill(first)
            backend.join(state, [])
            backend.decode(logits.argmax(-1).tolist())
        tokens = [5, 9]
        want_running = reference.decode(tokens)  # [2, V]
        state, want_new = reference.prefill(later)  # [3, V]
        assert packed.packs(later)
        got_new, got_running = packed.step_beside(later, [packed.prepare_beside(r) for r in later], tokens)
    torch.testing.assert_close(got_running, want_running, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_new, want_new, rtol=1e-4, atol=1e-4)
    assert packed.rows.rows == 5


def test_a_new_row_that_cannot_start_fails_alone_and_the_running_rows_go_on(tokenizer):
    frozen = served_frozen(tokenizer)
    jobs = cases(frozen.fingerprint.hidden_size)[:3]
    broken = (TEXTS[3], torch.randn(4, frozen.fingerprint.hidden_size + 1), ("broken", 1, "c"), 14)  # wrong width
    engine = Engine(frozen, max_batch_size=8)
    engine.start()
    engine.pause()
    try:
        sinks = []
        for text, soft, key, new_tokens in [*jobs[:2], broken, jobs[2]]:
            job, sink = make_job(tokenizer, text, soft, key=key, max_new_tokens=new_tokens)
            sinks.append(sink)
            engine.submit(job)
            if len(sinks) == 2:
                wait_waiting(engine, 2)
                with torch.inference_mode():
                    engine._admit()
                    engine._decode_step()
        wait_waiting(engine, 2)
        with torch.inference_mode():
            engine._admit()
            while engine.batch.seqs:
                engine._decode_step()
        results = [outcome(sink) for sink in sinks]
    finally:
        engine.resume()
        engine.stop()
    assert isinstance(results[2], Exception) and "Prefill failed" in str(results[2])
    assert [results[i].token_ids for i in (0, 1, 3)] == alone(frozen, jobs)
    assert engine.counters["requests_failed"] == 1


def test_a_failed_packed_pass_fails_its_rows_and_the_engine_serves_on(tokenizer, monkeypatch):
    frozen = served_frozen(tokenizer)
    jobs = cases(frozen.fingerprint.hidden_size)[:4]
    real = runner.packed_step
    calls = []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "packed_step", fails_once)
    engine = Engine(frozen, max_batch_size=8)
    engine.start()
    try:
        first = [make_job(tokenizer, t, s, key=k, max_new_tokens=40) for t, s, k, _ in jobs[:2]]
        for job, _ in first:
            engine.submit(job)
        deadline = time.monotonic() + 10
        while not engine.batch.seqs:  # running: the next arrival is packed into their step
            assert time.monotonic() < deadline
            time.sleep(0.001)
        engine.pause()  # both arrivals reach the same step
        second = [make_job(tokenizer, t, s, key=k, max_new_tokens=14) for t, s, k, _ in jobs[2:]]
        for job, _ in second:
            engine.submit(job)
        wait_waiting(engine, 2)
        engine.resume()
        outcomes = [outcome(sink) for _, sink in first + second]
        after = make_job(tokenizer, TEXTS[0], None, max_new_tokens=5)
        engine.submit(after[0])
        done, _ = after[1].result(30)
    finally:
        engine.stop()
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert calls and len(failed) == 4, outcomes  # the pass's rows (running and new) were told
    assert all("failed" in str(error) for error in failed)
    assert len(done.token_ids) == 5  # and the engine serves the next request


@pytest.fixture(scope="module", params=FAMILIES)
def family_frozen(request, tokenizer):
    return request.param, served_frozen(tokenizer, tiny_family_model(request.param, len(tokenizer)))


def test_every_family_serves_rows_that_arrive_mid_decode_as_it_serves_them_alone(family_frozen):
    """Full-attention families pack new rows into the step; sliding and soft-capped ones prefill
    them in a pass of their own. Either way each request gets its tokens alone."""
    name, frozen = family_frozen
    jobs = cases(frozen.fingerprint.hidden_size)[:5]
    got, engine = staggered(frozen, jobs)
    assert got == alone(frozen, jobs), name
    assert (engine.counters["packed_prefills"] > 0) == (name not in SLIDING), name


@pytest.mark.parametrize("use_prefix_cache", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_the_llamacpp_engine_packs_new_rows_into_its_decode_step_too(tokenizer, tmp_path, use_prefix_cache):
    """llama.cpp decodes a batch of runs of any lengths: the running rows' tokens and the new rows'
    tails go in one llama_decode."""
    frozen = from_loaded(untied_llama(len(tokenizer)), tokenizer, base_model="tiny-untied")
    gguf = untied_gguf(tokenizer, tmp_path)
    jobs = cases(frozen.fingerprint.hidden_size)[:5]
    options = dict(backend="llamacpp", gguf=gguf, use_prefix_cache=use_prefix_cache)
    packed, engine = staggered(frozen, jobs, **options)
    assert engine.counters["packed_prefills"] == 2
    separate, _ = staggered(frozen, jobs, pack=False, **options)
    assert packed == separate == alone(frozen, jobs, **options)
    assert len({tuple(t) for t in packed}) > 2
