"""Jobs in the shared PostgreSQL database: workers on other processes, leases, several replicas.

Real PostgreSQL (started by the suite), real `softprompt worker` processes, the tiny model.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from devtools.local_servers import start_worker
from jobs import JobNotFoundError, JobState, JobStateError
from jobs.postgres_queue import PostgresQueue, lease_held
from jobs.queue import new_job_id
from jobs.records import JobRecord
from prompt_store import IdempotencyKeyReusedError, open_store
from tests.jobs_helpers import SENTIMENT, job_service, jsonl, save_tiny_model, wait_until
from trainer.config import TrainConfig

pytestmark = pytest.mark.processes

LEASE, HEARTBEAT = 4.0, 1.0
FAST_LEASES = {"SOFTPROMPT_JOB_LEASE_SECONDS": str(LEASE), "SOFTPROMPT_JOB_HEARTBEAT_SECONDS": str(HEARTBEAT)}


@pytest.fixture(scope="module")
def model_folder(frozen, tmp_path_factory):
    return save_tiny_model(frozen, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def serving_only(database_url, tmp_path, model_folder):
    """A replica's job manager with no embedded worker: it submits, follows and reaps."""
    manager = job_service(
        database_url,
        tmp_path / "replica-jobs",
        model_folder,
        worker_jobs="none",
        job_heartbeat_seconds=HEARTBEAT,
        job_lease_seconds=LEASE,
    )
    manager.start()
    yield manager
    manager.stop()


@pytest.fixture
def workers(database_url, model_folder, tmp_path):
    """Starts `softprompt worker` processes; kills whatever is left at the end."""
    started: list = []

    def start(name: str, **env):
        process = start_worker(database_url, tmp_path / name, model=model_folder, env={**FAST_LEASES, **env})
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except Exception:
                process.kill()


def submit(manager, name: str, steps: int, **kwargs):
    config = TrainConfig(init_text="Classify the sentiment.", steps=steps, batch_size=2, eval_every=2, warmup_steps=1)
    return manager.submit(name, config, jsonl(SENTIMENT), None, num_train_examples=5, num_eval_examples=1, **kwargs)


def finished(manager, job_id):
    record = manager.get(job_id)
    return record if record.state.finished else None


def claims_in(log: Path) -> list[str]:
    return [
        line.split("job ", 1)[1].split()[0] for line in log.read_text().splitlines() if " claimed by worker " in line
    ]


def test_concurrent_claims_take_each_job_exactly_once(database_url):
    tables = [PostgresQueue(database_url) for _ in range(4)]
    try:
        ids = [
            tables[0]
            .submit(JobRecord(id=new_job_id(), name=f"job{i}"), {}, train_data=b"", eval_data=None, max_attempts=1)
            .id
            for i in range(24)
        ]
        taken: list[tuple[str, str]] = []
        start = threading.Barrier(len(tables))

        def take(table: PostgresQueue, worker: str) -> None:
            start.wait()
            while (claimed := table.claim(worker, ["train"], 30)) is not None:
                taken.append((claimed.record.id, worker))

        threads = [threading.Thread(target=take, args=(table, f"w{i}")) for i, table in enumerate(tables)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert Counter(job for job, _ in taken) == Counter(ids)  # every job once, none twice
        records = {r.id: r for r in tables[0].list()}
        assert all(
            records[job].state == JobState.running and records[job].worker == worker and records[job].attempts == 1
            for job, worker in taken
        )
        assert tables[0].claim("late", ["train"], 30) is None
    finally:
        for table in tables:
            table.close()


def _expire(table: PostgresQueue, job_id: str) -> None:
    with table._db.connection() as conn:
        conn.execute(
            "UPDATE softprompt_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (job_id,)
        )


def test_an_attempt_that_lost_its_lease_changes_nothing_even_for_the_same_worker(database_url):
    table = PostgresQueue(database_url)
    try:
        queued = table.submit(
            JobRecord(id=new_job_id(), name="twice"), {}, train_data=b"", eval_data=None, max_attempts=2
        )
        first = table.claim("w1", ["train"], 30)
        assert lease_held(database_url, queued.id, "w1", 1, margin_seconds=5)
        _expire(table, queued.id)
        assert not lease_held(database_url, queued.id, "w1", 1, margin_seconds=0)  # the publish check says no
        assert table.reap() == [(queued.id, "queued")]
        second = table.claim("w1", ["train"], 30)  # the same worker takes the job again: attempt 2
        assert second.record.attempts == 2
        stale = first.record.model_copy(update={"step": 99})
        assert not table.update("w1", stale) and not table.finish("w1", stale, JobState.succeeded)
        assert table.renew("w1", [(queued.id, 1)], 30) == {}
        assert table.renew("w1", [(queued.id, 1), (queued.id, 2)], 30) == {(queued.id, 2): False}
        now = table.get(queued.id)
        assert now.state == JobState.running and now.attempts == 2 and now.step == 0
        assert table.finish("w1", second.record, JobState.succeeded)
    finally:
        table.close()


def test_a_cancel_wins_over_a_stopping_workers_hand_back(database_url):
    table = PostgresQueue(database_url)
    try:
        queued = table.submit(JobRecord(id=new_job_id(), name="c"), {}, train_data=b"", eval_data=None, max_attempts=3)
        claimed = table.claim("w1", ["train"], 30)
        assert table.cancel(queued.id).state == JobState.running  # running: flagged for its worker
        table.release("w1", claimed.record, "interrupted: worker w1 stopped")
        assert table.get(queued.id).state == JobState.cancelled and table.claim("w2", ["train"], 30) is None
    finally:
        table.close()


def test_an_idempotency_key_finds_the_job_through_any_replica(database_url, tmp_path, model_folder):
    replicas = [job_service(database_url, tmp_path / name, model_folder, worker_jobs="none") for name in ("a", "b")]
    try:
        first = submit(replicas[0], "once", steps=3, idempotency=("key-1", "sha-of-request"))
        again = submit(replicas[1], "once", steps=3, idempotency=("key-1", "sha-of-request"))
        assert again.id == first.id and [r.id for r in replicas[1].list()] == [first.id]
        with pytest.raises(IdempotencyKeyReusedError):
            submit(replicas[1], "other", steps=3, idempotency=("key-1", "sha-of-another-request"))
        assert replicas[1].cancel(first.id).state == JobState.cancelled  # queued: cancelled at once
        with pytest.raises(JobStateError):
            replicas[0].cancel(first.id)
        with pytest.raises(JobNotFoundError):
            replicas[0].get("nope")
    finally:
        for replica in replicas:
            replica.queue.close()


def test_a_worker_that_lost_its_lease_stops_the_job_and_publishes_nothing(database_url, tmp_path, model_folder):
    manager = job_service(
        database_url,
        tmp_path / "jobs",
        model_folder,
        worker_jobs="train",
        job_heartbeat_seconds=HEARTBEAT,
        job_lease_seconds=LEASE,
    )
    manager.start()
    other = PostgresQueue(database_url)
    try:
        job = submit(manager, "fenced", steps=100_000)
        wait_until(lambda: manager.get(job.id).step >= 1, timeout=120)
        trainer = manager.worker._running[job.id, 1].proc
        # as if this worker had been cut off for longer than its lease: another process reaps the job
        with other._db.connection() as conn:
            conn.execute(
                "UPDATE softprompt_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (job.id,)
            )
        assert other.reap() == [(job.id, "failed")]
        trainer.wait(timeout=2 * HEARTBEAT + 5)  # killed at the worker's next renewal
        record = manager.get(job.id)
        assert record.state == JobState.failed and "stopped renewing its lease" in record.error
        time.sleep(HEARTBEAT)
        assert manager.get(job.id).revision == record.revision  # the worker wrote nothing after losing it
        with open_store(database_url) as store:
            assert store.names() == []
    finally:
        other.close()
        manager.stop()


def test_two_workers_run_six_jobs_each_exactly_once(serving_only, workers, database_url, tmp_path):
    workers("worker-a")
    workers("worker-b")
    jobs = [submit(serving_only, f"job{i}", steps=3) for i in range(6)]
    done = [wait_until(lambda job=job: finished(serving_only, job.id), timeout=300) for job in jobs]
    assert [r.state for r in done] == [JobState.succeeded] * 6, [r.error for r in done]
    assert [r.version for r in done] == [f"job{i}-v1" for i in range(6)]
    assert all(r.attempts == 1 and r.step == 3 for r in done)
    claims = claims_in(tmp_path / "worker-a" / "worker.log") + claims_in(tmp_path / "worker-b" / "worker.log")
    assert Counter(claims) == Counter(job.id for job in jobs)  # each job claimed once, by one worker
    for name in ("worker-a", "worker-b"):  # both took jobs, and each record names the worker that ran it
        log = tmp_path / name / "worker.log"
        ran = {r.id: r.worker for r in done if r.id in claims_in(log)}
        assert ran and all(f"claimed by worker {worker} " in log.read_text() for worker in ran.values())
    with open_store(database_url) as store:
        assert store.names() == [f"job{i}" for i in range(6)]
        assert all([v.id.version for v in store.versions(f"job{i}")] == [1] for i in range(6))


def test_a_worker_without_an_engine_runs_evaluations_in_a_process_of_its_own(serving_only, workers, frozen):
    from trainer.batches import Encoder
    from trainer.compare import (
        choose_task,
        data_identity,
        load_references,
        model_scorer,
        reference_specs,
        run_comparison,
    )
    from trainer.data import parse_examples

    workers("worker-a")
    data = jsonl(SENTIMENT)
    specs = reference_specs(texts=["Classify the sentiment."], bare=True)
    request = {
        "references": [{"kind": s.kind, "value": s.value} for s in specs],
        "task": "classification",
        "max_new_tokens": None,
        "data": data_identity(data, "sentiment.jsonl", len(SENTIMENT)),
    }
    job = serving_only.submit_eval(request, data, num_examples=len(SENTIMENT))
    record = wait_until(lambda: finished(serving_only, job.id), timeout=120)
    assert record.state == JobState.succeeded, record.error
    table = serving_only.result(job.id)
    assert record.metrics["results"] == table["results"] and len(table["examples"]) == len(SENTIMENT)

    examples = parse_examples(data.decode().splitlines())  # the same comparison in this process, on the same model
    task = choose_task([], examples, "classification")
    here = run_comparison(
        model_scorer(frozen, Encoder(frozen), task, max_new_tokens=16),
        load_references(frozen, None, specs),
        examples,
        task,
        data=request["data"],
        max_new_tokens=16,
    )
    assert [(r["reference"], r["correct"], r["n"]) for r in table["results"]] == [
        (r["reference"], r["correct"], r["n"]) for r in here["results"]
    ]


def _children(pid: int) -> list[int]:
    """Processes started by any thread of `pid` (Linux lists them per thread)."""
    return [int(child) for path in Path(f"/proc/{pid}/task").glob("*/children") for child in path.read_text().split()]


def _gone(pid: int) -> bool:
    """Exited (reaped, or a zombie waiting for a parent that is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_killed_workers_job_fails_within_lease_and_heartbeat(serving_only, workers, database_url):
    worker = workers("worker-a")
    job = submit(serving_only, "doomed", steps=100_000)
    wait_until(lambda: serving_only.get(job.id).step >= 1, timeout=120)
    trainers = _children(worker.pid)
    assert trainers, "the worker runs its training job in a child process"
    killed_at = time.monotonic()
    worker.send_signal(signal.SIGKILL)
    record = wait_until(lambda: finished(serving_only, job.id), timeout=LEASE + HEARTBEAT + 10, interval=0.05)
    ended_after = time.monotonic() - killed_at
    assert record.state == JobState.failed and "stopped renewing its lease" in record.error, record
    assert ended_after <= LEASE + HEARTBEAT + 1.0, f"ended {ended_after:.1f} s after the kill"
    wait_until(lambda: all(_gone(pid) for pid in trainers), timeout=10)  # the trainer died with its worker
    with open_store(database_url) as store:
        assert store.names() == []  # nothing published, nothing partial


def test_a_killed_workers_job_runs_again_elsewhere_when_attempts_remain(database_url, tmp_path, model_folder, workers):
    manager = job_service(
        database_url,
        tmp_path / "replica-jobs",
        model_folder,
        worker_jobs="none",
        job_heartbeat_seconds=HEARTBEAT,
        job_lease_seconds=LEASE,
        job_max_attempts=2,
    )
    manager.start()
    try:
        processes = {process.pid: process for process in (workers("worker-a"), workers("worker-b"))}
        job = submit(manager, "retried", steps=600)  # the tiny model trains ~80 steps a second
        running = wait_until(lambda: (r := manager.get(job.id)).step >= 2 and r, timeout=120)
        holder = int(running.worker.split(":")[1])  # host:pid:nonce
        processes[holder].send_signal(signal.SIGKILL)
        requeued = wait_until(lambda: (r := manager.get(job.id)).attempts == 2 and r, timeout=LEASE + HEARTBEAT + 10)
        assert requeued.worker != running.worker
        record = wait_until(lambda: finished(manager, job.id), timeout=300)
        assert record.state == JobState.succeeded and record.attempts == 2 and record.version == "retried-v1", (
            record.error
        )
        assert record.history[0]["step"] == 1 and record.step == 600  # the curve is the second attempt's, from step 1
        with open_store(database_url) as store:
            assert [v.id.version for v in store.versions("retried")] == [1]
    finally:
        manager.stop()


def test_a_job_can_run_on_two_processes(database_url, tmp_path, model_folder):
    manager = job_service(
        database_url,
        tmp_path / "jobs",
        model_folder,
        worker_jobs="train",
        job_heartbeat_seconds=HEARTBEAT,
        job_lease_seconds=LEASE,
    )
    manager.start()
    try:
        job = submit(manager, "ranks", steps=3, processes=2)
        assert manager.threads_in_use() in (0, 2)
        record = wait_until(lambda: finished(manager, job.id), timeout=300)
        assert record.state == JobState.succeeded and record.version == "ranks-v1", record.error
        assert [h["step"] for h in record.history] == [1, 2, 3]  # rank 0 alone reports
        log = (tmp_path / "jobs" / job.id / "worker.log").read_text()
        assert "rank 0 of 2 (gloo)" in log and "rank 1 of 2 (gloo)" in log
    finally:
        manager.stop()


@pytest.mark.parametrize(
    ("arguments", "needle"),
    [
        (["--store", "./some-folder"], "postgresql:// URL"),
        (["--store", "postgresql://nobody@127.0.0.1:1/x", "--jobs", "bake"], "unknown job kind 'bake'"),
        (["--store", "postgresql://nobody@127.0.0.1:1/x", "--jobs", "none"], "names no kind of job"),
    ],
)
def test_softprompt_worker_refuses_what_it_cannot_run(arguments, needle, capsys):
    from server.cli import main

    assert main(["worker", *arguments]) == 2
    assert needle in capsys.readouterr().err


def test_softprompt_worker_says_when_the_database_is_away(capsys):
    from devtools.postgres import free_port
    from server.cli import main

    assert main(["worker", "--store", f"postgresql://nobody@127.0.0.1:{free_port()}/none"]) == 1
    assert "cannot be reached" in capsys.readouterr().err
