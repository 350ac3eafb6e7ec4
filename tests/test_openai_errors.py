"""/v1 errors in OpenAI's shape and statuses, straight from the app (no SDK retries in the way)."""

from __future__ import annotations

from tests.engine_helpers import make_job
from tests.http_helpers import app_client, mixing, publish  # noqa: F401

HI = [{"role": "user", "content": "hi"}]


def _openai_error(answer) -> dict:
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def test_a_full_queue_is_429_with_retry_after(app_client):
    with app_client(max_queue=2, queue_retry_after=4) as client:
        engine = client.app.state.softprompt.engine
        engine.pause()
        for _ in range(2):
            engine.submit(make_job(engine.tokenizer, "x")[0])
        chat = client.post("/v1/chat/completions", json={"model": "tiny-untied", "messages": HI})
        generate = client.post("/generate", json={"input": "hi"})
        engine.resume()
    assert chat.status_code == 429 and chat.headers["retry-after"] == "4"
    assert _openai_error(chat)["type"] == "rate_limit_error"
    assert (
        generate.status_code == 503 and generate.json()["error"]["code"] == "queue_full"
    )  # /generate keeps its own shape


def test_more_rows_than_the_queue_holds_is_a_bad_request_not_a_retry(app_client, mixing, tmp_path):
    with app_client(max_queue=4) as client:
        answer = client.post("/v1/completions", json={"model": "tiny-untied", "prompt": ["a", "b", "c"], "n": 2})
    assert answer.status_code == 400 and "6 rows" in _openai_error(answer)["message"]


def test_errors_name_the_param(app_client, mixing, tmp_path):
    publish(tmp_path / "store", mixing, "math")
    with app_client(max_request_bytes=2048) as client:
        bad_temperature = client.post("/v1/chat/completions", json={"model": "math", "messages": HI, "temperature": 9})
        unknown_field = client.post("/v1/chat/completions", json={"model": "math", "messages": HI, "frobnicate": 1})
        malformed_model = client.post("/v1/chat/completions", json={"model": "Not A Name!", "messages": HI})
        near_miss = client.post("/v1/completions", json={"model": "maht", "prompt": "x"})
        too_big = client.post("/v1/completions", json={"model": "math", "prompt": "x" * 5000})
        unknown_route = client.get("/v1/nope")
        not_json = client.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
    assert bad_temperature.status_code == 400 and _openai_error(bad_temperature)["param"] == "temperature"
    assert unknown_field.status_code == 400 and _openai_error(unknown_field)["param"] == "frobnicate"
    assert malformed_model.status_code == 404 and _openai_error(malformed_model)["code"] == "model_not_found"
    assert near_miss.status_code == 404 and "math" in _openai_error(near_miss)["message"]
    assert too_big.status_code == 413 and _openai_error(too_big)["code"] == "payload_too_large"
    assert unknown_route.status_code == 404 and _openai_error(unknown_route)["type"] == "not_found_error"
    assert not_json.status_code == 400 and _openai_error(not_json)["type"] == "invalid_request_error"
