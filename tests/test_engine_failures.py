"""A failure at any stage fails exactly the requests it concerns, each gets exactly one final
event, and the engine keeps serving (issue 12). On both backends (torch and llama.cpp)."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from core.modeling import from_loaded
from server.engine import DoneEvent, Engine, FailedEvent, GenerationRequest, SamplingParams, TokenEvent, sampling
from server.engine.attention import use_gqa_sdpa
from server.engine.errors import EngineNotReadyError, ShuttingDownError
from tests.engine_helpers import BACKENDS, make_engine, make_job, untied_llama


class Recorder:
    """A sink that keeps every event, to count final events."""

    def __init__(self):
        self.events: queue.Queue = queue.Queue()

    def __call__(self, event) -> None:
        self.events.put(event)

    def final(self, timeout: float = 30.0):
        """Wait for the final event, then check that nothing follows it."""
        while True:
            event = self.events.get(timeout=timeout)
            if not isinstance(event, TokenEvent):
                break
        time.sleep(0.05)
        assert self.events.empty(), "an event arrived after the final one"
        return event


def _new_engine(backend: str, tokenizer, gguf: str, **kwargs) -> Engine:
    return make_engine(
        backend, from_loaded(untied_llama(len(tokenizer)), tokenizer, base_model="tiny-untied"), gguf, **kwargs
    )


@pytest.fixture(params=BACKENDS)
def engine(request, tokenizer, untied_gguf_path):
    engine = _new_engine(request.param, tokenizer, untied_gguf_path, max_batch_size=8)
    engine.start()
    yield engine
    engine.stop()


def _job(tokenizer, text: str, **params) -> tuple[GenerationRequest, Recorder]:
    job, _ = make_job(tokenizer, text, **params)
    recorder = Recorder()
    job.sink = recorder
    return job, recorder


def _submit_together(engine: Engine, jobs: list[GenerationRequest]) -> None:
    engine.pause()
    for job in jobs:
        engine.submit(job)
    engine.resume()


def _serves_afterwards(engine: Engine, tokenizer) -> None:
    job, recorder = _job(tokenizer, "still there?", max_new_tokens=4)
    engine.submit(job)
    assert isinstance(recorder.final(), DoneEvent)


def test_a_request_that_cannot_start_fails_alone(engine, tokenizer):
    """Admission: a seed torch refuses fails that request; the rest of the batch is served."""
    bad, bad_rec = _job(tokenizer, "bad seed", temperature=1.0, seed=2**70)
    good = [_job(tokenizer, f"good {i}", max_new_tokens=6) for i in range(3)]
    _submit_together(engine, [bad] + [j for j, _ in good])
    assert isinstance(bad_rec.final(), FailedEvent)
    assert all(isinstance(rec.final(), DoneEvent) for _, rec in good)
    _serves_afterwards(engine, tokenizer)


@pytest.mark.parametrize("packed", [False, True], ids=["own-pass", "packed-into-the-step"])
def test_a_failed_prefill_fails_only_the_rows_it_was_prefilling(engine, tokenizer, monkeypatch, packed):
    """A newcomer's prefill fails in a pass of its own, or while it is prepared for a pass packed
    into the running rows' step (server/engine/packed.py); either way the running row goes on."""
    if packed:
        use_gqa_sdpa(engine.model)  # the engine's attention: torch packs newcomers too (llama.cpp always does)
    engine.pack_prefills = packed
    running, running_rec = _job(tokenizer, "already running", max_new_tokens=40, ignore_eos=True)
    engine.submit(running)
    while engine.stats()["running"] == 0:
        time.sleep(0.01)
    target, name = (engine.backend, "prepare_beside") if packed else (engine, "_prefill")
    real = getattr(target, name)

    def prefill(jobs):
        if any(j.tail_ids == poisoned.tail_ids for j in (jobs if isinstance(jobs, list) else [jobs])):
            raise RuntimeError("injected prefill failure")
        return real(jobs)

    monkeypatch.setattr(target, name, prefill)
    poisoned, poisoned_rec = _job(tokenizer, "poisoned prefill")
    engine.submit(poisoned)
    failed = poisoned_rec.final()
    assert isinstance(failed, FailedEvent) and "injected prefill failure" in str(failed.error)
    done = running_rec.final()
    assert isinstance(done, DoneEvent) and done.completion_tokens == 40
    _serves_afterwards(engine, tokenizer)


def test_a_failed_decode_step_fails_the_batch_once_and_the_engine_goes_on(engine, tokenizer, monkeypatch):
    calls = {"decode": 0}
    if engine.backend.name == "torch":  # the model's forward fails, as a real kernel would
        owner, name = engine.model, "forward"

        def failing(real):
            def forward(*args, **kwargs):
                if kwargs.get("input_ids") is not None:  # decode steps pass ids, prefills pass embeddings
                    calls["decode"] += 1
                    if calls["decode"] == 3:
                        raise RuntimeError("injected decode failure")
                return real(*args, **kwargs)

            return forward
    else:  # llama.cpp's decode call fails
        owner, name = engine.backend.ctx, "step"

        def failing(real):
            def step(*args):
                calls["decode"] += 1
                if calls["decode"] == 3:
                    raise RuntimeError("injected decode failure")
                return real(*args)

            return step

    monkeypatch.setattr(owner, name, failing(getattr(owner, name)))
    jobs = [_job(tokenizer, f"row {i}", max_new_tokens=10, ignore_eos=True) for i in range(4)]
    _submit_together(engine, [j for j, _ in jobs])
    finals = [rec.final() for _, rec in jobs]
    assert all(isinstance(f, FailedEvent) and "injected decode failure" in str(f.error) for f in finals)
    _serves_afterwards(engine, tokenizer)


def test_a_failed_sampling_fails_only_that_row(engine, tokenizer, monkeypatch):
    real_sample_row = sampling.sample_row

    def sample_row(logits, params, generator):
        if params.seed == 666:
            raise RuntimeError("injected sampling failure")
        return real_sample_row(logits, params, generator)

    monkeypatch.setattr(sampling, "sample_row", sample_row)
    bad, bad_rec = _job(tokenizer, "unlucky", temperature=0.7, seed=666)
    good = [_job(tokenizer, f"lucky {i}", temperature=0.7, seed=i, max_new_tokens=6) for i in range(2)]
    greedy, greedy_rec = _job(tokenizer, "greedy", max_new_tokens=6)
    _submit_together(engine, [bad, greedy] + [j for j, _ in good])
    failed = bad_rec.final()
    assert isinstance(failed, FailedEvent) and "injected sampling failure" in str(failed.error)
    assert all(isinstance(rec.final(), DoneEvent) for _, rec in good + [(greedy, greedy_rec)])
    _serves_afterwards(engine, tokenizer)


def test_a_failing_sink_does_not_hurt_the_engine(engine, tokenizer):
    def broken(event):
        raise RuntimeError("client's sink is broken")

    bad, _ = make_job(tokenizer, "broken sink")
    bad.sink = broken
    good, good_rec = _job(tokenizer, "fine", max_new_tokens=5)
    _submit_together(engine, [bad, good])
    assert isinstance(good_rec.final(), DoneEvent)
    _serves_afterwards(engine, tokenizer)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_fails_every_queued_and_running_request_once(backend, tokenizer, untied_gguf_path):
    engine = _new_engine(backend, tokenizer, untied_gguf_path, max_batch_size=2)
    engine.start()
    jobs = [_job(tokenizer, f"long {i}", max_new_tokens=200, ignore_eos=True) for i in range(5)]
    for job, _ in jobs:
        engine.submit(job)
    while engine.stats()["running"] < 2:
        time.sleep(0.01)
    started = time.perf_counter()
    engine.stop()
    assert time.perf_counter() - started < 5
    finals = [rec.final() for _, rec in jobs]
    assert all(isinstance(f, FailedEvent) and isinstance(f.error, ShuttingDownError) for f in finals)
    with pytest.raises(EngineNotReadyError):
        engine.submit(_job(tokenizer, "too late")[0])


def test_a_job_cancelled_while_waiting_still_gets_its_final_event(engine, tokenizer):
    job, recorder = _job(tokenizer, "never mind")
    engine.pause()
    engine.submit(job)
    job.cancelled = True
    engine.resume()
    final = recorder.final()
    assert isinstance(final, DoneEvent) and final.finish_reason == "cancelled"


@pytest.mark.parametrize("temperature, top_p", [(1e-38, 1.0), (1.0, 1e-46), (1e-30, 1e-30), (5.0, 1.0)])
def test_the_sampler_never_produces_nan(temperature, top_p):
    torch.manual_seed(0)
    logits = torch.randn(5, 100) * 30
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=1)
    tokens = sampling.choose_tokens(logits, [params] * 5, [params.generator() for _ in range(5)])
    assert all(isinstance(t, int) for t in tokens)
    if temperature < 1e-6 or top_p < 1e-6:  # effectively greedy
        assert tokens == logits.argmax(dim=-1).tolist()


def test_nan_logits_fail_the_sampled_row_only():
    logits = torch.randn(2, 10)
    logits[0] = float("nan")
    params = SamplingParams(temperature=1.0, seed=0)
    tokens = sampling.choose_tokens(logits, [params, params], [params.generator(), params.generator()])
    assert isinstance(tokens[0], Exception) and isinstance(tokens[1], int)


def test_requests_that_may_not_start_yet_do_not_make_the_loop_spin(engine, tokenizer, monkeypatch):
    """Waiting requests none of which may start now (their tenants hold their shares) with nothing
    running: the loop waits for news instead of asking the scheduler thousands of times a second
    (a spinning loop holds the GIL the HTTP side needs to deliver the next request)."""
    calls = []
    admit = engine.scheduler.admit

    def refusing(*args, **kwargs):
        calls.append(time.perf_counter())
        return [] if len(calls) < 1000 else admit(*args, **kwargs)

    monkeypatch.setattr(engine.scheduler, "admit", refusing)
    job, sink = make_job(tokenizer, "held back", max_new_tokens=2)
    engine.submit(job)
    time.sleep(0.5)
    assert len(calls) < 40  # one look every 50 ms
    monkeypatch.setattr(engine.scheduler, "admit", admit)
    engine.submit(make_job(tokenizer, "wake up", max_new_tokens=2)[0])
    sink.result(30)
