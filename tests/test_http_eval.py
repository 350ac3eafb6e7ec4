"""Evaluation jobs over HTTP: submit, follow, read the table, cancel, restart, bad input."""

from __future__ import annotations

import json

import pytest

from prompt_store import open_store
from tests.eval_helpers import ROWS, jsonl, publish_random
from tests.http_helpers import app_client, mixing, parse_sse  # noqa: F401
from tests.jobs_helpers import wait_until
from trainer.stats import mcnemar_exact


@pytest.fixture
def versions(mixing, tmp_path):
    store = open_store(tmp_path / "store")
    publish_random(store, mixing, "senti", seed=1)
    publish_random(store, mixing, "senti", seed=2)
    return store


def submit(client, rows=ROWS, prompts=("senti-v1", "senti-v2"), **fields):
    data = {"prompt": list(prompts), **fields}
    return client.post("/eval", files={"file": ("test.jsonl", jsonl(rows), "application/jsonl")}, data=data)


def finished(client, job_id):
    body = client.get(f"/eval/{job_id}").json()
    return body if body["state"] in ("succeeded", "failed", "cancelled") else None


def test_eval_job_scores_versions_and_keeps_the_result_with_them(app_client, versions):
    with app_client() as client:
        answer = submit(client, text=["Classify it."], bare="true")
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        job = wait_until(lambda: finished(client, job_id))
        assert job["state"] == "succeeded", job["error"]
        table = job["table"]
        assert [r["reference"] for r in table["results"]] == ["senti-v1", "senti-v2", "text: Classify it.", "(bare)"]
        assert job["step"] == job["total"] == 4 * 5  # 40 examples in chunks of 8, four references
        rows = table["examples"]
        assert (
            len(rows) == len(ROWS) and table["data"]["examples"] == len(ROWS) and table["data"]["name"] == "test.jsonl"
        )
        for result in table["results"]:
            assert result["correct"] == sum(row["correct"][result["reference"]] for row in rows)
        assert any(c["only_a"] + c["only_b"] for c in table["comparisons"])
        for pair in table["comparisons"]:
            a = [row["correct"][pair["a"]] for row in rows]
            b = [row["correct"][pair["b"]] for row in rows]
            assert (pair["only_a"], pair["only_b"]) == (
                sum(x > y for x, y in zip(a, b)),
                sum(y > x for x, y in zip(a, b)),
            )
            assert pair["p_value"] == pytest.approx(mcnemar_exact(pair["only_a"], pair["only_b"]))
        short = client.get(f"/eval/{job_id}", params={"examples": "false"}).json()["table"]
        assert "examples" not in short and short["results"] == table["results"]
        assert job["metrics"]["results"] == table["results"]  # the listing carries the summary
        shown = client.get("/prompts/senti-v2").json()
        [kept] = shown["evaluations"]
        assert kept["score"] == table["results"][1]["score"] and kept["data"]["sha256"] == table["data"]["sha256"]
        assert kept["source"] == f"eval job {job_id}" and kept["at"]
        assert client.get("/prompts/senti-v1").json()["evaluations"][0]["score"] == table["results"][0]["score"]
        assert [j["id"] for j in client.get("/eval").json()["jobs"]] == [job_id]
        assert client.get("/train").json()["jobs"] == []  # the kinds are listed apart
        assert client.get(f"/train/{job_id}").status_code == 404
        with client.stream("GET", f"/eval/{job_id}/events") as stream:
            events = parse_sse("".join(stream.iter_text()))
        assert events[-1][0] == "end" and events[-1][1]["state"] == "succeeded"


def test_json_body_and_an_idempotent_retry(app_client, versions):
    body = {"examples": ROWS[:8], "prompts": ["senti"], "bare": True, "data_name": "eight"}
    with app_client() as client:
        first = client.post("/eval", json=body, headers={"Idempotency-Key": "k1"})
        again = client.post("/eval", json=body, headers={"Idempotency-Key": "k1"})
        assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
        job = wait_until(lambda: finished(client, first.json()["id"]))
        assert job["state"] == "succeeded" and job["table"]["results"][0]["version"] == "senti-v2"
        assert job["table"]["data"]["name"] == "eight"


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "needle"),
    [
        (dict(rows=[ROWS[0], {"input": "no output"}]), 422, "invalid_eval_data", "line 2"),
        (dict(prompts=()), 422, "invalid_eval_request", "nothing to score"),
        (dict(prompts=("nope",)), 404, "prompt_not_found", "nope"),
        (dict(task="regression"), 422, "invalid_eval_request", "task"),
        (dict(max_new_tokens="0"), 422, "invalid_eval_request", "max_new_tokens"),
        (dict(max_new_tokens="many"), 422, "invalid_eval_request", "max_new_tokens"),
        (
            dict(rows=[r for r in ROWS if r["output"] == "positive"], task="classification"),
            422,
            "invalid_eval_request",
            "at least 2 labels",
        ),
    ],
)
def test_bad_requests_are_refused_before_a_job_exists(app_client, versions, kwargs, status, code, needle):
    with app_client() as client:
        answer = submit(client, **kwargs)
        assert answer.status_code == status, answer.text
        error = answer.json()["error"]
        assert error["code"] == code and needle in error["message"]
        assert client.get("/eval").json()["jobs"] == []


def test_records_holding_raw_unicode_line_separators_are_scored_whole(app_client, versions):
    rows = [{**row, "input": row["input"] + "\u2028and\x85more"} for row in ROWS]
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    with app_client() as client:
        answer = client.post(
            "/eval", files={"file": ("t.jsonl", data, "application/jsonl")}, data={"prompt": ["senti-v1"]}
        )
        assert answer.status_code == 202, answer.text
        job = wait_until(lambda: finished(client, answer.json()["id"]))
        assert job["state"] == "succeeded", job["error"]
        assert [row["input"] for row in job["table"]["examples"]] == [row["input"] for row in rows]


def test_other_bad_bodies(app_client, versions):
    with app_client() as client:
        assert client.post("/eval", content=b"x", headers={"content-type": "text/plain"}).status_code == 422
        assert client.post("/eval", json={"prompts": ["senti"]}).status_code == 422
        assert client.post("/eval", json={"examples": ROWS, "prompts": "senti"}).status_code == 422
        for body in (
            {"bare": True, "max_new_tokens": 1e400},
            {"bare": True, "max_new_tokens": True},
            {"bare": True, "max_new_tokens": 2.5},
            {"bare": "yes"},
            {"texts": ["\ud800"]},
        ):
            answer = client.post(
                "/eval",
                content=json.dumps({"examples": ROWS, **body}).replace('"\\\\ud800"', '"\\ud800"'),
                headers={"content-type": "application/json"},
            )
            assert answer.status_code == 422, (body, answer.text)
        not_objects = client.post("/eval", json={"examples": [1], "bare": True})
        assert not_objects.status_code == 422 and not_objects.json()["error"]["code"] == "invalid_eval_data"
        bad_utf8 = client.post(
            "/eval", files={"file": ("t.jsonl", b"\xff\xfe", "application/jsonl")}, data={"bare": "1"}
        )
        assert bad_utf8.status_code == 422 and bad_utf8.json()["error"]["code"] == "invalid_eval_data"
        assert client.get("/eval/nope").status_code == 404
        assert client.post("/eval/nope/cancel").status_code == 404


NUMBERS = [{"input": f"question {i}", "output": str(i)} for i in range(20)]  # a generation task


@pytest.mark.parametrize("rows", [ROWS, NUMBERS], ids=["label-scoring", "generation"])
def test_a_running_eval_job_can_be_cancelled(app_client, versions, rows):
    with app_client() as client:
        engine = client.app.state.softprompt.engine
        engine.pause()  # the job's first batch waits for the engine
        job_id = submit(client, rows=rows).json()["id"]
        wait_until(lambda: client.get(f"/eval/{job_id}").json()["state"] == "running")
        assert client.post(f"/eval/{job_id}/cancel").status_code == 200
        job = wait_until(lambda: finished(client, job_id))
        engine.resume()
        assert job["state"] == "cancelled" and job["table"] is None
        assert client.get("/prompts/senti-v1").json()["evaluations"] == []  # nothing recorded
        assert client.post(f"/eval/{job_id}/cancel").status_code == 409
        served = client.post("/generate", json={"input": "still serving", "max_new_tokens": 2})
        assert served.status_code == 200
        wait_until(lambda: engine.stats()["running"] == engine.stats()["waiting"] == 0)  # nothing of the job is left


def test_eval_jobs_survive_a_restart_like_training_jobs(app_client, versions):
    with app_client() as client:
        client.app.state.softprompt.engine.pause()
        running = submit(client).json()["id"]
        wait_until(lambda: client.get(f"/eval/{running}").json()["state"] == "running")
        queued = submit(client, prompts=("senti-v1",)).json()["id"]
        assert client.get(f"/eval/{queued}").json()["state"] == "queued"
    with app_client() as client:  # the same store: the queued job runs, the interrupted one says why
        job = wait_until(lambda: finished(client, queued))
        assert job["state"] == "succeeded" and [r["reference"] for r in job["table"]["results"]] == ["senti-v1"]
        interrupted = client.get(f"/eval/{running}").json()
        assert interrupted["state"] == "failed" and "interrupted" in interrupted["error"]


def test_generated_answers_are_what_generate_serves(app_client, versions):
    rows = [{"input": f"question {i}: add {i} and {i + 1}", "output": str(2 * i + 1)} for i in range(12)]
    with app_client() as client:
        job_id = submit(client, rows=rows, prompts=("senti-v1",), bare="true", max_new_tokens="5").json()["id"]
        job = wait_until(lambda: finished(client, job_id))
        assert job["state"] == "succeeded", job["error"]
        table = job["table"]
        assert table["task"] == "generation" and table["metric"] == "exact_match" and table["max_new_tokens"] == 5
        predicted = [row["predicted"] for row in table["examples"]]
        assert any(p["senti-v1"] != p["(bare)"] for p in predicted)
        for row in table["examples"]:  # the job's answers are the served answers, greedy, same length
            body = {"input": row["input"], "max_new_tokens": 5}
            assert (
                row["predicted"]["senti-v1"]
                == client.post("/generate", params={"prompt": "senti-v1"}, json=body).json()["text"]
            )
            assert row["predicted"]["(bare)"] == client.post("/generate", json=body).json()["text"]
