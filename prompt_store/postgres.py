"""The prompt store in PostgreSQL: one source of truth for any number of server replicas.

Everything a replica needs is in the database (tensors are KB to a few MB, kept as `bytea`),
so a replica needs nothing but the URL. The semantics are the folder store's:

- Publishing is one transaction under a per-name advisory lock: the number is the largest
  ever used for the name (tombstones included) plus one, and the row, its tensor and the
  change notice commit together, so a crash leaves the old state or the whole new version.
- Deleting keeps the row as a tombstone (`deleted_at`, its data dropped): numbers are never
  reused. Aliases reference rows by (name, version).
- Every change bumps `prompt_store_state.generation` and sends `NOTIFY softprompt_store` in
  the same transaction: `signature()` is that counter, and `wait_for_change` wakes on the
  notice (a replica learns of a change as it commits); after a lost connection it falls back
  to waiting out the poll interval until it can LISTEN again.
- The database going away is `StoreUnavailableError` (HTTP 503), never a hang: connections
  come from a pool that checks them on checkout and reconnects on its own.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from .base import MAX_EVALUATIONS, PromptStore
from .errors import AliasInUseError, IdempotencyKeyReusedError, NameConflictError, StoreUnavailableError
from .names import VersionId, parse_ref, validate_name
from .schema import migrate
from .version import PromptVersion

logger = logging.getLogger(__name__)

CHANNEL = "softprompt_store"
CONNECT_TIMEOUT_S = 3  # a database that does not answer is reported, not waited on
POOL_TIMEOUT_S = 5.0  # the longest a call waits for a pooled connection while the database is up
PROBE_TIMEOUT_S = 1.0  # ... and while it is known to be away (one probe per PROBE_INTERVAL_S)
PROBE_INTERVAL_S = 1.0
ALIASES_LOCK = "softprompt:aliases"


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", url)


class PostgresStore(PromptStore):
    """The store in a PostgreSQL database (schema migrated on open)."""

    def __init__(self, url: str, *, pool_size: int = 4):
        self.url = url
        self.location = redact(url)
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, timeout=POOL_TIMEOUT_S, open=False,
                                    kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
                                    check=ConnectionPool.check_connection, name="softprompt-store")
        self._pool.open(wait=False)
        self._away: str | None = None  # why the last call could not reach the database; None while it answers
        self._last_probe = 0.0
        self._listener: psycopg.Connection | None = None
        self._listener_lock = threading.Lock()
        try:
            with self._connection() as conn:
                self.schema_version = migrate(conn)
        except BaseException:
            self._pool.close()
            raise

    # ----------------------------------------------------------------- connections
    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection. While the database is known to be away, calls fail at once except
        one probe a second (with a short wait), so requests that can do without the store, such
        as those for prompts already loaded, are not held up by it."""
        timeout = POOL_TIMEOUT_S
        if self._away is not None:
            now = time.monotonic()
            if now - self._last_probe < PROBE_INTERVAL_S:
                raise self._unavailable(self._away)
            self._last_probe, timeout = now, PROBE_TIMEOUT_S
        try:
            with self._pool.connection(timeout=timeout) as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as exc:
            if self._away is None:
                logger.warning("the store's database %s cannot be reached: %s", self.location, _first_line(exc))
                self._last_probe = time.monotonic()
            self._away = _first_line(exc)
            raise self._unavailable(self._away) from exc
        if self._away is not None:
            logger.info("the store's database %s answers again", self.location)
            self._away = None

    def _unavailable(self, reason: str) -> StoreUnavailableError:
        return StoreUnavailableError(f"The prompt store's database ({self.location}) cannot be reached: {reason}. "
                                     "Prompts already loaded keep serving; retry store operations later.")

    @contextmanager
    def _transaction(self, *locks: tuple[str, bool]) -> Iterator[psycopg.Connection]:
        """A transaction holding advisory locks, given as (key, shared), in the order given."""
        with self._connection() as conn, conn.transaction():
            for key, shared in locks:
                function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
                conn.execute(f"SELECT {function}(hashtextextended(%s, 0))", (key,))
            yield conn

    def _changed(self, conn: psycopg.Connection, event: dict) -> None:
        """Inside a write transaction: bump the change counter and notify listeners at commit."""
        generation = conn.execute("UPDATE prompt_store_state SET generation = generation + 1 RETURNING generation").fetchone()[0]
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps({"generation": generation, **event})))

    def close(self) -> None:
        with self._listener_lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        self._pool.close()

    # ----------------------------------------------------------------- reading
    def names(self) -> list[str]:
        with self._connection() as conn:
            rows = conn.execute("SELECT DISTINCT name FROM prompt_versions WHERE deleted_at IS NULL ORDER BY name").fetchall()
        return [name for (name,) in rows]

    def _used_names(self) -> list[str]:
        with self._connection() as conn:
            return [name for (name,) in conn.execute("SELECT DISTINCT name FROM prompt_versions ORDER BY name").fetchall()]

    def aliases(self) -> dict[str, str]:
        with self._connection() as conn:
            rows = conn.execute("SELECT alias, name, version FROM prompt_aliases ORDER BY alias").fetchall()
        return {alias: str(VersionId(name, version)) for alias, name, version in rows}

    def versions(self, name: str) -> list[PromptVersion]:
        """All published versions of `name`, oldest first (one query)."""
        validate_name(name)
        with self._connection() as conn:
            rows = conn.execute("SELECT version, meta FROM prompt_versions WHERE name = %s AND deleted_at IS NULL "
                                "ORDER BY version", (name,)).fetchall()
        return [PromptVersion(id=VersionId(name, version), path=None, meta=meta) for version, meta in rows]

    def _version_numbers(self, name: str, *, include_deleted: bool = False) -> list[int]:
        live = "" if include_deleted else " AND deleted_at IS NULL"
        with self._connection() as conn:
            rows = conn.execute(f"SELECT version FROM prompt_versions WHERE name = %s{live} ORDER BY version", (name,)).fetchall()
        return [version for (version,) in rows]

    def _read_version(self, version_id: VersionId) -> PromptVersion:
        meta = self._column("meta", version_id)
        return PromptVersion(id=version_id, path=None, meta=meta)

    def _weights(self, version: PromptVersion) -> bytes:
        return bytes(self._column("weights", version.id))

    def _adapter_config(self, version: PromptVersion) -> dict:
        return self._column("adapter_config", version.id)

    def _column(self, column: str, version_id: VersionId):
        with self._connection() as conn:
            row = conn.execute(f"SELECT {column} FROM prompt_versions WHERE name = %s AND version = %s AND deleted_at IS NULL",
                               (version_id.name, version_id.version)).fetchone()
        if row is None:
            raise self._not_found(str(version_id))
        return row[0]

    def signature(self) -> int:
        with self._connection() as conn:
            return conn.execute("SELECT generation FROM prompt_store_state").fetchone()[0]

    def wait_for_change(self, timeout: float, stop: threading.Event) -> None:
        """Wake on the first NOTIFY after the last call, or after `timeout`. Without a listening
        connection (the database is away) this waits out `timeout` and tries again next time."""
        with self._listener_lock:
            listener = self._listener
            if listener is None:
                try:
                    listener = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
                    listener.execute(f"LISTEN {CHANNEL}")
                except psycopg.Error as exc:
                    logger.warning("cannot LISTEN for store changes (%s); polling every %.1f s", _first_line(exc), timeout)
                    listener = None
                self._listener = listener
        if listener is None:
            stop.wait(timeout)
            return
        try:
            for _ in listener.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.Error as exc:
            logger.warning("lost the store's change notices (%s); reconnecting", _first_line(exc))
            with self._listener_lock:
                if self._listener is listener:
                    self._listener = None
            listener.close()
            stop.wait(min(timeout, 1.0))

    # ----------------------------------------------------------------- evaluations
    def evaluations(self, ref: str | PromptVersion) -> list[dict]:
        version = ref if isinstance(ref, PromptVersion) else self.resolve(ref)
        with self._connection() as conn:
            rows = conn.execute("SELECT record FROM prompt_evaluations WHERE name = %s AND version = %s ORDER BY id",
                                (version.id.name, version.id.version)).fetchall()
        return [record for (record,) in rows]

    def record_evaluation(self, ref: str | PromptVersion, record: dict) -> PromptVersion:
        version = ref if isinstance(ref, PromptVersion) else self.resolve(ref)
        key = (version.id.name, version.id.version)
        with self._transaction((_name_lock(version.id.name), False)) as conn:  # the lock delete takes
            live = conn.execute("SELECT 1 FROM prompt_versions WHERE name = %s AND version = %s AND deleted_at IS NULL", key).fetchone()
            if live is not None:
                conn.execute("INSERT INTO prompt_evaluations (name, version, record) VALUES (%s, %s, %s)", (*key, Jsonb(record)))
                conn.execute("DELETE FROM prompt_evaluations WHERE name = %s AND version = %s AND id NOT IN "
                             "(SELECT id FROM prompt_evaluations WHERE name = %s AND version = %s ORDER BY id DESC LIMIT %s)",
                             (*key, *key, MAX_EVALUATIONS))
        if live is None:
            raise self._not_found(str(version.id))
        logger.info("recorded an evaluation of %s: %s %s", version.id, record.get("metric"), record.get("score"))
        return version

    # ----------------------------------------------------------------- writing
    def _write_version(self, name: str, weights: bytes, config: dict, meta: dict,
                       idempotency: tuple[str, str] | None) -> PromptVersion:
        """One transaction: the name's lock, the idempotency check, the next number, the row."""
        with self._transaction((ALIASES_LOCK, True), (_name_lock(name), False)) as conn:
            if conn.execute("SELECT 1 FROM prompt_aliases WHERE alias = %s", (name,)).fetchone() is not None:
                raise NameConflictError(f"{name!r} is an alias; choose another prompt name or remove the alias.")
            if idempotency is not None:
                earlier = conn.execute("SELECT version, meta FROM prompt_versions WHERE name = %s AND deleted_at IS NULL "
                                       "AND meta->>'idempotency_key' = %s", (name, idempotency[0])).fetchone()
                if earlier is not None:
                    version = PromptVersion(id=VersionId(name, earlier[0]), path=None, meta=earlier[1])
                    if version.meta.get("request_sha256") != idempotency[1]:
                        raise IdempotencyKeyReusedError(idempotency[0], f"it published {version.id}")
                    logger.info("%s was already published with this Idempotency-Key", version.id)
                    return version
            number = conn.execute("SELECT coalesce(max(version), 0) + 1 FROM prompt_versions WHERE name = %s", (name,)).fetchone()[0]
            version_id = VersionId(name, number)
            meta["name"], meta["version"], meta["id"] = name, number, str(version_id)
            conn.execute("INSERT INTO prompt_versions (name, version, meta, adapter_config, weights, tensor_sha256) "
                         "VALUES (%s, %s, %s, %s, %s, %s)",
                         (name, number, Jsonb(meta), Jsonb(config), weights, meta["tensor_sha256"]))
            self._changed(conn, {"published": str(version_id)})
        logger.info("published %s (%d vectors) to %s", version_id, meta["num_virtual_tokens"], self.location)
        return PromptVersion(id=version_id, path=None, meta=json.loads(json.dumps(meta)))

    def _write_alias(self, alias: str, target: VersionId) -> None:
        with self._transaction((ALIASES_LOCK, False)) as conn:
            if conn.execute("SELECT 1 FROM prompt_versions WHERE name = %s AND deleted_at IS NULL LIMIT 1", (alias,)).fetchone():
                raise NameConflictError(f"{alias!r} is a prompt name; an alias must have a name of its own.")
            live = conn.execute("SELECT 1 FROM prompt_versions WHERE name = %s AND version = %s AND deleted_at IS NULL "
                                "FOR SHARE", (target.name, target.version)).fetchone()
            if live is not None:
                conn.execute("INSERT INTO prompt_aliases (alias, name, version) VALUES (%s, %s, %s) "
                             "ON CONFLICT (alias) DO UPDATE SET name = excluded.name, version = excluded.version",
                             (alias, target.name, target.version))
                self._changed(conn, {"alias": alias, "target": str(target)})
        if live is None:  # deleted between resolving and locking
            raise self._not_found(str(target))

    def remove_alias(self, alias: str) -> None:
        with self._transaction((ALIASES_LOCK, False)) as conn:
            removed = conn.execute("DELETE FROM prompt_aliases WHERE alias = %s RETURNING alias", (alias,)).fetchone()
            if removed is not None:
                self._changed(conn, {"alias_removed": alias})
        if removed is None:
            raise self._not_found(alias)

    def delete(self, ref: str, *, force: bool = False) -> list[VersionId]:
        parsed = parse_ref(ref)
        with self._transaction((ALIASES_LOCK, False), (_name_lock(parsed.name), False)) as conn:
            if parsed.version is None and conn.execute("SELECT 1 FROM prompt_aliases WHERE alias = %s", (parsed.name,)).fetchone():
                raise NameConflictError(f"{ref!r} is an alias; remove it with the alias command, not delete.")
            rows = conn.execute("SELECT version FROM prompt_versions WHERE name = %s AND deleted_at IS NULL "
                                "AND (%s::integer IS NULL OR version = %s) ORDER BY version",
                                (parsed.name, parsed.version, parsed.version)).fetchall()
            targets = [VersionId(parsed.name, version) for (version,) in rows]
            if targets:
                numbers = [t.version for t in targets]
                pointing = conn.execute("SELECT alias, version FROM prompt_aliases WHERE name = %s AND version = ANY(%s) "
                                        "ORDER BY alias", (parsed.name, numbers)).fetchall()
                if pointing and not force:
                    raise AliasInUseError(
                        f"Aliases point at {ref}: {', '.join(f'{a} -> {VersionId(parsed.name, v)}' for a, v in pointing)}. "
                        "Move them first or delete with force.")
                conn.execute("DELETE FROM prompt_aliases WHERE name = %s AND version = ANY(%s)", (parsed.name, numbers))
                conn.execute("DELETE FROM prompt_evaluations WHERE name = %s AND version = ANY(%s)", (parsed.name, numbers))
                conn.execute("UPDATE prompt_versions SET meta = NULL, adapter_config = NULL, weights = NULL, "
                             "deleted_at = now() WHERE name = %s AND version = ANY(%s)", (parsed.name, numbers))
                self._changed(conn, {"deleted": [str(t) for t in targets]})
        if not targets:
            raise self._not_found(ref)
        logger.info("deleted %s", ", ".join(map(str, targets)))
        return targets


    def insert_copies(self, records: list[VersionRecord], aliases: dict[str, str]) -> None:
        """Write versions exactly as another store holds them (numbers, tombstones, metadata,
        tensors, evaluations) and the aliases, in one transaction. Refuses names this store
        has ever used, so nothing is overwritten and numbers stay unique."""
        names = sorted({r.id.name for r in records})
        with self._transaction((ALIASES_LOCK, False), *[(_name_lock(n), False) for n in names]) as conn:
            taken = conn.execute("SELECT DISTINCT name FROM prompt_versions WHERE name = ANY(%s) "
                                 "UNION SELECT alias FROM prompt_aliases WHERE alias = ANY(%s)",
                                 (names + list(aliases), names + list(aliases))).fetchall()
            if taken:
                raise NameConflictError(f"{self.location} already has {', '.join(sorted(n for (n,) in taken))}; "
                                        "copy into a store without these names.")
            for record in records:
                conn.execute("INSERT INTO prompt_versions (name, version, meta, adapter_config, weights, tensor_sha256, "
                             "deleted_at) VALUES (%s, %s, %s, %s, %s, %s, CASE WHEN %s THEN now() END)",
                             (record.id.name, record.id.version, None if record.deleted else Jsonb(record.meta),
                              None if record.deleted else Jsonb(record.adapter_config), record.weights,
                              None if record.deleted else record.meta["tensor_sha256"], record.deleted))
                for evaluation in record.evaluations:
                    conn.execute("INSERT INTO prompt_evaluations (name, version, record) VALUES (%s, %s, %s)",
                                 (record.id.name, record.id.version, Jsonb(evaluation)))
            for alias, target in aliases.items():
                name, _, number = target.rpartition("-v")
                conn.execute("INSERT INTO prompt_aliases (alias, name, version) VALUES (%s, %s, %s)", (alias, name, int(number)))
            self._changed(conn, {"copied": len(records)})


def _name_lock(name: str) -> str:
    return f"softprompt:name:{name}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]



@dataclass
class VersionRecord:
    """One version as stored, for copying a store: the files of a live version, or a tombstone."""

    id: VersionId
    meta: dict | None = None
    adapter_config: dict | None = None
    weights: bytes | None = None
    evaluations: list[dict] = field(default_factory=list)

    @property
    def deleted(self) -> bool:
        return self.meta is None
