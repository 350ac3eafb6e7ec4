"""Training jobs through HTTP on the tiny model: upload -> job -> published -> served."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.jobs_helpers import SENTIMENT, jsonl, save_tiny_model, wait_until

pytestmark = pytest.mark.processes

INIT = "Classify the sentiment."


@pytest.fixture(scope="module")
def model_folder(frozen, tmp_path_factory):
    return save_tiny_model(frozen, tmp_path_factory.mktemp("tiny-model"))


def make_client(frozen, model_folder, store_root, **settings) -> TestClient:
    app = create_app(Settings(model=model_folder, store=store_root, **settings), frozen=frozen)
    return TestClient(app)


@pytest.fixture
def client(frozen, model_folder, tmp_path):
    with make_client(frozen, model_folder, tmp_path / "store", max_upload_bytes=4096) as client:
        yield client


def upload(client, rows=SENTIMENT, **fields):
    data = {"name": "senti", "init": INIT, "steps": "4", **fields}
    return client.post("/train", files={"file": ("train.jsonl", jsonl(rows), "application/jsonl")}, data=data)


def finished_job(client, job_id):
    body = client.get(f"/train/{job_id}").json()
    return body if body["state"] in ("succeeded", "failed", "cancelled") else None


def test_upload_trains_publishes_and_generate_uses_it(client):
    answer = upload(client)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    job = wait_until(lambda: finished_job(client, job_id))
    assert job["state"] == "succeeded", job["error"]
    assert job["version"] == "senti-v1" and job["step"] == job["total"] == 4 and job["loss"] is not None
    generated = client.post(
        "/generate", params={"prompt": "senti"}, json={"input": "A wonderful film.", "max_new_tokens": 4}
    )
    assert generated.status_code == 200, generated.text
    assert generated.json()["prompt"] == "senti-v1"
    assert client.get("/prompts/senti").json()["meta"]["training_config"]["init_text"] == INIT
    listed = client.get("/train").json()["jobs"]
    assert [j["id"] for j in listed] == [job_id]
    png = client.get(f"/train/{job_id}/curve.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert len(client.get(f"/train/{job_id}/curve").json()["history"]) == 4


def test_json_body_with_examples_is_accepted(client):
    answer = client.post("/train", json={"name": "viajson", "init": INIT, "steps": 2, "examples": SENTIMENT})
    assert answer.status_code == 202, answer.text
    job = wait_until(lambda: finished_job(client, answer.json()["id"]))
    assert job["state"] == "succeeded" and job["version"] == "viajson-v1"


def test_events_stream_progress_until_the_end(client):
    job_id = upload(client).json()["id"]
    with client.stream("GET", f"/train/{job_id}/events") as stream:
        lines = [line for line in stream.iter_lines() if line.startswith(("event:", "data:"))]
    events = [line.split(":", 1)[1].strip() for line in lines if line.startswith("event:")]
    assert events[0] == "progress" and events[-1] == "end"
    final = json.loads(lines[-1].split(":", 1)[1])
    assert final["state"] == "succeeded"


@pytest.mark.parametrize(
    ("rows", "fields", "status", "needle"),
    [
        (SENTIMENT[:2] + [{"input": "x"}], {}, 422, "line 3: missing field 'output'"),
        (SENTIMENT[:2] + [{"input": "x", "output": " "}], {}, 422, "line 3: field 'output' is empty"),
        (SENTIMENT, {"steps": "0"}, 422, "steps"),
        (SENTIMENT, {"lr": "fast"}, 422, "lr"),
        (SENTIMENT, {"min_cosine": "1.5"}, 422, "min_cosine"),
        (SENTIMENT, {"name": "../evil"}, 422, "Invalid prompt name"),
        (SENTIMENT, {"init": ""}, 422, "init"),
        (SENTIMENT, {"processes": "0"}, 422, "processes"),
        (SENTIMENT, {"processes": "two"}, 422, "processes"),
        (SENTIMENT, {"processes": "9", "config": '{"batch_size": 8}'}, 422, "at most batch_size"),
        (SENTIMENT * 40, {}, 413, "limit"),
    ],
)
def test_bad_uploads_get_clear_errors_and_no_job(client, rows, fields, status, needle):
    answer = upload(client, rows, **fields)
    assert answer.status_code == status, answer.text
    assert needle in answer.json()["error"]["message"]
    assert client.get("/train").json()["jobs"] == []


def test_malformed_json_line_is_reported_with_its_number(client):
    data = jsonl(SENTIMENT[:3]) + b"{not json}\n"
    answer = client.post("/train", files={"file": ("t.jsonl", data)}, data={"name": "s", "init": INIT})
    assert answer.status_code == 422 and "line 4: not valid JSON" in answer.json()["error"]["message"]
    assert answer.json()["error"]["code"] == "invalid_training_data"


def test_records_holding_raw_unicode_line_separators_are_accepted(client):
    rows = [{**row, "input": row["input"] + "\u2028and\x85more"} for row in SENTIMENT]
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    answer = client.post("/train", files={"file": ("t.jsonl", data)}, data={"name": "s", "init": INIT, "steps": "1"})
    assert answer.status_code == 202, answer.text
    job = wait_until(lambda: finished_job(client, answer.json()["id"]))
    assert job["state"] == "succeeded", job["error"]


def test_missing_file_field(client):
    answer = client.post("/train", data={"name": "s", "init": INIT}, files={"other": ("x", b"")})
    assert answer.status_code == 422 and "'file'" in answer.json()["error"]["message"]


def test_cancel_over_http_publishes_nothing(client):
    job_id = upload(client, steps="100000").json()["id"]
    wait_until(lambda: client.get(f"/train/{job_id}").json()["step"] >= 1)
    assert client.post(f"/train/{job_id}/cancel").status_code == 200
    job = wait_until(lambda: finished_job(client, job_id))
    assert job["state"] == "cancelled" and job["version"] is None
    assert "senti" not in [prompt["name"] for prompt in client.get("/prompts").json()["prompts"]]
    again = client.post(f"/train/{job_id}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_state_conflict"


def test_generation_keeps_working_while_a_job_runs(client):
    job_id = upload(client, steps="100000").json()["id"]
    wait_until(lambda: client.get(f"/train/{job_id}").json()["state"] == "running")
    for _ in range(3):
        answer = client.post("/generate", json={"input": "hello", "max_new_tokens": 3})
        assert answer.status_code == 200, answer.text
    client.post(f"/train/{job_id}/cancel")
    wait_until(lambda: finished_job(client, job_id))


def test_engine_leaves_a_running_job_its_threads(frozen, model_folder, tmp_path):
    with make_client(frozen, model_folder, tmp_path / "store", threads=2, train_threads=1) as client:

        def engine_threads() -> int:
            assert client.post("/generate", json={"input": "hello", "max_new_tokens": 2}).status_code == 200
            return client.get("/stats").json()["engine"]["threads"]

        assert engine_threads() == 2
        job_id = upload(client, steps="100000").json()["id"]
        wait_until(lambda: client.get(f"/train/{job_id}").json()["state"] == "running")
        assert engine_threads() == 1  # 2 cores' worth: one for the worker, one for serving
        client.post(f"/train/{job_id}/cancel")
        wait_until(lambda: finished_job(client, job_id))
        wait_until(lambda: engine_threads() == 2)


def test_unknown_job_is_404(client):
    answer = client.get("/train/does-not-exist")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "job_not_found"


def test_restart_keeps_job_history(frozen, model_folder, tmp_path):
    root = tmp_path / "store"
    with make_client(frozen, model_folder, root) as client:
        job_id = upload(client, steps="2").json()["id"]
        wait_until(lambda: finished_job(client, job_id))
    with make_client(frozen, model_folder, root) as client:
        job = client.get(f"/train/{job_id}").json()
        assert job["state"] == "succeeded" and job["version"] == "senti-v1"


def test_train_routes_need_the_api_key_when_set(frozen, model_folder, tmp_path):
    with make_client(frozen, model_folder, tmp_path / "store", api_key="s3cret") as client:
        assert upload(client).status_code == 401
        answer = client.post(
            "/train",
            files={"file": ("t.jsonl", jsonl(SENTIMENT))},
            data={"name": "senti", "init": INIT, "steps": "2"},
            headers={"Authorization": "Bearer s3cret"},
        )
        assert answer.status_code == 202
        wait_until(lambda: finished_job(client, answer.json()["id"]))


ARITHMETIC = [
    {"input": f"Compute {a} + {b}.", "output": str(a + b)}
    for a, b in ((3, 4), (10, 5), (7, 7), (21, 1), (9, 30), (12, 12))
]


def test_a_generation_task_trains_and_publishes_over_http(client):
    answer = upload(
        client,
        rows=ARITHMETIC,
        name="math",
        init="Answer with the number only.",
        task="generation",
        max_new_tokens="6",
        config=json.dumps({"eval_every": 2}),
    )
    assert answer.status_code == 202, answer.text
    assert answer.json()["config"]["task"] == "generation" and answer.json()["config"]["max_new_tokens"] == 6
    job = wait_until(lambda: finished_job(client, answer.json()["id"]))
    assert job["state"] == "succeeded", job["error"]
    assert job["version"] == "math-v1" and job["metrics"]["task"] == "generation"
    assert job["metrics"]["metric_name"] == "exact_match"
    meta = client.get("/prompts/math-v1").json()["meta"]
    assert meta["training_config"]["task"] == "generation" and meta["training_config"]["max_new_tokens"] == 6
    bad = upload(client, rows=ARITHMETIC, task="translation")
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "task"


def test_a_training_job_publishes_to_a_database_store(frozen, model_folder, tmp_path, database_url):
    """The worker process publishes through the URL: a replica needs nothing but the database."""
    with make_client(frozen, model_folder, database_url, jobs_dir=tmp_path / "jobs") as client:
        job_id = upload(client).json()["id"]
        job = wait_until(lambda: finished_job(client, job_id))
        assert job["state"] == "succeeded", job["error"]
        assert (
            client.post("/generate", params={"prompt": "senti"}, json={"input": "Fine.", "max_new_tokens": 2}).json()[
                "prompt"
            ]
            == "senti-v1"
        )
    assert (
        "postgresql://" not in (tmp_path / "jobs" / job_id / "request.json").read_text()
    )  # a URL may carry a password
