"""The job system over either queue (jobs/queue.py): the same scenarios against the folder queue
and the PostgreSQL queue, each through a JobService with its embedded worker running real job
processes on the tiny model. What only a shared queue does (leases, several workers and
replicas) is in test_jobs_shared.py; a folder queue's restart is below."""

from __future__ import annotations

import json
import os
import signal

import pytest

from jobs import JobNotFoundError, JobState, JobStateError
from prompt_store import open_store
from tests.jobs_helpers import SENTIMENT, job_service, jsonl, running_process, save_tiny_model, wait_until
from trainer.config import TrainConfig

pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def model_folder(frozen, tmp_path_factory):
    return save_tiny_model(frozen, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def service(store_location, tmp_path, model_folder):
    jobs = job_service(store_location, tmp_path / "jobs", model_folder, job_heartbeat_seconds=1, job_lease_seconds=4)
    jobs.start()
    yield jobs
    jobs.stop()


def submit(service, steps: int, name: str = "senti"):
    config = TrainConfig(init_text="Classify the sentiment.", steps=steps, batch_size=2, eval_every=2, warmup_steps=1)
    return service.submit(name, config, jsonl(SENTIMENT), None, num_train_examples=5, num_eval_examples=1)


def finished(service, job_id):
    record = service.get(job_id)
    return record if record.state.finished else None


def test_job_publishes_a_loadable_version(service, store_location, tmp_path):
    job = submit(service, steps=4)
    record = wait_until(lambda: finished(service, job.id))
    assert record.state == JobState.succeeded, record.error
    assert record.version == "senti-v1" and record.step == 4 and record.history
    with open_store(store_location) as store:
        assert store.load("senti").version.meta["training_config"]["steps"] == 4
    assert (tmp_path / "jobs" / job.id / "curve.png").is_file()


def test_jobs_run_one_at_a_time_in_submission_order(service):
    first, second = submit(service, steps=3, name="first"), submit(service, steps=3, name="second")
    assert service.get(second.id).state == JobState.queued
    done = wait_until(lambda: finished(service, second.id))
    assert done.state == JobState.succeeded
    assert service.get(first.id).finished_at <= done.started_at


def test_cancel_stops_a_running_job_and_publishes_nothing(service, store_location):
    assert service.threads_in_use() == 0
    job = submit(service, steps=100_000)
    wait_until(lambda: service.get(job.id).step >= 1)
    assert service.threads_in_use() == service.worker.threads  # what the serving engine leaves free
    service.cancel(job.id)
    record = wait_until(lambda: finished(service, job.id))
    assert record.state == JobState.cancelled
    wait_until(lambda: service.threads_in_use() == 0)
    with open_store(store_location) as store:
        assert store.names() == []
    with pytest.raises(JobStateError):
        service.cancel(job.id)


def test_cancel_of_a_queued_job(service):
    running = submit(service, steps=100_000, name="long")
    queued = submit(service, steps=2, name="never")
    assert service.cancel(queued.id).state == JobState.cancelled
    service.cancel(running.id)
    assert wait_until(lambda: finished(service, running.id)).state == JobState.cancelled


def test_a_killed_job_process_leaves_its_job_failed_and_the_store_intact(service, store_location):
    done = submit(service, steps=2, name="kept")
    wait_until(lambda: finished(service, done.id))
    job = submit(service, steps=100_000, name="doomed")
    wait_until(lambda: service.get(job.id).step >= 1)
    os.kill(running_process(service, job.id).pid, signal.SIGKILL)
    record = wait_until(lambda: finished(service, job.id))
    assert record.state == JobState.failed and "exited with code" in record.error
    with open_store(store_location) as store:
        assert store.names() == ["kept"] and store.load("kept-v1")


def test_history_survives_a_new_service_over_the_same_queue(service, store_location, tmp_path, model_folder):
    done = submit(service, steps=2)
    wait_until(lambda: finished(service, done.id))
    service.stop()
    again = job_service(store_location, tmp_path / "jobs", model_folder)
    again.start()
    try:
        assert again.get(done.id).state == JobState.succeeded and again.get(done.id).version == "senti-v1"
        assert [r.id for r in again.list()] == [done.id]
    finally:
        again.stop()


def test_unknown_job(service):
    with pytest.raises(JobNotFoundError):
        service.get("nope")
    with pytest.raises(JobNotFoundError):
        service.cancel("nope")


def test_a_folder_queue_fails_the_jobs_a_stopped_server_left_running(tmp_path, model_folder):
    root = tmp_path / "jobs"
    first = job_service(tmp_path / "store", root, model_folder)
    first.start()
    done = submit(first, steps=2)
    wait_until(lambda: finished(first, done.id))
    first.stop()
    # Forge what a server crash mid-run leaves: a record still marked running.
    crashed = json.loads((root / done.id / "job.json").read_text()) | {
        "id": "ffffffffffffffff000000",
        "state": "running",
        "version": None,
    }
    (root / crashed["id"]).mkdir()
    (root / crashed["id"] / "job.json").write_text(json.dumps(crashed))

    second = job_service(tmp_path / "store", root, model_folder)
    second.start()
    try:
        assert second.get(done.id).state == JobState.succeeded
        interrupted = second.get(crashed["id"])
        assert interrupted.state == JobState.failed and "interrupted" in interrupted.error
        assert [r.id for r in second.list()] == [crashed["id"], done.id]
    finally:
        second.stop()


def test_a_folder_queue_job_handed_back_runs_again_from_its_own_folder(tmp_path, model_folder):
    first = job_service(tmp_path / "store", tmp_path / "jobs", model_folder, job_max_attempts=2)
    first.start()
    job = submit(first, steps=100_000)
    wait_until(lambda: first.get(job.id).step >= 1)
    first.stop()  # the worker hands the job back: attempts remain, so it waits again
    assert first.get(job.id).state == JobState.queued
    second = job_service(tmp_path / "store", tmp_path / "jobs", model_folder, job_max_attempts=2)
    second.start()
    try:
        again = wait_until(lambda: (r := second.get(job.id)).attempts == 2 and r.step >= 1 and r)
        assert again.state == JobState.running  # the second attempt found the upload where the first did
        second.cancel(job.id)
        assert wait_until(lambda: finished(second, job.id)).state == JobState.cancelled
    finally:
        second.stop()
