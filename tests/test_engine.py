"""The continuous-batching engine on a tiny random model: batching never changes a row's tokens.

Every behaviour runs on both backends (torch, and llama.cpp on the same weights as a GGUF)."""

from __future__ import annotations

import threading

import pytest
import torch

from core.modeling import from_loaded
from server.engine import Engine, PrefixCache, QueueFullError
from server.engine.rewrites import prepare_for_serving
from tests.engine_helpers import BACKENDS, make_engine, make_job, submit_together, untied_llama, wait_all

TEXTS = ["What is two plus three?", "The movie was great fun", "Classify", "the plot was dull and boring, a bad movie"]


@pytest.fixture(scope="module")
def mixing(tokenizer):
    """A tiny model whose greedy tokens depend on the whole context (soft prompt included)."""
    return from_loaded(untied_llama(len(tokenizer)), tokenizer, base_model="tiny-untied")


@pytest.fixture(params=BACKENDS)
def backend(request, untied_gguf_path):
    """Which backend computes the rows, and the GGUF llama.cpp runs (`mixing`'s weights)."""
    return request.param, untied_gguf_path


@pytest.fixture(scope="module")
def softs():
    torch.manual_seed(7)
    return {("a", 1, "x"): torch.randn(3, 64), ("b", 1, "y"): torch.randn(9, 64), ("b", 2, "z"): torch.randn(5, 64)}


def _engine(frozen, backend=("torch", None), **kwargs) -> Engine:
    """An engine on `frozen` rewritten as the server serves it (idempotent on the shared model),
    its rows computed by `backend` (name, GGUF path)."""
    prepare_for_serving(frozen.model, max_batch_size=kwargs.get("max_batch_size", 16))
    engine = make_engine(backend[0], frozen, backend[1], **kwargs)
    engine.start()
    return engine


def _cases(softs):
    keys = [("a", 1, "x"), ("b", 1, "y"), None, ("b", 2, "z")]
    return [(text, key, softs[key] if key else None) for text, key in zip(TEXTS, keys)]


def _solo(engine, tokenizer, cases, **params):
    out = []
    for text, key, soft in cases:
        job, sink = make_job(tokenizer, text, soft, key=key, **params)
        engine.submit(job)
        out.append(sink.result()[0])
    return out


def test_mixed_prompt_batch_gives_each_request_its_solo_tokens(backend, mixing, tokenizer, softs):
    engine = _engine(mixing, backend, max_batch_size=8)
    try:
        cases = _cases(softs)
        together = submit_together(engine, tokenizer, cases, max_new_tokens=12)
        alone = _solo(engine, tokenizer, cases, max_new_tokens=12)
    finally:
        engine.stop()
    assert engine.counters["max_batch_size_seen"] == len(cases)
    assert all(done.batch_sizes[0] == len(cases) for done in together)
    assert [d.token_ids for d in together] == [d.token_ids for d in alone]
    assert len({tuple(d.token_ids) for d in together}) == len(cases)  # the prompts really differ


def test_cached_prefix_gives_the_same_tokens_as_uncached(backend, mixing, tokenizer, softs):
    cached, uncached = _engine(mixing, backend), _engine(mixing, backend, use_prefix_cache=False)
    try:
        cases = _cases(softs)
        first = _solo(cached, tokenizer, cases, max_new_tokens=10)  # computes the prefixes
        reused = _solo(cached, tokenizer, cases, max_new_tokens=10)  # hits the cache
        plain = _solo(uncached, tokenizer, cases, max_new_tokens=10)
    finally:
        cached.stop(), uncached.stop()
    assert [d.token_ids for d in first] == [d.token_ids for d in reused] == [d.token_ids for d in plain]
    stats = cached.prefix_cache.stats()
    assert stats["misses"] == len(cases) and stats["hits"] == len(cases)
    assert uncached.prefix_cache.stats()["entries"] == 0


def test_bare_model_matches_hf_generate(backend, mixing, tokenizer):
    from core.layout import ChatLayout

    engine = _engine(mixing, backend)
    try:
        [done] = _solo(engine, tokenizer, [(TEXTS[0], None, None)], max_new_tokens=10)
    finally:
        engine.stop()
    layout = ChatLayout(tokenizer).for_input(TEXTS[0])
    ids = torch.tensor([layout.head_ids + layout.tail_ids])
    plain = untied_llama(len(tokenizer))  # the same weights, never touched by an engine (mixing's are fused)
    with torch.no_grad():
        reference = plain.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert done.token_ids == reference[0, ids.shape[1] :].tolist()[: len(done.token_ids)]


def test_requests_joining_between_steps_keep_their_tokens(backend, mixing, tokenizer, softs):
    """A request admitted while others are mid-decode gets exactly its solo tokens."""
    engine = _engine(mixing, backend, max_batch_size=8)
    try:
        cases = _cases(softs)
        alone = _solo(engine, tokenizer, cases, max_new_tokens=16)
        sinks = []
        for text, key, soft in cases:
            job, sink = make_job(tokenizer, text, soft, key=key, max_new_tokens=16)
            engine.submit(job)
            sinks.append(sink)
            sink.events.get(timeout=30)  # wait for its first token before the next one arrives
            sink.events.put(None)
        results = []
        for sink in sinks:
            results.append(_drain_done(sink))
    finally:
        engine.stop()
    assert [d.token_ids for d in results] == [d.token_ids for d in alone]
    assert engine.counters["max_batch_size_seen"] >= 2


def _drain_done(sink):
    from server.engine import DoneEvent

    while True:
        event = sink.events.get(timeout=30)
        if isinstance(event, DoneEvent):
            return event


def test_max_new_tokens_respected_and_finished_rows_leave(backend, mixing, tokenizer, softs):
    engine = _engine(mixing, backend)
    try:
        engine.pause()
        short, s1 = make_job(tokenizer, TEXTS[0], max_new_tokens=3)
        long, s2 = make_job(tokenizer, TEXTS[1], max_new_tokens=20)
        engine.submit(short), engine.submit(long)
        engine.resume()
        (d1, _), (d2, _) = wait_all([s1, s2])
    finally:
        engine.stop()
    assert (d1.completion_tokens, d1.finish_reason) == (3, "length")
    assert d2.completion_tokens == 20 or d2.finish_reason == "stop"
    assert engine.stats()["running"] == 0


def test_seeded_sampling_is_reproducible(backend, mixing, tokenizer):
    engine = _engine(mixing, backend)
    try:
        runs = [
            _solo(engine, tokenizer, [(TEXTS[1], None, None)], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)[0]
            for _ in range(2)
        ]
    finally:
        engine.stop()
    assert runs[0].token_ids == runs[1].token_ids


def test_stop_string_ends_and_is_cut(backend, mixing, tokenizer):
    engine = _engine(mixing, backend)
    try:
        [full] = _solo(engine, tokenizer, [(TEXTS[2], None, None)], max_new_tokens=12)
        stop = full.text[3:5]
        assert stop.strip("\ufffd"), "need printable text to pick a stop string from"
        [cut] = _solo(engine, tokenizer, [(TEXTS[2], None, None)], max_new_tokens=12, stop=(stop,))
    finally:
        engine.stop()
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]


def test_queue_full_when_too_many_wait(backend, mixing, tokenizer):
    engine = _engine(mixing, backend, max_queue=2)
    try:
        engine.pause()
        for _ in range(2):
            engine.submit(make_job(tokenizer, "x")[0])
        with pytest.raises(QueueFullError):
            engine.submit(make_job(tokenizer, "x")[0])
    finally:
        engine.resume()
        engine.stop()


def test_a_cancelled_waiting_request_gives_its_queue_place_back_at_once(backend, mixing, tokenizer):
    engine = _engine(mixing, backend, max_queue=2)
    try:
        engine.pause()  # nothing is admitted: only cancel() can free a place
        first, first_sink = make_job(tokenizer, "x")
        engine.submit(first), engine.submit(make_job(tokenizer, "y")[0])
        with pytest.raises(QueueFullError):
            engine.submit(make_job(tokenizer, "z")[0])
        engine.cancel(first)
        engine.cancel(first)  # twice frees one place, not two
        assert engine.stats()["waiting"] == 1
        engine.submit(make_job(tokenizer, "z")[0])
        with pytest.raises(QueueFullError):
            engine.submit(make_job(tokenizer, "w")[0])
        engine.resume()
        assert _drain_done(first_sink).finish_reason == "cancelled"
    finally:
        engine.resume()
        engine.stop()


def test_cancelled_requests_end_while_the_batch_is_full(backend, mixing, tokenizer):
    engine = _engine(mixing, backend, max_batch_size=1, max_queue=4)
    try:
        long, long_sink = make_job(tokenizer, TEXTS[1], max_new_tokens=200, ignore_eos=True)
        engine.submit(long)  # holds the only batch row
        waiting, waiting_sink = make_job(tokenizer, "x")
        engine.submit(waiting)
        engine.cancel(waiting)
        assert _drain_done(waiting_sink).finish_reason == "cancelled"  # not after the long row ends
        assert not long.closed
    finally:
        engine.cancel(long)
        _drain_done(long_sink)
        engine.stop()


def test_prefix_cache_keys_by_version_and_checksum_not_name():
    cache = PrefixCache(max_bytes=1 << 20)
    head = (1, 2, 3)
    cache.put(PrefixCache.key(("math", 1, "aaa"), head), [(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))])
    assert PrefixCache.key(("math", 1, "aaa"), head) in cache
    assert PrefixCache.key(("math", 2, "bbb"), head) not in cache
    assert PrefixCache.key(("math", 1, "ccc"), head) not in cache
    assert PrefixCache.key(("math", 1, "aaa"), (1, 2)) not in cache


def test_growing_kv_buffer_gives_the_same_tokens_as_dynamic_cache(mixing, tokenizer, softs):
    growing, plain = _engine(mixing, growing_cache=True), _engine(mixing, growing_cache=False)
    try:
        cases = _cases(softs)
        a = submit_together(growing, tokenizer, cases, max_new_tokens=20)
        b = submit_together(plain, tokenizer, cases, max_new_tokens=20)
    finally:
        growing.stop(), plain.stop()
    assert [d.token_ids for d in a] == [d.token_ids for d in b]


def test_ignore_eos_generates_exactly_max_new_tokens(backend, mixing, tokenizer):
    engine = _engine(mixing, backend)
    engine.eos_ids = set(range(len(tokenizer)))  # every token ends the sequence...
    try:
        [stopped] = _solo(engine, tokenizer, [(TEXTS[0], None, None)], max_new_tokens=6)
        [kept] = _solo(engine, tokenizer, [(TEXTS[0], None, None)], max_new_tokens=6, ignore_eos=True)
    finally:
        engine.stop()
    assert (stopped.completion_tokens, stopped.finish_reason) == (1, "stop")
    assert (kept.completion_tokens, kept.finish_reason) == (6, "length")  # ...unless ignored


def test_burst_within_the_batch_window_is_prefilledsubmit_together(backend, mixing, tokenizer, softs):
    import time

    engine = _engine(mixing, backend, batch_window_ms=50)
    try:
        sinks = []
        for text, key, soft in _cases(softs):
            job, sink = make_job(tokenizer, text, soft, key=key, max_new_tokens=4)
            engine.submit(job)
            sinks.append(sink)
            time.sleep(0.005)
        done = [d for d, _ in wait_all(sinks)]
    finally:
        engine.stop()
    assert engine.counters["prefill_batches"] == 1
    assert all(d.batch_sizes[0] == len(sinks) for d in done)


def test_engine_leaves_the_threads_other_work_holds_and_takes_them_back(backend, mixing, tokenizer):
    previous = torch.get_num_threads()
    reserved = [0]

    def held() -> int:
        if reserved[0] is None:
            raise RuntimeError("the job manager is broken")
        return reserved[0]

    engine = _engine(mixing, backend, reserved_threads=held, threads=2)
    try:
        seen = []
        for reserved[0] in (0, 1, 5, None, 0, 1):  # a job starts, a bigger one, a broken probe, none, one again
            [done] = _solo(engine, tokenizer, [(TEXTS[0], None, None)], max_new_tokens=2)
            assert done.finish_reason == "length"  # a broken probe fails no request
            seen.append(engine.stats()["threads"])
    finally:
        engine.stop()
        after = _count_in_a_new_thread()
        torch.set_num_threads(previous)
    assert seen == [2, 1, 1, 1, 2, 1]  # never below one thread; a failed probe keeps the count
    assert after == 2  # new threads start from the full count again, not from the engine's last cut


def _count_in_a_new_thread() -> int:
    """torch's thread count as a new thread sees it: the last count any thread set."""
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start(), thread.join()
    return seen[0]


def test_llamacpp_rows_give_the_torch_engines_tokens(mixing, tokenizer, softs, untied_gguf_path):
    """The same weights (f32) through either backend: a mixed batch of soft prompts, the same tokens."""
    torch_engine = _engine(mixing, ("torch", None), max_batch_size=8)
    llama_engine = _engine(mixing, ("llamacpp", untied_gguf_path), max_batch_size=8)
    try:
        cases = _cases(softs)
        expected = submit_together(torch_engine, tokenizer, cases, max_new_tokens=16)
        got = submit_together(llama_engine, tokenizer, cases, max_new_tokens=16)
        sampled = {  # the same seed draws the same tokens from the same logits
            name: submit_together(engine, tokenizer, cases, max_new_tokens=16, temperature=0.9, top_p=0.95, seed=11)
            for name, engine in (("torch", torch_engine), ("llamacpp", llama_engine))
        }
    finally:
        torch_engine.stop(), llama_engine.stop()
    assert [d.token_ids for d in got] == [d.token_ids for d in expected]
    assert [d.token_ids for d in sampled["llamacpp"]] == [d.token_ids for d in sampled["torch"]]
    assert [d.token_ids for d in sampled["torch"]] != [d.token_ids for d in expected]  # it did sample
    assert llama_engine.stats()["backend"] == "llamacpp"
