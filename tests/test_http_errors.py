"""Every error is JSON with a machine-readable code and the right status."""

from __future__ import annotations

import torch

from prompt_store import ModelFingerprint, open_store
from tests.http_helpers import app_client, mixing, publish  # noqa: F401


def _error(answer):
    return answer.status_code, answer.json()["error"]["code"]


def test_unknown_prompt_is_404_naming_close_matches(app_client, mixing, tmp_path):
    publish(tmp_path / "store", mixing, "math")
    with app_client() as client:
        answer = client.post("/generate", params={"prompt": "maths"}, json={"input": "hi"})
        missing_version = client.post("/generate", params={"prompt": "math-v7"}, json={"input": "hi"})
    assert _error(answer) == (404, "prompt_not_found")
    assert "math" in answer.json()["error"]["close_matches"] and "math" in answer.json()["error"]["message"]
    assert _error(missing_version) == (404, "prompt_not_found")


def test_incompatible_prompt_is_409(app_client, mixing, tmp_path):
    store = open_store(tmp_path / "store")
    other = ModelFingerprint(hidden_size=64, vocab_size=mixing.fingerprint.vocab_size, embedding_sha256="another-model")
    store.publish("foreign", torch.randn(3, 64), fingerprint=other, base_model="other")
    store.publish("narrow", torch.randn(3, 32), fingerprint=ModelFingerprint(32, 10), base_model="small")
    with app_client() as client:
        foreign = client.post("/generate", params={"prompt": "foreign"}, json={"input": "hi"})
        narrow = client.post("/generate", params={"prompt": "narrow"}, json={"input": "hi"})
        shown = client.get("/prompts/narrow").json()
    assert _error(foreign) == (409, "incompatible_model") and "embedding" in foreign.json()["error"]["message"]
    assert _error(narrow) == (409, "incompatible_model") and "hidden size" in narrow.json()["error"]["message"]
    assert shown["compatible"] is False


def test_input_too_long_is_422_with_the_limit(app_client):
    with app_client() as client:
        answer = client.post("/generate", json={"input": "the movie was great " * 80, "max_new_tokens": 8})
        too_many = client.post("/generate", json={"input": "hi", "max_new_tokens": 65})
    assert _error(answer) == (422, "input_too_long")
    assert answer.json()["error"]["limit"] == 256 and answer.json()["error"]["prompt_tokens"] > 256 - 8
    assert _error(too_many) == (422, "invalid_request")


def test_queue_full_is_503_with_retry_after(app_client):
    from tests.engine_helpers import make_job

    with app_client(max_queue=2, queue_retry_after=3) as client:
        engine = client.app.state.softprompt.engine
        engine.pause()
        for _ in range(2):
            engine.submit(make_job(engine.tokenizer, "x")[0])
        answer = client.post("/generate", json={"input": "hi"})
        engine.resume()
    assert _error(answer) == (503, "queue_full")
    assert answer.headers["retry-after"] == "3"


def test_bad_bodies_are_422_json(app_client):
    with app_client() as client:
        neither = client.post("/generate", json={"max_new_tokens": 4})
        both = client.post("/generate", json={"input": "a", "messages": [{"role": "user", "content": "b"}]})
        no_user = client.post("/generate", json={"messages": [{"role": "system", "content": "b"}]})
        empty_chat = client.post("/generate", json={"messages": []})
        bad_ref = client.post("/generate", params={"prompt": "Not A Name"}, json={"input": "a"})
        unknown_route = client.get("/nope")
        broken = client.post("/generate", content=b'{"input": "a",', headers={"content-type": "application/json"})
        chat_broken = client.post("/v1/completions", content=b"not json", headers={"content-type": "application/json"})
    # A body that is not JSON says where it breaks, not a field named "0" or "14"
    assert _error(broken) == (422, "invalid_request"), broken.text
    assert broken.json()["error"]["message"].startswith("body: not valid JSON at character 14 ("), broken.text
    assert broken.json()["error"]["details"][0]["loc"] == ["body"]
    assert chat_broken.status_code == 400 and "not valid JSON at character 0" in chat_broken.text, chat_broken.text
    assert chat_broken.json()["error"]["param"] is None
    assert _error(neither) == (422, "invalid_request") and _error(both) == (422, "invalid_request")
    assert _error(no_user) == (422, "invalid_request") and _error(empty_chat) == (422, "invalid_request")
    assert _error(bad_ref) == (422, "invalid_name")
    assert _error(unknown_route) == (404, "not_found")


def test_chat_messages_are_served(app_client):
    with app_client() as client:
        answer = client.post(
            "/generate",
            json={
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What is two plus three?"},
                ],
                "max_new_tokens": 4,
            },
        )
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] <= 4
