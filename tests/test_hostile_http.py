"""Requests that must not hurt the server (issue 12): body limits, open admin routes,
retried uploads, overload, staging leftovers."""

from __future__ import annotations

import os
import time

import pytest
import torch
from safetensors.torch import save

from server.settings import Settings
from tests.engine_helpers import make_job
from tests.http_helpers import app_client, mixing  # noqa: F401
from tests.jobs_helpers import SENTIMENT, jsonl

KEY = {"Authorization": "Bearer s3cret"}


def _error(answer):
    return answer.status_code, answer.json()["error"]["code"]


def _prompt_file(seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    return save({"prompt_embeddings": torch.randn(3, 64)})


# ---------------------------------------------------------------- body size limits
def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(app_client):
    with app_client(max_request_bytes=4096) as client:
        started = time.perf_counter()
        answer = client.post("/generate", content=b"x" * 100_000, headers={"content-type": "application/json"})
        elapsed = time.perf_counter() - started
        fine = client.post("/generate", json={"input": "hi", "max_new_tokens": 2})
    assert _error(answer) == (413, "payload_too_large")
    assert answer.json()["error"]["limit"] == 4096 and "4096" in answer.json()["error"]["message"]
    assert "SOFTPROMPT_MAX_REQUEST_BYTES" in answer.json()["error"]["message"]
    assert elapsed < 1.0 and fine.status_code == 200


def test_a_chunked_body_is_cut_off_at_the_limit(app_client):
    sent = []

    def chunks():
        for _ in range(1000):  # 1 MB in 1 KB pieces, no Content-Length
            sent.append(1024)
            yield b"x" * 1024

    with app_client(max_request_bytes=4096) as client:
        answer = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
        after = client.post("/generate", json={"input": "hi", "max_new_tokens": 2})
    assert _error(answer) == (413, "payload_too_large")
    assert after.status_code == 200


def test_upload_routes_have_their_own_limits(app_client):
    with app_client(max_request_bytes=4096, max_prompt_upload_bytes=2000, max_upload_bytes=3000) as client:
        big_prompt = client.post("/prompts", data={"name": "big"}, files={"file": ("p.safetensors", b"\0" * 200_000)})
        big_train = client.post("/train", data={"name": "t", "init": "x"}, files={"file": ("t.jsonl", b"\0" * 200_000)})
        fits = client.post("/prompts", data={"name": "small"}, files={"file": ("p.safetensors", _prompt_file())})
    assert _error(big_prompt) == (413, "payload_too_large") and "SOFTPROMPT_MAX_PROMPT_UPLOAD_BYTES" in big_prompt.text
    assert _error(big_train) == (413, "payload_too_large") and "SOFTPROMPT_MAX_UPLOAD_BYTES" in big_train.text
    assert fits.status_code == 201, fits.text


# ---------------------------------------------------------------- admin access
def test_an_empty_api_key_is_refused_at_start(tmp_path):
    for empty in ("", "   "):
        with pytest.raises(ValueError, match="SOFTPROMPT_API_KEY is set but empty"):
            Settings(store=tmp_path, api_key=empty)


def test_admin_routes_are_off_on_a_public_address_without_a_key(app_client):
    with app_client(host="0.0.0.0") as client:
        upload = client.post("/prompts", data={"name": "p"}, files={"file": ("p.safetensors", _prompt_file())})
        delete = client.delete("/prompts/p")
        train = client.post("/train", json={"name": "t", "init": "x", "examples": SENTIMENT})
        generate = client.post("/generate", json={"input": "hi", "max_new_tokens": 2})
        listed = client.get("/prompts")
    for answer in (upload, delete, train):
        assert _error(answer) == (403, "admin_disabled")
        assert "SOFTPROMPT_API_KEY" in answer.json()["error"]["message"]
    assert generate.status_code == 200 and listed.status_code == 200


@pytest.mark.parametrize(
    "overrides",
    [{"host": "127.0.0.1"}, {"host": "::1"}, {"host": "localhost"}, {"host": "0.0.0.0", "allow_open_admin": True}],
)
def test_admin_routes_without_a_key_only_on_loopback_or_when_allowed(app_client, overrides):
    with app_client(**overrides) as client:
        upload = client.post("/prompts", data={"name": "p"}, files={"file": ("p.safetensors", _prompt_file())})
    assert upload.status_code == 201, upload.text


def test_a_key_opens_admin_routes_on_a_public_address(app_client):
    with app_client(host="0.0.0.0", api_key="s3cret") as client:
        without = client.post("/prompts", data={"name": "p"}, files={"file": ("p.safetensors", _prompt_file())})
        with_key = client.post(
            "/prompts", data={"name": "p"}, files={"file": ("p.safetensors", _prompt_file())}, headers=KEY
        )
    assert _error(without) == (401, "unauthorized") and with_key.status_code == 201


# ---------------------------------------------------------------- retries
def test_a_retried_prompt_upload_returns_the_first_answer(app_client):
    with app_client() as client:

        def send(key, seed=0, name="p"):
            return client.post(
                "/prompts",
                data={"name": name},
                files={"file": ("p.safetensors", _prompt_file(seed))},
                headers={"Idempotency-Key": key},
            )

        first, retry = send("upload-1"), send("upload-1")
        other_key = send("upload-2")
        reused = send("upload-1", seed=1)
        bad_key = send("not a key with spaces")
        versions = [v["id"] for v in client.get("/prompts").json()["prompts"][0]["versions"]]
    assert first.status_code == retry.status_code == 201
    assert retry.json() == first.json() and first.json()["id"] == "p-v1"
    assert other_key.json()["id"] == "p-v2" and versions == ["p-v1", "p-v2"]
    assert _error(reused) == (422, "idempotency_key_reused") and "p-v1" in reused.json()["error"]["message"]
    assert bad_key.status_code == 422


def test_concurrent_retries_publish_once(app_client):
    from concurrent.futures import ThreadPoolExecutor

    data = _prompt_file()  # built once: seeding torch's global generator in 4 threads at once races
    with app_client() as client:

        def send(_):
            return client.post(
                "/prompts",
                data={"name": "p"},
                files={"file": ("p.safetensors", data)},
                headers={"Idempotency-Key": "same"},
            ).json()["id"]

        with ThreadPoolExecutor(4) as pool:
            ids = list(pool.map(send, range(8)))
        versions = client.get("/prompts").json()["prompts"][0]["versions"]
    assert set(ids) == {"p-v1"} and len(versions) == 1


def test_a_retried_training_submission_returns_the_first_job(app_client, tmp_path):
    with app_client(train_concurrency=1) as client:

        def send(key, steps="1"):
            return client.post(
                "/train",
                files={"file": ("t.jsonl", jsonl(SENTIMENT))},
                data={"name": "senti", "init": "Classify.", "steps": steps},
                headers={"Idempotency-Key": key},
            )

        first, retry, reused = send("job-1"), send("job-1"), send("job-1", steps="2")
        jobs = client.get("/train").json()["jobs"]
        for job in jobs:
            client.post(f"/train/{job['id']}/cancel")
    assert first.status_code == retry.status_code == 202
    assert retry.json()["id"] == first.json()["id"] and len(jobs) == 1
    assert _error(reused) == (422, "idempotency_key_reused")


# ---------------------------------------------------------------- overload
def test_a_full_queue_answers_503_at_once_and_refused_requests_give_their_place_back(app_client):
    with app_client(max_queue=2) as client:
        engine = client.app.state.softprompt.engine
        for _ in range(5):  # refused while building: each gives its place back
            assert client.post("/generate", params={"prompt": "nope"}, json={"input": "hi"}).status_code == 404
        engine.pause()
        for _ in range(2):
            engine.submit(make_job(engine.tokenizer, "x")[0])
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            answer = client.post("/generate", json={"input": "hi"})
            timings.append(time.perf_counter() - started)
            assert _error(answer) == (503, "queue_full") and answer.headers["retry-after"]
        engine.resume()
        while engine.stats()["waiting"]:
            time.sleep(0.01)
        after = client.post("/generate", json={"input": "hi", "max_new_tokens": 2})
    assert sorted(timings)[2] < 0.05
    assert after.status_code == 200


# ---------------------------------------------------------------- leftovers
def test_staging_leftovers_are_collected_at_start(app_client, tmp_path):
    staging = tmp_path / "store" / ".tmp"
    staging.mkdir(parents=True)
    dead = staging / "999999999-abandoned"  # no such pid
    old = staging / f"{os.getpid()}-old"  # a live pid, but older than any publish takes
    fresh = staging / f"{os.getpid()}-fresh"
    for folder in (dead, old, fresh):
        folder.mkdir()
        (folder / "meta.json").write_text("{}")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    with app_client():
        pass
    assert not dead.exists() and not old.exists() and fresh.exists()
