"""POST /generate through HTTP on the tiny model: prompts, aliases, SSE, hot swap, batching."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.http_helpers import app_client, make_settings, mixing, parse_sse, publish  # noqa: F401

BODY = {"input": "What is two plus three?", "max_new_tokens": 8}


def test_generate_with_version_name_alias_and_bare(app_client, mixing, tmp_path):
    publish(tmp_path / "store", mixing, "math", seed=1)
    publish(tmp_path / "store", mixing, "math", seed=2)
    with app_client() as client:
        assert client.put("/aliases/math-prod", json={"target": "math-v1"}).status_code == 200
        v1 = client.post("/generate", params={"prompt": "math-v1"}, json=BODY).json()
        newest = client.post("/generate", params={"prompt": "math"}, json=BODY).json()
        alias = client.post("/generate", params={"prompt": "math-prod"}, json=BODY).json()
        bare = client.post("/generate", json=BODY).json()
    assert (v1["prompt"], newest["prompt"], alias["prompt"], bare["prompt"]) == ("math-v1", "math-v2", "math-v1", None)
    assert alias["text"] == v1["text"]
    assert len({v1["text"], newest["text"], bare["text"]}) == 3
    assert v1["usage"]["soft_prompt_tokens"] == 4 and bare["usage"]["soft_prompt_tokens"] == 0
    assert v1["usage"]["completion_tokens"] <= 8 and v1["timings"]["ttft_ms"] > 0


def test_sse_stream_assembles_to_the_non_streamed_text(app_client, mixing, tmp_path):
    publish(tmp_path / "store", mixing, "math")
    body = {**BODY, "max_new_tokens": 24}
    with app_client() as client:
        plain = client.post("/generate", params={"prompt": "math"}, json=body).json()
        streamed = client.post("/generate", params={"prompt": "math", "stream": "true"}, json=body)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(streamed.text)
    pieces = "".join(data["text"] for name, data in events if name == "token")
    [done] = [data for name, data in events if name == "done"]
    assert pieces == plain["text"] == done["text"]
    assert done["prompt"] == plain["prompt"] == "math-v1"


def test_publish_then_generate_works_without_reload(app_client, mixing, tmp_path):
    with app_client(store_poll_seconds=0.05) as client:
        assert client.post("/generate", params={"prompt": "fresh"}, json=BODY).status_code == 404
        publish(tmp_path / "store", mixing, "fresh", seed=3)  # as the trainer or CLI would
        first = client.post("/generate", params={"prompt": "fresh"}, json=BODY)
        assert first.status_code == 200 and first.json()["prompt"] == "fresh-v1"
        publish(tmp_path / "store", mixing, "fresh", seed=4)
        deadline = time.time() + 5
        while "fresh-v2" not in client.get("/stats").json()["watcher"]["warmed"] and time.time() < deadline:
            time.sleep(0.05)
        second = client.post("/generate", params={"prompt": "fresh"}, json=BODY).json()
        stats = client.get("/stats").json()
    assert second["prompt"] == "fresh-v2"
    assert "fresh-v2" in stats["watcher"]["warmed"]  # pre-warmed by the store watcher
    assert stats["model_loads"] == 1


def test_concurrent_requests_for_different_versions_share_a_batch(mixing, tmp_path):
    from server.app import create_app

    for i, name in enumerate(["alpha", "beta", "gamma", "delta"]):
        publish(tmp_path / "store", mixing, name, vectors=3 + i, seed=i)
    names = ["alpha", "beta", "gamma", "delta"] * 2
    app = create_app(make_settings(tmp_path), frozen=mixing)

    async def run():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:

                async def one(name):
                    return (
                        await client.post("/generate", params={"prompt": name}, json={**BODY, "max_new_tokens": 16})
                    ).json()

                solo = [await one(name) for name in names]
                engine = app.state.softprompt.engine
                engine.pause()  # let every request queue, then decode them together
                tasks = [asyncio.create_task(one(name)) for name in names]
                while engine.stats()["waiting"] < len(names):
                    await asyncio.sleep(0.01)
                engine.resume()
                together = await asyncio.gather(*tasks)
                stats = (await client.get("/stats")).json()
                return solo, together, stats

    solo, together, stats = asyncio.run(run())
    assert [r["text"] for r in together] == [r["text"] for r in solo]
    assert [r["prompt"] for r in together] == [f"{n}-v1" for n in names]
    assert all(r["batch"]["joined"] == len(names) for r in together)
    assert stats["engine"]["max_batch_size_seen"] == len(names)


def test_health_ready_and_stats(app_client):
    with app_client() as client:
        assert client.get("/health").json()["status"] == "ok"
        assert client.get("/ready").status_code == 200
        stats = client.get("/stats").json()
    assert stats["model_loads"] == 1 and stats["ready"] is True
    assert {"prefill_batches", "decode_steps", "max_batch_size_seen"} <= set(stats["engine"])
    assert {"hits", "misses"} <= set(stats["engine"]["prefix_cache"])


def test_engine_speed_settings_reach_the_engine(tokenizer, tmp_path):
    """FUSED_PROJECTIONS, PACKED_WEIGHTS and GQA_ATTENTION (all on by default) change the served
    model in place, so each app gets a fresh model here."""
    from fastapi.testclient import TestClient

    from core.modeling import from_loaded
    from server.app import create_app
    from server.engine.attention import NAME
    from server.engine.fused_linear import FusedLinear
    from server.engine.packed_linear import PackedLinear, packing_available
    from tests.engine_helpers import untied_llama

    def served(**overrides):
        frozen = from_loaded(untied_llama(len(tokenizer)), tokenizer, base_model="tiny-untied")
        with TestClient(create_app(make_settings(tmp_path, **overrides), frozen=frozen)) as client:
            rewrites = client.get("/stats").json()["model"]["rewrites"]
            assert client.post("/generate", json=BODY).status_code == 200
        modules = list(frozen.model.modules())
        assert (rewrites["packed_weights_bytes"] > 0) == any(isinstance(m, PackedLinear) for m in modules)
        return (
            rewrites["fused_projection_groups"] > 0,
            any(isinstance(m, PackedLinear) for m in modules),
            rewrites["attention"] == NAME,
            any(isinstance(m, FusedLinear) for m in modules),
        )

    packing = packing_available(untied_llama(len(tokenizer)))  # False on a torch build without oneDNN
    assert served() == (True, packing, True, True)
    assert served(fused_projections=False, packed_weights=False, gqa_attention=False) == (False, False, False, False)


def test_a_retired_setting_is_named_in_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SOFTPROMPT_PACKED_DECODE", "true")
    with caplog.at_level("WARNING", logger="server.settings"):
        make_settings(tmp_path)
    assert "SOFTPROMPT_PACKED_DECODE is no longer read; see SOFTPROMPT_PACKED_WEIGHTS" in caplog.text
