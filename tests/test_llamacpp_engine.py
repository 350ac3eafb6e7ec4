"""What only the llama.cpp backend has: a key/value memory of fixed size, prefix slots, and the
server wired to it (SOFTPROMPT_ENGINE=llamacpp). The behaviour both backends share is tested on
both in test_engine.py and test_engine_failures.py."""

from __future__ import annotations

import pytest
import torch

from core.modeling import from_loaded
from tests.engine_helpers import make_engine, make_job, require_llamacpp, submit_together, untied_llama
from tests.http_helpers import make_settings, parse_sse, publish

TEXTS = ["What is two plus three?", "The movie was great fun", "Classify", "a bad movie"]


@pytest.fixture(autouse=True)
def _llamacpp():
    require_llamacpp()


@pytest.fixture(scope="module")
def untied(tokenizer):
    return from_loaded(untied_llama(len(tokenizer)), tokenizer, base_model="tiny-untied")


def test_requests_wait_for_room_in_the_memory_instead_of_failing(untied, tokenizer, untied_gguf_path):
    """256 cells, each request reserves ~60: at most 4 rows run at once, all 8 requests finish."""
    reference = make_engine("torch", untied, max_batch_size=8)
    small = make_engine("llamacpp", untied, untied_gguf_path, max_batch_size=8, kv_tokens=256)
    reference.start(), small.start()
    try:
        cases = [(f"{TEXTS[i % 4]} {i}", None, None) for i in range(8)]
        expected = submit_together(reference, tokenizer, cases, max_new_tokens=40, ignore_eos=True)
        got = submit_together(small, tokenizer, cases, max_new_tokens=40, ignore_eos=True)
    finally:
        reference.stop(), small.stop()
    assert all(d.finish_reason == "length" and d.completion_tokens == 40 for d in got)
    assert [d.token_ids for d in got] == [d.token_ids for d in expected]
    assert 1 < small.counters["max_batch_size_seen"] < 8  # the memory, not the batch size, was the bound
    assert small.counters["requests_failed"] == 0


def test_prefix_slots_are_reused_least_recently_used_first(untied, tokenizer, untied_gguf_path):
    torch.manual_seed(3)
    softs = {name: torch.randn(n, 64) for name, n in (("a", 3), ("b", 6), ("c", 4))}
    reference = make_engine("torch", untied)
    engine = make_engine("llamacpp", untied, untied_gguf_path, prefix_slots=2)
    reference.start(), engine.start()
    try:
        order = ["a", "b", "c", "a", "c", "b"]  # the third prompt evicts the first, which comes back
        got = [
            submit_together(engine, tokenizer, [(TEXTS[0], (n, 1, "x"), softs[n])], max_new_tokens=8)[0] for n in order
        ]
        want = [
            submit_together(reference, tokenizer, [(TEXTS[0], (n, 1, "x"), softs[n])], max_new_tokens=8)[0]
            for n in order
        ]
        stats = engine.prefix_cache.stats()
    finally:
        reference.stop(), engine.stop()
    assert [d.token_ids for d in got] == [d.token_ids for d in want]
    assert stats["entries"] == 2
    assert stats["misses"] >= 4 and stats["hits"] >= 1  # a, b, c, a again were computed; c was still there


def test_a_deleted_prompts_prefix_leaves_the_memory(untied, tokenizer, untied_gguf_path):
    torch.manual_seed(4)
    soft = torch.randn(5, 64)
    engine = make_engine("llamacpp", untied, untied_gguf_path)
    engine.start()
    try:
        submit_together(engine, tokenizer, [(TEXTS[1], ("gone", 1, "x"), soft)], max_new_tokens=4)
        assert engine.prefix_cache.stats()["entries"] >= 1
        assert engine.prefix_cache.evict_prompt("gone") == 1
        [done] = submit_together(engine, tokenizer, [(TEXTS[1], None, None)], max_new_tokens=4)  # frees it, serves on
    finally:
        engine.stop()
    assert done.finish_reason in ("length", "stop")
    assert not any(k[0] and k[0][0] == "gone" for k in engine.prefix_cache.items)
    assert len(engine.prefix_cache.free) == 4 - len(engine.prefix_cache.items)


def test_the_server_serves_prompts_through_llamacpp_as_through_torch(untied, untied_gguf_path, tmp_path):
    """The same HTTP surface on either engine: /generate with a prompt, streamed, and OpenAI chat."""
    from fastapi.testclient import TestClient

    from server.app import create_app

    publish(tmp_path / "store", untied, "tone", vectors=6)
    answers = {}
    for engine in ("torch", "llamacpp"):
        settings = make_settings(tmp_path, model=untied_gguf_path, engine=engine)
        with TestClient(create_app(settings, frozen=untied)) as client:
            body = {"input": "What is two plus three?", "max_new_tokens": 12, "ignore_eos": True}
            plain = client.post("/generate", params={"prompt": "tone"}, json=body)
            streamed = client.post("/generate", params={"prompt": "tone", "stream": "true"}, json=body)
            chat = client.post(
                "/v1/chat/completions",
                json={
                    "model": "tone",
                    "messages": [{"role": "user", "content": "Classify"}],
                    "max_tokens": 6,
                    "temperature": 0,
                },
            )
            stats = client.get("/stats").json()
            metrics = client.get("/metrics").text
        assert plain.status_code == streamed.status_code == chat.status_code == 200, plain.text
        assert f'softprompt_engine_info{{backend="{engine}"}} 1.0' in metrics
        assert ("softprompt_kv_cells_reserved" in metrics) == (engine == "llamacpp")
        pieces = [data["text"] for name, data in parse_sse(streamed.text) if name == "token"]
        assert "".join(pieces) == plain.json()["text"]
        assert stats["engine"]["backend"] == engine
        answers[engine] = (plain.json()["text"], chat.json()["choices"][0]["message"]["content"])
    assert answers["llamacpp"] == answers["torch"]


@pytest.mark.real_model
def test_rows_decode_as_llama_cpp_itself_decodes_the_default_gguf(real_model):
    """The engine's llama.cpp rows (a shared prefix slot, the tail, batched steps) give the tokens
    llama-cpp-python's own greedy generation gives for the same token ids (flash attention off: its
    F16 path rounds differently with the batch's shape)."""
    import llama_cpp

    from core.layout import ChatLayout
    from core.modeling import resolve_spec
    from server.engine import Engine
    from server.engine.llamacpp_backend import LlamaCppBackend

    resolved = resolve_spec("default")
    gguf = resolved.folder / resolved.gguf_file
    backend = LlamaCppBackend(real_model, gguf, max_rows=4, kv_tokens=8192, threads=2, flash_attention="off")
    engine = Engine(real_model, backend=backend)
    reference = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_threads=2, flash_attn=False, verbose=False)
    engine.start()
    try:
        for text in ["Explain why the sky is blue.", "What is 17 times 23?", TEXTS[1]]:
            layout = ChatLayout(real_model.tokenizer).for_input(text)
            expected = []
            for token in reference.generate(list(layout.head_ids + layout.tail_ids), temp=0.0, top_k=1, reset=True):
                expected.append(token)
                if len(expected) == 24:
                    break
            job, sink = make_job(real_model.tokenizer, text, max_new_tokens=24, ignore_eos=True)
            engine.submit(job)
            assert sink.result(120)[0].token_ids == expected, text
    finally:
        engine.stop()
        reference.close()
