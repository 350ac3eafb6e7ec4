"""The second reliability probe's findings (issue 22), each replayed against the app on both store
backends where the store is involved: invented HTTP methods, seeds at the top of their range,
NUL aliases, reading while deleting, reused Idempotency-Keys, jobs larger than the machine, and
a database that goes away under requests that do not need it."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import save

from jobs.limits import machine_cores
from tests.http_helpers import app_client, mixing, publish  # noqa: F401
from tests.jobs_helpers import SENTIMENT
from tests.test_metrics import scrape

TOP_SEED = 2**64 - 1


def _prompt_file(seed: int = 0, width: int = 64) -> bytes:
    torch.manual_seed(seed)
    return save({"prompt_embeddings": torch.randn(3, width)})


@pytest.fixture
def on_store(app_client, store_location):
    """An app client (tiny model) whose store is a folder or a PostgreSQL database."""
    return lambda **overrides: app_client(store=store_location, **overrides)


# ---------------------------------------------------------------- 1. /metrics stays bounded
def test_invented_http_methods_do_not_grow_metrics(app_client):
    with app_client() as client:
        client.get("/health")
        before = client.get("/metrics").text
        for number in range(40):
            assert client.request(f"FOO{number}", "/health").status_code == 405
        after = scrape(client)
        text = client.get("/metrics").text
    methods = {dict(labels).get("method") for _, labels in after} - {None}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "other"}, methods
    assert (
        after[("softprompt_http_requests_total", (("handler", "/health"), ("method", "other"), ("status", "4xx")))]
        == 40
    )
    assert len(text.splitlines()) - len(before.splitlines()) < 20  # the first `other` adds its few series, once


# ---------------------------------------------------------------- 2. seed + i past 2**64 - 1
def test_n_choices_with_the_largest_seed_are_sampled_not_a_500(app_client):
    body = {
        "model": "tiny-untied",
        "messages": [{"role": "user", "content": "hi"}],
        "n": 3,
        "seed": TOP_SEED,
        "temperature": 0.9,
        "max_tokens": 4,
    }
    with app_client() as client:
        first = client.post("/v1/chat/completions", json=body)
        again = client.post("/v1/chat/completions", json=body)
        wrapped = client.post("/v1/chat/completions", json={**body, "seed": 0, "n": 2})
    assert first.status_code == 200, first.text
    texts = [c["message"]["content"] for c in first.json()["choices"]]
    assert texts == [c["message"]["content"] for c in again.json()["choices"]]  # still reproducible
    assert texts[1:] == [c["message"]["content"] for c in wrapped.json()["choices"]]  # seed + i wraps to 0, 1


# ---------------------------------------------------------------- 3. a NUL alias
@pytest.mark.parametrize("alias", ["%00", "a%00b", "UPPER"])
def test_deleting_an_alias_no_alias_can_have_is_the_same_422_on_both_stores(on_store, alias):
    with on_store() as client:
        answer = client.delete(f"/aliases/{alias}")
        put = client.put(f"/aliases/{alias}", json={"target": "x-v1"})
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_name", answer.text
    assert put.status_code == 422


def test_a_nul_in_any_store_bound_text_is_a_4xx_not_a_database_error(on_store):
    with on_store() as client:
        assert (
            client.post(
                "/prompts", data={"name": "math"}, files={"file": ("p.safetensors", _prompt_file())}
            ).status_code
            == 201
        )
        answers = [
            client.get("/prompts/math%00"),
            client.delete("/prompts/math%00"),
            client.delete("/aliases/pr%00d"),
            client.put("/aliases/prod", json={"target": "math\u0000"}),
            client.post("/generate", params={"prompt": "ma\u0000th"}, json={"input": "x"}),
        ]
    assert all(400 <= a.status_code < 500 for a in answers), [(a.status_code, a.text) for a in answers]


# ---------------------------------------------------------------- 4 and 5. reading and aliasing while deleting
def _race(actions: list, seconds: float = 3.0) -> list[BaseException]:
    """Run each action in a loop on its own thread for `seconds`; every exception raised."""
    stop, failures = threading.Event(), []

    def loop(action):
        while not stop.is_set():
            try:
                action()
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                failures.append(exc)
                stop.set()

    threads = [threading.Thread(target=loop, args=(action,)) for action in actions]
    for thread in threads:
        thread.start()
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join(30)
    return failures


def test_listing_prompts_while_their_last_version_is_deleted_never_fails(on_store):
    with on_store() as client:

        def cycle():
            for _ in range(3):
                up = client.post("/prompts", data={"name": "churn"}, files={"file": ("p.safetensors", _prompt_file())})
                assert up.status_code == 201, up.text
                gone = client.delete("/prompts/churn")
                assert gone.status_code == 200, gone.text

        def read():
            for path in ("/prompts", "/v1/models", "/prompts/churn"):
                answer = client.get(path)
                assert answer.status_code in (200, 404), (path, answer.status_code, answer.text)

        assert _race([cycle, read, read, read]) == []


def test_deletes_and_alias_moves_racing_leave_no_500_and_no_alias_on_a_deleted_version(on_store, tmp_path):
    with on_store() as client:

        def upload(name):
            answer = client.post("/prompts", data={"name": name}, files={"file": ("p.safetensors", _prompt_file())})
            assert answer.status_code == 201, answer.text
            return answer.json()["id"]

        keep = upload("keep")

        def delete_cycle():
            upload("victim")
            answer = client.delete("/prompts/victim", params={"force": "true"})
            assert answer.status_code in (200, 404), answer.text

        def alias_moves():
            for alias in ("prod", "canary"):
                answer = client.put(f"/aliases/{alias}", json={"target": "victim"})
                assert answer.status_code in (200, 404), answer.text
                client.put(f"/aliases/{alias}", json={"target": keep})

        def aliases_point_at_live_versions():
            listing = client.get("/prompts")
            assert listing.status_code == 200, listing.text

        assert _race([delete_cycle, delete_cycle, alias_moves, aliases_point_at_live_versions]) == []
        listing = client.get("/prompts").json()
        live = {v["id"] for p in listing["prompts"] for v in p["versions"]}
        assert set(listing["aliases"].values()) <= live, listing["aliases"]
        for alias in listing["aliases"]:
            assert (
                client.post("/generate", params={"prompt": alias}, json={"input": "x", "max_new_tokens": 1}).status_code
                == 200
            )


# ---------------------------------------------------------------- 6. an Idempotency-Key answers one request
def test_an_idempotency_key_reused_for_another_name_is_refused_on_both_stores(on_store):
    key = {"Idempotency-Key": "same-key"}
    data = _prompt_file()
    with on_store() as client:
        first = client.post("/prompts", data={"name": "a"}, files={"file": ("p.safetensors", data)}, headers=key)
        other_name = client.post("/prompts", data={"name": "b"}, files={"file": ("p.safetensors", data)}, headers=key)
        retry = client.post("/prompts", data={"name": "a"}, files={"file": ("p.safetensors", data)}, headers=key)
        names = [p["name"] for p in client.get("/prompts").json()["prompts"]]
    assert first.status_code == 201
    assert other_name.status_code == 422 and other_name.json()["error"]["code"] == "idempotency_key_reused"
    assert retry.status_code == 201 and retry.json()["id"] == first.json()["id"]
    assert names == ["a"]


def test_a_training_idempotency_key_reused_for_another_name_is_refused(app_client):
    key = {"Idempotency-Key": "train-key"}
    body = {"init": "Classify the sentiment.", "steps": 1, "examples": SENTIMENT}
    with app_client() as client:
        first = client.post("/train", json={**body, "name": "a"}, headers=key)
        other = client.post("/train", json={**body, "name": "b"}, headers=key)
        client.post(f"/train/{first.json()['id']}/cancel")
    assert first.status_code == 202
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"


# ---------------------------------------------------------------- 7. jobs larger than the machine
CORES = f"at most {machine_cores():,} on this server (the machine's cores)"


@pytest.mark.parametrize(
    "fields, field, says",
    [  # past what any machine runs is past this server's bound too: the answer names this server's
        ({"steps": 10_000_000_000}, "steps", "at most 100,000 on this server (SOFTPROMPT_MAX_TRAIN_STEPS)"),
        ({"steps": 100_001}, "steps", "at most 100,000 on this server (SOFTPROMPT_MAX_TRAIN_STEPS)"),
        ({"max_new_tokens": 1_000_000_000}, "max_new_tokens", "at most 64 on this server (SOFTPROMPT_MAX_NEW"),
        ({"max_new_tokens": 65}, "max_new_tokens", "at most 64 on this server (SOFTPROMPT_MAX_NEW_TOKENS_LIMIT)"),
        ({"init": "x" * 1_000_000}, "init_text", "the limit is 4000"),
        ({"init": "word " * 600}, "init_text", "at most 512 (one vector per token)"),  # 3,000 characters, 600 tokens
        ({"processes": 64, "config": {"batch_size": 64}}, "processes", "at most 2 on this server (SOFTPROMPT_MAX_"),
        ({"config": {"batch_size": 100_000}}, "batch_size", "at most 256 on this server"),
        ({"config": {"threads": 4096}}, "threads", CORES),
        ({"config": {"max_input_tokens": 1_000_000}}, "max_input_tokens", "at most 131,072"),
    ],
)
def test_training_jobs_beyond_what_this_server_can_run_are_refused_with_the_limit(app_client, fields, field, says):
    body = {"name": "big", "init": "Classify the sentiment.", "examples": SENTIMENT, **fields}
    with app_client(max_train_processes=2) as client:
        answer = client.post("/train", json=body)
        jobs = client.get("/train").json()["jobs"]
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_training_config" and error["field"] == field, error
    assert says in error["message"], error["message"]
    assert jobs == []


def test_evaluations_are_bounded_by_this_servers_generation_limit(app_client):
    with app_client() as client:
        answer = client.post("/eval", json={"examples": SENTIMENT, "bare": True, "max_new_tokens": 65})
    assert answer.status_code == 422 and "from 1 to 64" in answer.json()["error"]["message"]


# ---------------------------------------------------------------- 8. the database goes away
def test_requests_that_need_no_store_never_wait_for_a_database_that_went_away(app_client, mixing, own_postgres):
    url = own_postgres.create_database()
    publish(url, mixing, "math")
    with app_client(store=url) as client:
        assert (
            client.post("/generate", params={"prompt": "math"}, json={"input": "x", "max_new_tokens": 1}).status_code
            == 200
        )
        own_postgres.stop("immediate")
        timings, answers = {}, {}

        def timed(label, **request):
            started = time.perf_counter()
            answers[label] = client.post("/generate", **request)
            timings[label] = time.perf_counter() - started

        # the unknown prompt's resolution meets the outage first; the bare requests go beside it
        calls = [
            threading.Thread(
                target=timed, args=("unknown",), kwargs={"params": {"prompt": "other"}, "json": {"input": "x"}}
            )
        ]
        calls += [
            threading.Thread(target=timed, args=(f"bare{i}",), kwargs={"json": {"input": "x", "max_new_tokens": 1}})
            for i in range(3)
        ]
        for call in calls:
            call.start()
            time.sleep(0.02)
        for call in calls:
            call.join(30)
        loaded = client.post("/generate", params={"prompt": "math"}, json={"input": "y", "max_new_tokens": 1})
    assert answers["unknown"].status_code == 503 and answers["unknown"].json()["error"]["code"] == "store_unavailable"
    assert timings["unknown"] < 2.0, timings
    for i in range(3):
        assert answers[f"bare{i}"].status_code == 200 and timings[f"bare{i}"] < 1.0, timings
    assert loaded.status_code == 200  # a prompt already loaded keeps serving through the outage
