"""The PostgreSQL store's schema: numbered SQL files in `migrations/`, applied in order.

`migrate` runs at every start, in one transaction under an advisory lock (replicas starting
together apply each file once): it records each applied file in `softprompt_schema` and
applies the ones this version of softprompt has that the database lacks. A database whose
schema is newer than the newest file here is refused: an older server must not write to a
schema it does not know.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from core.errors import SchemaVersionError

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
MIGRATION_LOCK = 0x50F7_5C4E  # pg_advisory_xact_lock key for applying migrations
FILE_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@dataclass(frozen=True)
class Migration:
    number: int
    name: str
    sql: str


def known_migrations() -> list[Migration]:
    """The migrations shipped with this package, by number (1, 2, ... with no gaps)."""
    found = []
    for path in sorted(MIGRATIONS.glob("*.sql")):
        match = FILE_NAME.fullmatch(path.name)
        if match is None:
            raise RuntimeError(f"{path}: migration files are named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    if [m.number for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{MIGRATIONS}: migrations must be numbered 1..N without gaps")
    return found


def migrate(conn) -> int:
    """Bring the database's schema up to this package's newest migration; return its number."""
    migrations = known_migrations()
    latest = migrations[-1].number
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS softprompt_schema (version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        current = conn.execute("SELECT coalesce(max(version), 0) FROM softprompt_schema").fetchone()[0]
        if current > latest:
            raise SchemaVersionError(
                f"The store's database has schema version {current}, newer than this softprompt knows "
                f"({latest}): another replica runs a newer release. Upgrade softprompt before pointing it at this "
                "database."
            )
        for migration in migrations[current:]:
            conn.execute(migration.sql)
            conn.execute(
                "INSERT INTO softprompt_schema (version, name) VALUES (%s, %s)", (migration.number, migration.name)
            )
            logger.info("applied store schema migration %04d_%s", migration.number, migration.name)
    return latest


def schema_version(conn) -> int:
    """The schema version the database is at (0 for an empty database)."""
    exists = conn.execute("SELECT to_regclass('softprompt_schema') IS NOT NULL").fetchone()[0]
    if not exists:
        return 0
    return conn.execute("SELECT coalesce(max(version), 0) FROM softprompt_schema").fetchone()[0]
