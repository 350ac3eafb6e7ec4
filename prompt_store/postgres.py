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
- The database going away is `StoreUnavailableError` (HTTP 503), never a hang
  (pg_database.py: the pool, failure handling, LISTEN).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field

import psycopg
from psycopg.types.json import Jsonb

from core.database import CHANNEL, Database
from core.schema import migrate
from prompt_store.base import MAX_EVALUATIONS, PromptStore, json_safe
from prompt_store.errors import AliasInUseError, NameConflictError
from prompt_store.names import VersionId, parse_ref, validate_name
from prompt_store.version import PromptVersion

logger = logging.getLogger(__name__)

ALIASES_LOCK = "softprompt:aliases"


class PostgresStore(PromptStore):
    """The store in a PostgreSQL database (schema migrated on open)."""

    def __init__(self, url: str, *, pool_size: int = 8):
        self.url = url
        self._db = Database(url, pool_size=pool_size)
        self.location = self._db.location
        self._connection, self._transaction = self._db.connection, self._db.transaction
        try:
            with self._connection() as conn:
                self.schema_version = migrate(conn)
        except BaseException:
            self._db.close()
            raise

    @property
    def available(self) -> bool:
        return self._db.available

    def wait_for_change(self, timeout: float, stop: threading.Event) -> None:
        self._db.wait_for_change(timeout, stop)

    def close(self) -> None:
        self._db.close()

    def _changed(self, conn: psycopg.Connection, event: str) -> None:
        """Inside a write transaction: bump the change counter and notify listeners at commit
        (a short payload: NOTIFY takes under 8,000 bytes, and listeners only need to rescan)."""
        generation = conn.execute(
            "UPDATE prompt_store_state SET generation = generation + 1 RETURNING generation"
        ).fetchone()[0]
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps({"generation": generation, "event": event})))

    # ----------------------------------------------------------------- reading
    def names(self) -> list[str]:
        with self._connection() as conn:
            rows = conn.execute(
                'SELECT name FROM prompt_versions WHERE deleted_at IS NULL GROUP BY name ORDER BY name COLLATE "C"'
            ).fetchall()
        return [name for (name,) in rows]

    def _used_names(self) -> list[str]:
        with self._connection() as conn:
            return [
                name
                for (name,) in conn.execute(
                    'SELECT name FROM prompt_versions GROUP BY name ORDER BY name COLLATE "C"'
                ).fetchall()
            ]

    def aliases(self) -> dict[str, str]:
        with self._connection() as conn:
            rows = conn.execute('SELECT alias, name, version FROM prompt_aliases ORDER BY alias COLLATE "C"').fetchall()
        return {alias: str(VersionId(name, version)) for alias, name, version in rows}

    def versions(self, name: str) -> list[PromptVersion]:
        """All published versions of `name`, oldest first (one query)."""
        validate_name(name)
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT version, meta FROM prompt_versions WHERE name = %s AND deleted_at IS NULL ORDER BY version",
                (name,),
            ).fetchall()
        return [PromptVersion(id=VersionId(name, version), path=None, meta=meta) for version, meta in rows]

    def catalog(self) -> tuple[dict[str, list[PromptVersion]], dict[str, str]]:
        """Every live version and the aliases from one snapshot of the database (two queries, one transaction)."""
        with self._connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            rows = conn.execute(
                "SELECT name, version, meta FROM prompt_versions WHERE deleted_at IS NULL "
                'ORDER BY name COLLATE "C", version'
            ).fetchall()
            alias_rows = conn.execute(
                'SELECT alias, name, version FROM prompt_aliases ORDER BY alias COLLATE "C"'
            ).fetchall()
        by_name: dict[str, list[PromptVersion]] = {}
        for name, version, meta in rows:
            by_name.setdefault(name, []).append(PromptVersion(id=VersionId(name, version), path=None, meta=meta))
        return by_name, {alias: str(VersionId(name, version)) for alias, name, version in alias_rows}

    def _version_numbers(self, name: str, *, include_deleted: bool = False) -> list[int]:
        live = "" if include_deleted else " AND deleted_at IS NULL"
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT version FROM prompt_versions WHERE name = %s{live} ORDER BY version", (name,)
            ).fetchall()
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
            row = conn.execute(
                f"SELECT {column} FROM prompt_versions WHERE name = %s AND version = %s AND deleted_at IS NULL",
                (version_id.name, version_id.version),
            ).fetchone()
        if row is None:
            raise self._not_found(str(version_id))
        return row[0]

    def signature(self) -> int:
        with self._connection() as conn:
            return conn.execute("SELECT generation FROM prompt_store_state").fetchone()[0]

    # ----------------------------------------------------------------- evaluations
    def evaluations(self, ref: str | PromptVersion) -> list[dict]:
        version = ref if isinstance(ref, PromptVersion) else self.resolve(ref)
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT record FROM prompt_evaluations WHERE name = %s AND version = %s ORDER BY id",
                (version.id.name, version.id.version),
            ).fetchall()
        return [record for (record,) in rows]

    def record_evaluation(self, ref: str | PromptVersion, record: dict) -> PromptVersion:
        version = ref if isinstance(ref, PromptVersion) else self.resolve(ref)
        key = (version.id.name, version.id.version)
        with self._transaction((_name_lock(version.id.name), False)) as conn:  # the lock delete takes
            live = conn.execute(
                "SELECT 1 FROM prompt_versions WHERE name = %s AND version = %s AND deleted_at IS NULL", key
            ).fetchone()
            if live is not None:
                conn.execute(
                    "INSERT INTO prompt_evaluations (name, version, record) VALUES (%s, %s, %s)",
                    (*key, Jsonb(json_safe(record))),
                )
                conn.execute(
                    "DELETE FROM prompt_evaluations WHERE name = %s AND version = %s AND id NOT IN "
                    "(SELECT id FROM prompt_evaluations WHERE name = %s AND version = %s ORDER BY id DESC LIMIT %s)",
                    (*key, *key, MAX_EVALUATIONS),
                )
        if live is None:
            raise self._not_found(str(version.id))
        logger.info("recorded an evaluation of %s: %s %s", version.id, record.get("metric"), record.get("score"))
        return version

    # ----------------------------------------------------------------- writing
    def _write_version(
        self, name: str, weights: bytes, config: dict, meta: dict, idempotency: tuple[str, str] | None
    ) -> PromptVersion:
        """One transaction: the locks (the key's too: it answers one upload across every name), the
        idempotency check, the next number, the row."""
        locks = (
            [(ALIASES_LOCK, True)]
            + ([(_key_lock(idempotency[0]), False)] if idempotency else [])
            + [(_name_lock(name), False)]
        )
        with self._transaction(*locks) as conn:
            if idempotency is not None:
                earlier = conn.execute(
                    "SELECT name, version, meta FROM prompt_versions WHERE deleted_at IS NULL "
                    "AND meta->>'idempotency_key' = %s AND meta ? 'idempotency_key'",
                    (idempotency[0],),
                ).fetchone()
                if earlier is not None:
                    version = PromptVersion(id=VersionId(earlier[0], earlier[1]), path=None, meta=earlier[2])
                    return self._earlier_answer(version, *idempotency)
            if conn.execute("SELECT 1 FROM prompt_aliases WHERE alias = %s", (name,)).fetchone() is not None:
                raise NameConflictError(f"{name!r} is an alias; choose another prompt name or remove the alias.")
            number = conn.execute(
                "SELECT coalesce(max(version), 0) + 1 FROM prompt_versions WHERE name = %s", (name,)
            ).fetchone()[0]
            version_id = VersionId(name, number)
            meta["name"], meta["version"], meta["id"] = name, number, str(version_id)
            conn.execute(
                "INSERT INTO prompt_versions (name, version, meta, adapter_config, weights, tensor_sha256) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (name, number, Jsonb(meta), Jsonb(config), weights, meta["tensor_sha256"]),
            )
            self._changed(conn, "published")
        logger.info("published %s (%d vectors) to %s", version_id, meta["num_virtual_tokens"], self.location)
        return PromptVersion(id=version_id, path=None, meta=json.loads(json.dumps(meta)))

    def _write_alias(self, alias: str, target: VersionId) -> None:
        with self._transaction((ALIASES_LOCK, False)) as conn:
            if conn.execute(
                "SELECT 1 FROM prompt_versions WHERE name = %s AND deleted_at IS NULL LIMIT 1", (alias,)
            ).fetchone():
                raise NameConflictError(f"{alias!r} is a prompt name; an alias must have a name of its own.")
            live = conn.execute(
                "SELECT 1 FROM prompt_versions WHERE name = %s AND version = %s AND deleted_at IS NULL FOR SHARE",
                (target.name, target.version),
            ).fetchone()
            if live is not None:
                conn.execute(
                    "INSERT INTO prompt_aliases (alias, name, version) VALUES (%s, %s, %s) "
                    "ON CONFLICT (alias) DO UPDATE SET name = excluded.name, version = excluded.version",
                    (alias, target.name, target.version),
                )
                self._changed(conn, "alias")
        if live is None:  # deleted between resolving and locking
            raise self._not_found(str(target))

    def _remove_alias(self, alias: str) -> None:
        with self._transaction((ALIASES_LOCK, False)) as conn:
            removed = conn.execute("DELETE FROM prompt_aliases WHERE alias = %s RETURNING alias", (alias,)).fetchone()
            if removed is not None:
                self._changed(conn, "alias_removed")
        if removed is None:
            raise self._not_found(alias)

    def delete(self, ref: str, *, force: bool = False) -> list[VersionId]:
        parsed = parse_ref(ref)
        with self._transaction((ALIASES_LOCK, False), (_name_lock(parsed.name), False)) as conn:
            if (
                parsed.version is None
                and conn.execute("SELECT 1 FROM prompt_aliases WHERE alias = %s", (parsed.name,)).fetchone()
            ):
                raise NameConflictError(f"{ref!r} is an alias; remove it with the alias command, not delete.")
            rows = conn.execute(
                "SELECT version FROM prompt_versions WHERE name = %s AND deleted_at IS NULL "
                "AND (%s::integer IS NULL OR version = %s) ORDER BY version",
                (parsed.name, parsed.version, parsed.version),
            ).fetchall()
            targets = [VersionId(parsed.name, version) for (version,) in rows]
            if targets:
                numbers = [t.version for t in targets]
                pointing = conn.execute(
                    "SELECT alias, version FROM prompt_aliases WHERE name = %s AND version = ANY(%s) "
                    'ORDER BY alias COLLATE "C"',
                    (parsed.name, numbers),
                ).fetchall()
                if pointing and not force:
                    raise AliasInUseError(
                        f"Aliases point at {ref}: "
                        f"{', '.join(f'{a} -> {VersionId(parsed.name, v)}' for a, v in pointing)}. "
                        "Move them first or delete with force."
                    )
                conn.execute("DELETE FROM prompt_aliases WHERE name = %s AND version = ANY(%s)", (parsed.name, numbers))
                conn.execute(
                    "DELETE FROM prompt_evaluations WHERE name = %s AND version = ANY(%s)", (parsed.name, numbers)
                )
                conn.execute(
                    "UPDATE prompt_versions SET meta = NULL, adapter_config = NULL, weights = NULL, "
                    "deleted_at = now() WHERE name = %s AND version = ANY(%s)",
                    (parsed.name, numbers),
                )
                self._changed(conn, "deleted")
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
            taken = conn.execute(
                "SELECT DISTINCT name FROM prompt_versions WHERE name = ANY(%s) "
                "UNION SELECT alias FROM prompt_aliases WHERE alias = ANY(%s)",
                (names + list(aliases), names + list(aliases)),
            ).fetchall()
            if taken:
                raise NameConflictError(
                    f"{self.location} already has {', '.join(sorted(n for (n,) in taken))}; "
                    "copy into a store without these names."
                )
            for record in records:
                conn.execute(
                    "INSERT INTO prompt_versions (name, version, meta, adapter_config, weights, tensor_sha256, "
                    "deleted_at) VALUES (%s, %s, %s, %s, %s, %s, CASE WHEN %s THEN now() END)",
                    (
                        record.id.name,
                        record.id.version,
                        None if record.deleted else Jsonb(record.meta),
                        None if record.deleted else Jsonb(record.adapter_config),
                        record.weights,
                        None if record.deleted else record.meta["tensor_sha256"],
                        record.deleted,
                    ),
                )
                for evaluation in record.evaluations:
                    conn.execute(
                        "INSERT INTO prompt_evaluations (name, version, record) VALUES (%s, %s, %s)",
                        (record.id.name, record.id.version, Jsonb(evaluation)),
                    )
            for alias, target in aliases.items():
                name, _, number = target.rpartition("-v")
                conn.execute(
                    "INSERT INTO prompt_aliases (alias, name, version) VALUES (%s, %s, %s)", (alias, name, int(number))
                )
            self._changed(conn, "copied")


def _name_lock(name: str) -> str:
    return f"softprompt:name:{name}"


def _key_lock(key: str) -> str:
    return f"softprompt:idempotency:{key}"


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
