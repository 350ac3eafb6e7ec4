"""The job manager: worker processes, cancellation, crashes and restarts (tiny model)."""

from __future__ import annotations

import json
import os
import signal

import pytest

from prompt_store import open_store
from server.jobs import JobManager, JobNotFoundError, JobState, JobStateError
from tests.jobs_helpers import SENTIMENT, jsonl, save_tiny_model, wait_until
from trainer.config import TrainConfig


@pytest.fixture(scope="module")
def model_folder(frozen, tmp_path_factory):
    return save_tiny_model(frozen, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def manager(tmp_path, model_folder):
    jobs = JobManager(tmp_path / "store", model_spec=model_folder, device="cpu", cancel_grace_seconds=20)
    jobs.start()
    yield jobs
    jobs.stop()


def submit(manager, steps: int, name: str = "senti"):
    config = TrainConfig(init_text="Classify the sentiment.", steps=steps, batch_size=2, eval_every=2, warmup_steps=1)
    return manager.submit(name, config, jsonl(SENTIMENT), None, num_train_examples=5, num_eval_examples=1)


def finished(manager, job_id):
    record = manager.get(job_id)
    return record if record.state.finished else None


def test_job_publishes_a_loadable_version(manager, tmp_path):
    job = submit(manager, steps=4)
    record = wait_until(lambda: finished(manager, job.id))
    assert record.state == JobState.succeeded, record.error
    assert record.version == "senti-v1" and record.step == 4 and record.history
    loaded = open_store(tmp_path / "store").load("senti")
    assert loaded.version.meta["training_config"]["steps"] == 4
    assert (tmp_path / "store" / "jobs" / job.id / "curve.png").is_file()


def test_jobs_run_one_at_a_time_in_submission_order(manager):
    first, second = submit(manager, steps=3, name="first"), submit(manager, steps=3, name="second")
    assert manager.get(second.id).state == JobState.queued
    done = wait_until(lambda: finished(manager, second.id))
    assert done.state == JobState.succeeded
    assert manager.get(first.id).finished_at <= done.started_at


def test_cancel_stops_a_running_job_and_publishes_nothing(manager, tmp_path):
    assert manager.threads_in_use() == 0
    job = submit(manager, steps=100_000)
    wait_until(lambda: manager.get(job.id).step >= 1)
    assert manager.threads_in_use() == manager.threads  # what the serving engine leaves free
    manager.cancel(job.id)
    record = wait_until(lambda: finished(manager, job.id))
    assert record.state == JobState.cancelled
    wait_until(lambda: manager.threads_in_use() == 0)
    assert open_store(tmp_path / "store").names() == []
    with pytest.raises(JobStateError):
        manager.cancel(job.id)


def test_cancel_of_a_queued_job(manager):
    running = submit(manager, steps=100_000, name="long")
    queued = submit(manager, steps=2, name="never")
    assert manager.cancel(queued.id).state == JobState.cancelled
    manager.cancel(running.id)
    wait_until(lambda: finished(manager, running.id))


def test_killed_worker_leaves_job_failed_and_store_intact(manager, tmp_path):
    store = open_store(tmp_path / "store")
    done = submit(manager, steps=2, name="kept")
    wait_until(lambda: finished(manager, done.id))
    job = submit(manager, steps=100_000, name="doomed")
    wait_until(lambda: manager.get(job.id).step >= 1)
    os.kill(manager._procs[job.id].pid, signal.SIGKILL)
    record = wait_until(lambda: finished(manager, job.id))
    assert record.state == JobState.failed and "exited with code" in record.error
    assert store.names() == ["kept"] and store.load("kept-v1")


def test_restart_keeps_history_and_fails_interrupted_jobs(tmp_path, model_folder):
    root = tmp_path / "store"
    first = JobManager(root, model_spec=model_folder, device="cpu")
    first.start()
    done = submit(first, steps=2)
    wait_until(lambda: finished(first, done.id))
    first.stop()
    # Forge what a server crash mid-run leaves: a record still marked running.
    job_file = root / "jobs" / done.id / "job.json"
    crashed = json.loads(job_file.read_text()) | {"id": "ffffffffffffffff000000", "state": "running", "version": None}
    (root / "jobs" / crashed["id"]).mkdir()
    (root / "jobs" / crashed["id"] / "job.json").write_text(json.dumps(crashed))

    second = JobManager(root, model_spec=model_folder, device="cpu")
    second.start()
    try:
        assert second.get(done.id).state == JobState.succeeded
        interrupted = second.get(crashed["id"])
        assert interrupted.state == JobState.failed and "interrupted" in interrupted.error
        assert [r.id for r in second.list()] == [crashed["id"], done.id]
    finally:
        second.stop()


def test_unknown_job(manager):
    with pytest.raises(JobNotFoundError):
        manager.get("nope")
