"""Two replicas on one PostgreSQL database over HTTP: a job submitted on one is followed and
cancelled on the other; restarting one leaves the other's running job alone (tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from prompt_store import open_store
from server.app import create_app
from server.settings import Settings
from tests.jobs_helpers import SENTIMENT, save_tiny_model, wait_until

pytestmark = pytest.mark.processes

LEASE, HEARTBEAT = 4.0, 1.0


@pytest.fixture(scope="module")
def model_folder(frozen, tmp_path_factory):
    return save_tiny_model(frozen, tmp_path_factory.mktemp("tiny-model"))


def replica(frozen, model_folder, database_url, folder: Path, worker_jobs: str) -> TestClient:
    settings = Settings(
        model=model_folder,
        store=database_url,
        jobs_dir=folder,
        worker_jobs=worker_jobs,
        job_lease_seconds=LEASE,
        job_heartbeat_seconds=HEARTBEAT,
    )
    return TestClient(create_app(settings, frozen=frozen))


def train_body(name: str, steps: int) -> dict:
    return {
        "name": name,
        "init": "Classify the sentiment.",
        "steps": steps,
        "examples": SENTIMENT[:5],
        "eval_examples": SENTIMENT[5:],
        "config": {"batch_size": 2, "eval_every": 2, "warmup_steps": 1},
    }


def job_state(client: TestClient, job_id: str, kind: str = "train") -> dict:
    answer = client.get(f"/{kind}/{job_id}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def sse_events(client: TestClient, path: str, count: int) -> list[tuple[str, dict]]:
    """The first `count` events of a stream (fewer if it ends)."""
    events, name = [], None
    with client.stream("GET", path) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line.split(":", 1)[1])))
                if len(events) == count or name == "end":
                    break
    return events


def test_a_job_submitted_on_a_is_followed_and_cancelled_on_b(frozen, model_folder, database_url, tmp_path):
    with (
        replica(frozen, model_folder, database_url, tmp_path / "a", "train,eval") as a,
        replica(frozen, model_folder, database_url, tmp_path / "b", "none") as b,
    ):
        submitted = a.post("/train", json=train_body("followed", steps=100_000))
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        assert [j["id"] for j in b.get("/train").json()["jobs"]] == [job_id]
        wait_until(lambda: job_state(b, job_id)["step"] >= 2)
        events = sse_events(b, f"/train/{job_id}/events", count=3)
        steps = [data["step"] for _, data in events]
        assert [name for name, _ in events] == ["progress"] * 3 and steps == sorted(steps) and steps[-1] > steps[0]
        assert len(b.get(f"/train/{job_id}/curve").json()["history"]) >= 2
        assert b.get(f"/train/{job_id}/curve.png").content.startswith(b"\x89PNG")

        cancelled = b.post(f"/train/{job_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        end = sse_events(b, f"/train/{job_id}/events", count=1000)[-1]
        assert end[0] == "end" and end[1]["state"] == "cancelled"
        assert job_state(a, job_id)["state"] == "cancelled"
        assert b.post(f"/train/{job_id}/cancel").status_code == 409
        with open_store(database_url) as store:
            assert store.names() == []  # a cancelled job publishes nothing

        # an evaluation asked of the serving-only replica runs on A's embedded worker, through A's engine
        asked = b.post("/eval", json={"examples": SENTIMENT, "bare": True})
        assert asked.status_code == 202, asked.text
        evaluated = wait_until(
            lambda: (body := job_state(b, asked.json()["id"], "eval"))["state"] in ("succeeded", "failed") and body
        )
        assert evaluated["state"] == "succeeded", evaluated["error"]
        assert evaluated["table"]["results"][0]["n"] == len(SENTIMENT)


def test_restarting_b_leaves_the_job_on_as_worker_running(frozen, model_folder, database_url, tmp_path):
    with replica(frozen, model_folder, database_url, tmp_path / "a", "train,eval") as a:
        job_id = a.post("/train", json=train_body("steady", steps=800)).json()["id"]  # ~10 s on the tiny model
        running = wait_until(lambda: (body := job_state(a, job_id))["step"] >= 2 and body)
        for _ in range(2):  # B (with a worker of its own) starts and stops twice while A's worker trains
            with replica(frozen, model_folder, database_url, tmp_path / "b", "train,eval") as b:
                during = job_state(b, job_id)
                assert during["state"] == "running" and during["worker"] == running["worker"]
        after = job_state(a, job_id)
        assert after["state"] == "running" and after["worker"] == running["worker"] and after["attempts"] == 1
        done = wait_until(lambda: (body := job_state(a, job_id))["state"] != "running" and body, timeout=300)
        assert done["state"] == "succeeded" and done["attempts"] == 1 and done["version"] == "steady-v1", done["error"]
        assert done["step"] == 800


def test_hostile_job_ids_and_texts_get_4xx_from_a_database_replica(frozen, model_folder, database_url, tmp_path):
    with replica(frozen, model_folder, database_url, tmp_path / "a", "none") as client:
        assert client.get("/train/abc%00def").status_code == 404
        assert client.post("/train/abc%00def/cancel").status_code == 404
        assert client.get("/eval/abc%00def").status_code == 404
        bad_init = client.post("/train", json={**train_body("nul", 3), "init": "Classify\u0000 it."})
        assert bad_init.status_code == 422 and "NUL" in bad_init.json()["error"]["message"]
        bad_text = client.post("/eval", json={"examples": SENTIMENT, "texts": ["a\u0000b"]})
        assert bad_text.status_code == 422 and "NUL" in bad_text.json()["error"]["message"]
        odd_name = client.post("/eval", json={"examples": SENTIMENT, "bare": True, "data_name": "x\u0000y"})
        assert odd_name.status_code == 202, odd_name.text  # a label only: kept with U+FFFD in the NUL's place
        assert client.get(f"/eval/{odd_name.json()['id']}").json()["config"]["data"]["name"] == "x\ufffdy"
