"""What only the PostgreSQL store does: schema migrations, change notices, replicas sharing one
database, and a database that goes away and comes back. Every test runs against a real
PostgreSQL server started from the machine's binaries (tests/postgres_cluster.py)."""

from __future__ import annotations

import functools
import json
import threading
import time

import httpx
import psycopg
import pytest
import torch
from fastapi.testclient import TestClient

from core.schema import known_migrations, schema_version
from prompt_store import ModelFingerprint, PromptStoreError, SchemaVersionError, StoreUnavailableError, open_store
from server.app import create_app
from tests.http_helpers import make_settings, mixing, publish  # noqa: F401
from tests.jobs_helpers import wait_until

FP = ModelFingerprint(hidden_size=8, vocab_size=100, embedding_sha256="abc")


def test_schema_is_created_on_open_and_recorded(database_url):
    with psycopg.connect(database_url) as conn:
        assert schema_version(conn) == 0
    with open_store(database_url) as store:
        assert store.schema_version == known_migrations()[-1].number
    with open_store(database_url), psycopg.connect(database_url) as conn:  # opening again applies nothing twice
        applied = conn.execute("SELECT version FROM softprompt_schema ORDER BY version").fetchall()
        assert [v for (v,) in applied] == [m.number for m in known_migrations()]


def test_a_newer_schema_is_refused_by_the_store_and_the_server(database_url, mixing, tmp_path):
    open_store(database_url).close()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO softprompt_schema (version, name) VALUES (999, 'from_the_future')")
    with pytest.raises(SchemaVersionError, match="schema version 999.*Upgrade softprompt"):
        open_store(database_url)
    with pytest.raises(SchemaVersionError):
        with TestClient(create_app(make_settings(tmp_path, store=database_url), frozen=mixing)):
            pass


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:hunter2@h:5432/db",
        "postgresql://u@h/db?password=hunter2",
        "postgresql://:hunter2@h/db",
        "postgres://u:hunter2@h/db?sslmode=require",
    ],
)
def test_the_url_password_never_reaches_messages(url):
    from core.database import redact

    assert "hunter2" not in redact(url) and redact(url).startswith("postgresql://")


def test_other_url_schemes_are_refused_not_taken_for_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PromptStoreError, match="unsupported store URL"):
        open_store("postgresql+psycopg://u:hunter2@h/db")
    assert list(tmp_path.iterdir()) == []


def test_metadata_json_cannot_hold_is_stored_alike_by_both_backends(store):
    version = store.publish(
        "odd",
        torch.randn(2, 8),
        fingerprint=FP,
        base_model="tiny",
        init_text="a\x00b",
        metrics={"train_loss_last": float("nan"), "inf": float("inf"), "ok": 0.5},
    )
    assert version.meta["metrics"] == {"train_loss_last": None, "inf": None, "ok": 0.5}
    assert store.resolve("odd").meta["init_text"] == "a\ufffdb"
    store.record_evaluation("odd", {"score": float("nan")})
    assert store.evaluations("odd") == [{"score": None}]


def test_deleting_a_name_with_many_versions_notifies_once(database_url):
    with open_store(database_url) as store:
        name = "n" * 60
        for _ in range(150):  # a list of every id would pass NOTIFY's 8000-byte limit
            store.publish(name, torch.randn(1, 8), fingerprint=FP, base_model="tiny")
        assert len(store.delete(name)) == 150 and store.names() == []


def test_publishing_keeps_numbers_right_under_a_stricter_default_isolation(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            f"ALTER DATABASE {database_url.rsplit('/', 1)[1]} SET default_transaction_isolation = 'serializable'"
        )
    with open_store(database_url) as first, open_store(database_url) as second:
        threads = [
            threading.Thread(
                target=lambda s=s: [
                    s.publish("iso", torch.randn(1, 8), fingerprint=FP, base_model="tiny") for _ in range(5)
                ]
            )
            for s in (first, second)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert [v.id.version for v in first.versions("iso")] == list(range(1, 11))


def test_a_busy_database_fails_the_call_not_the_store(database_url, monkeypatch):
    """A lock held elsewhere: the call waits at most lock_timeout and fails with 503, but the
    store is not marked away, so the next call works."""
    from core import database as pg_database

    monkeypatch.setitem(pg_database.SESSION, "options", "-c lock_timeout=300ms")  # not 10 s here
    with open_store(database_url) as store, psycopg.connect(database_url) as holder:
        store.publish("busy", torch.randn(1, 8), fingerprint=FP, base_model="tiny")
        holder.execute("SELECT pg_advisory_xact_lock(hashtextextended('softprompt:aliases', 0))")  # until rollback
        try:
            with pytest.raises(StoreUnavailableError, match="could not do this now"):
                store.set_alias("prod", "busy-v1")
            assert store.available and store.names() == ["busy"]
        finally:
            holder.rollback()
        assert str(store.set_alias("prod", "busy-v1")) == "busy-v1"


def test_a_change_wakes_a_waiting_replica_at_once(database_url):
    with open_store(database_url) as watcher_side, open_store(database_url) as publisher:
        stop = threading.Event()
        before = watcher_side.signature()
        watcher_side.wait_for_change(0.01, stop)  # starts listening
        woke = {}

        def wait():
            started = time.perf_counter()
            watcher_side.wait_for_change(30.0, stop)
            woke["after"] = time.perf_counter() - started

        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(0.2)
        publisher.publish("math", torch.randn(3, 8), fingerprint=FP, base_model="tiny")
        thread.join(35)
        assert woke["after"] < 5.0, "the notice did not wake the waiting replica"
        assert watcher_side.signature() != before


def test_replicas_on_one_database_agree(mixing, tmp_path, database_url):
    """A version published through replica A is served by B; an alias moved on B is followed by A."""
    a = TestClient(create_app(make_settings(tmp_path / "a", store=database_url), frozen=mixing))
    b = TestClient(create_app(make_settings(tmp_path / "b", store=database_url), frozen=mixing))
    with a, b:
        publish(database_url, mixing, "math", seed=1)
        uploaded = a.post(
            "/prompts",
            data={"name": "math"},
            files={"file": ("p.safetensors", _weights(mixing), "application/octet-stream")},
        )
        assert uploaded.status_code == 201, uploaded.text
        served = b.post("/generate", params={"prompt": "math"}, json={"input": "2+2", "max_new_tokens": 2})
        assert served.status_code == 200 and served.json()["prompt"] == "math-v2"
        assert b.put("/aliases/prod", json={"target": "math-v1"}).status_code == 200
        assert (
            a.post("/generate", params={"prompt": "prod"}, json={"input": "x", "max_new_tokens": 1}).json()["prompt"]
            == "math-v1"
        )
        assert a.get("/prompts").json() == b.get("/prompts").json()
        assert a.delete("/prompts/math-v2").status_code == 200
        missing = b.post("/generate", params={"prompt": "math-v2"}, json={"input": "x", "max_new_tokens": 1})
        assert missing.status_code == 404
        assert (
            b.post("/generate", params={"prompt": "math"}, json={"input": "x", "max_new_tokens": 1}).json()["prompt"]
            == "math-v1"
        )


def _weights(frozen) -> bytes:
    from safetensors.torch import save

    torch.manual_seed(5)
    return save({"prompt_embeddings": torch.randn(3, frozen.fingerprint.hidden_size)})


wait_until = functools.partial(wait_until, timeout=30.0, interval=0.05)


def test_the_server_rides_out_a_database_restart(own_postgres, mixing, tmp_path):
    url = own_postgres.create_database().replace("postgres@", "postgres:hunter2@")  # trust auth ignores it
    publish(url, mixing, "math", seed=1)
    settings = make_settings(tmp_path, store=url, store_poll_seconds=60)  # only NOTIFY can warm a new version soon
    with TestClient(create_app(settings, frozen=mixing)) as client:

        def generate(prompt="math"):
            return client.post("/generate", params={"prompt": prompt}, json={"input": "2+2", "max_new_tokens": 2})

        assert generate().status_code == 200
        assert client.get("/ready").json()["store"]["available"] is True
        statuses, stop_traffic = [], threading.Event()

        def traffic():  # a client asking for the loaded prompt all through the outage
            while not stop_traffic.is_set():
                statuses.append(generate().status_code)

        sender = threading.Thread(target=traffic)
        sender.start()
        time.sleep(0.3)
        own_postgres.stop()
        try:
            for _ in range(5):  # prompts already loaded keep serving
                answer = generate()
                assert answer.status_code == 200 and answer.json()["prompt"] == "math-v1"
            for response in (
                client.get("/prompts"),
                client.put("/aliases/prod", json={"target": "math-v1"}),
                generate("never-loaded"),
            ):
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "store_unavailable" and "hunter2" not in response.text
                assert response.headers["retry-after"]

            def store_reported_down():
                body = client.get("/ready").json()
                return body if not body["store"]["available"] else None

            ready = wait_until(store_reported_down)
            assert ready["status"] == "ready" and "cannot be reached" in ready["store"]["error"]
            assert "hunter2" not in json.dumps(ready)
        finally:
            own_postgres.start()
        assert wait_until(lambda: client.get("/prompts").status_code == 200)  # the pool reconnects on its own
        stop_traffic.set()
        sender.join(30)
        assert len(statuses) > 10 and set(statuses) == {200}, statuses
        wait_until(lambda: client.get("/ready").json()["store"]["available"])
        publish(url, mixing, "math", seed=2)  # through another connection
        warmed = lambda: "math-v2" in client.get("/stats").json()["watcher"]["warmed"]  # noqa: E731
        assert wait_until(warmed, timeout=20)  # the listener is back: a 60 s poll could not have done it
        assert generate().json()["prompt"] == "math-v2"
        assert client.app.state.softprompt.prompts.stats()["stale_resolutions"] >= 5


def test_store_operations_fail_fast_when_the_database_is_away(own_postgres):
    url = own_postgres.create_database()
    store = open_store(url)
    store.publish("math", torch.randn(3, 8), fingerprint=FP, base_model="tiny")
    own_postgres.stop()
    stopped = time.perf_counter()
    try:
        with pytest.raises(StoreUnavailableError, match="cannot be reached"):
            store.names()
        assert time.perf_counter() - stopped < 15
        started = time.perf_counter()
        for _ in range(200):  # known to be away: no call waits for a connection, one a second probes
            with pytest.raises(StoreUnavailableError):
                store.resolve("math")
            time.sleep(0.01)
        assert time.perf_counter() - started < 6
        time.sleep(max(0.0, 20 - (time.perf_counter() - stopped)))  # longer than the pool's reconnection backs off
    finally:
        own_postgres.start()
    restarted = time.perf_counter()

    def answers():
        try:
            return store.names() == ["math"]
        except StoreUnavailableError:  # until the pool has reconnected
            return False

    assert wait_until(answers)
    assert time.perf_counter() - restarted < 5, "the store found out late that its database is back"
    store.close()


def test_two_server_processes_on_one_database(frozen, database_url, tmp_path):
    """Real `softprompt serve` processes (the tiny model): A publishes, B serves it at once;
    an alias moved on B is followed by A; /v1/models and GET /prompts agree."""
    from devtools.local_servers import start_server
    from devtools.postgres import free_port
    from tests.jobs_helpers import save_tiny_model

    model = save_tiny_model(frozen, tmp_path / "tiny-model")
    ports = [free_port(), free_port()]
    processes = []
    try:
        for name, port in zip("ab", ports):  # a 60 s poll: only NOTIFY warms a new version within the test
            processes.append(
                start_server(database_url, tmp_path / name, port, model=model, timeout=120, poll_seconds=60)
            )
        a, b = (f"http://127.0.0.1:{port}" for port in ports)
        with httpx.Client(timeout=30) as client:
            for seed in (1, 2):
                torch.manual_seed(seed)
                weights = _weights(frozen)
                assert (
                    client.post(
                        f"{a}/prompts",
                        data={"name": "math"},
                        files={"file": ("p.safetensors", weights, "application/octet-stream")},
                    ).status_code
                    == 201
                )
                served = client.post(
                    f"{b}/generate", params={"prompt": "math"}, json={"input": "1+1", "max_new_tokens": 2}
                )
                assert served.json()["prompt"] == f"math-v{seed}"
            assert client.put(f"{b}/aliases/prod", json={"target": "math-v1"}).status_code == 200
            followed = client.post(f"{a}/generate", params={"prompt": "prod"}, json={"input": "x", "max_new_tokens": 1})
            assert followed.json()["prompt"] == "math-v1"
            assert client.get(f"{a}/prompts").json() == client.get(f"{b}/prompts").json()
            models = [sorted(m["id"] for m in client.get(f"{base}/v1/models").json()["data"]) for base in (a, b)]
            assert models[0] == models[1] and {"math-v1", "math-v2", "prod"} <= set(models[0])
            torch.manual_seed(3)
            assert (
                client.post(
                    f"{a}/prompts",
                    data={"name": "late"},
                    files={"file": ("p.safetensors", _weights(frozen), "application/octet-stream")},
                ).status_code
                == 201
            )
            wait_until(
                lambda: "late-v1" in client.get(f"{b}/stats").json()["watcher"]["warmed"], timeout=20
            )  # NOTIFY reached B
    finally:
        for process in processes:
            process.terminate()
            process.wait(30)
