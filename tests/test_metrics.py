"""GET /metrics: parsed with prometheus_client's own parser, counters and histogram counts move by
exactly the requests made; /v1 and /generate share the one engine."""

from __future__ import annotations

import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from tests.engine_helpers import make_job
from tests.http_helpers import app_client, mixing, publish  # noqa: F401

HI = [{"role": "user", "content": "What is two plus three?"}]


def scrape(client) -> dict[tuple, float]:
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def moved(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_request_metrics_move_by_exactly_the_requests_made(app_client, mixing, tmp_path):
    publish(tmp_path / "store", mixing, "math")
    with app_client() as client:
        client.post("/generate", params={"prompt": "math"}, json={"input": "warm up", "max_new_tokens": 2})
        before = scrape(client)
        answers = [
            client.post(
                "/generate",
                params={"prompt": "math"},
                json={"input": f"question {i}", "max_new_tokens": 4, "ignore_eos": True},
            ).json()
            for i in range(3)
        ]
        assert client.post("/generate", params={"prompt": "nope"}, json={"input": "x"}).status_code == 404
        first_again = {"input": "question 0", "max_new_tokens": 4, "ignore_eos": True}  # no prefill this time
        repeated = client.post("/generate", params={"prompt": "math"}, json=first_again).json()
        after = scrape(client)
    assert repeated["text"] == answers[0]["text"]
    answers.append(repeated)
    prompt_tokens = sum(a["usage"]["prompt_tokens"] for a in answers)
    assert moved(before, after, "softprompt_requests_finished_total", prompt="math", finish_reason="length") == 4
    assert moved(before, after, "softprompt_generation_tokens_total", prompt="math") == 16
    assert moved(before, after, "softprompt_prompt_tokens_total", prompt="math") == prompt_tokens
    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time", "request_prefill_time"):
        assert moved(before, after, f"softprompt_{histogram}_seconds_count", prompt="math") == 4, histogram
    assert moved(before, after, "softprompt_inter_token_latency_seconds_count", prompt="math") == 4 * 3
    assert moved(before, after, "softprompt_http_requests_total", handler="/generate", method="POST", status="2xx") == 4
    assert moved(before, after, "softprompt_http_requests_total", handler="/generate", method="POST", status="4xx") == 1
    assert moved(before, after, "softprompt_prefix_cache_hits_total") == 3  # the repeated input needs no prefix
    assert moved(before, after, "softprompt_input_cache_hits_total") == 1
    assert moved(before, after, "softprompt_input_cache_misses_total") == 3
    assert after[("softprompt_input_cache_entries", ())] >= 3
    assert not any(
        name.startswith("softprompt_requests_finished") and ("prompt", "nope") in labels for name, labels in after
    )  # unknown references never become labels
    assert after[("softprompt_requests_running", ())] == 0 and after[("softprompt_model_loads_total", ())] == 1
    assert after[("softprompt_prompt_versions_loaded", ())] == 1
    assert after[("softprompt_training_jobs", (("state", "queued"),))] == 0


def test_refusals_and_failures_are_counted(app_client):
    with app_client(max_queue=1) as client:
        engine = client.app.state.softprompt.engine
        before = scrape(client)
        engine.pause()
        engine.submit(make_job(engine.tokenizer, "x")[0])
        refused = client.post("/generate", json={"input": "hi"})
        engine.resume()
        after = scrape(client)
    assert refused.status_code == 503
    assert moved(before, after, "softprompt_http_requests_total", handler="/generate", method="POST", status="5xx") == 1


def test_v1_and_generate_requests_share_one_batch(app_client, mixing, tmp_path):
    publish(tmp_path / "store", mixing, "math")
    with app_client() as client:
        engine = client.app.state.softprompt.engine
        client.post("/generate", params={"prompt": "math"}, json={"input": "warm up", "max_new_tokens": 2})
        prefills = engine.stats()["prefill_batches"]
        engine.pause()
        results = {}
        calls = {
            "generate": lambda: client.post(
                "/generate", params={"prompt": "math"}, json={"messages": HI, "max_new_tokens": 6}
            ),
            "chat": lambda: client.post(
                "/v1/chat/completions", json={"model": "math", "messages": HI, "max_tokens": 6, "temperature": 0}
            ),
            "completion": lambda: client.post(
                "/v1/completions", json={"model": "math", "prompt": HI[0]["content"], "max_tokens": 6, "temperature": 0}
            ),
        }
        threads = [
            threading.Thread(target=lambda k=k, f=f: results.__setitem__(k, f().json())) for k, f in calls.items()
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while engine.stats()["waiting"] < 3:
            assert time.monotonic() < deadline, "the three requests never queued"
            time.sleep(0.01)
        engine.resume()
        for thread in threads:
            thread.join(30)
    assert engine.stats()["prefill_batches"] == prefills + 1  # all three joined in one prefill
    text = results["generate"]["text"]
    assert results["chat"]["choices"][0]["message"]["content"] == text == results["completion"]["choices"][0]["text"]
