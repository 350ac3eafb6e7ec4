"""Connections to the store's PostgreSQL database: a pool that survives the database going away.

`Database` hands out pooled connections (READ COMMITTED, with lock, statement and idle
timeouts and TCP keepalives) and transactions holding advisory locks, tells connection-level
failures (the database is away: fail every call at once, probe once a second) from the
failures of one call (a timeout, a deadlock, a busy pool), and keeps the LISTEN connection the
store's change notices arrive on. Store semantics live in postgres.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from core.errors import StoreUnavailableError, UnstorableValueError

logger = logging.getLogger(__name__)

CHANNEL = "softprompt_store"
CONNECT_TIMEOUT_S = 3  # a database that does not answer is reported, not waited on
POOL_TIMEOUT_S = 5.0  # the longest a call waits for a pooled connection while the database is up
QUICK_WAIT_S = 0.25  # a call that waits this long for a connection checks whether the database is there at all
PROBE_INTERVAL_S = 1.0  # while it is away: one caller a second checks whether it is back
RECONNECT_TIMEOUT_S = 2.0  # the pool's own reconnection gives up soon, so a probe can grow it again at once
# Every session: a lock or statement that waits this long fails (503, retry) instead of holding a
# pool connection for ever; a client gone mid-transaction loses its locks; keepalives notice a
# vanished peer in about a minute, not two hours.
SESSION = {
    "autocommit": True,
    "connect_timeout": CONNECT_TIMEOUT_S,
    "options": "-c lock_timeout=10s -c statement_timeout=60s -c idle_in_transaction_session_timeout=60s",
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
# SQLSTATEs that mean the connection itself is gone (class 08, and the server shutting down).
CONNECTION_LOST = ("08", "57P01", "57P02", "57P03")


def redact(url: str) -> str:
    """The URL without its password (in the user part or as a parameter), for messages and logs."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


def _read_committed(conn: psycopg.Connection) -> None:
    """Numbering relies on each statement seeing what committed before its lock was granted."""
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED


class Database:
    def __init__(self, url: str, *, pool_size: int = 8, channel: str = CHANNEL, name: str = "softprompt-store"):
        self.url = url
        self.channel = channel
        self.location = redact(url)
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            timeout=POOL_TIMEOUT_S,
            open=False,
            kwargs=SESSION,
            configure=_read_committed,
            reconnect_timeout=RECONNECT_TIMEOUT_S,
            check=ConnectionPool.check_connection,
            name=name,
        )
        self._pool.open(wait=False)
        self._away: str | None = None  # why the database could not be reached; None while it answers
        self._next_probe = 0.0
        self._probing = threading.Lock()
        self._listener: psycopg.Connection | None = None
        self._listener_lock = threading.Lock()
        self._listen_failing = False

    @property
    def available(self) -> bool:
        return self._away is None

    # ----------------------------------------------------------------- connections
    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection. While the database is known to be away every call fails at once,
        except one caller a second that checks whether it is back, so requests that can do
        without the store (those for prompts already loaded) are never held up by it. Errors of
        the connection itself mark the database away; others (a lock or statement timeout, a
        deadlock, a busy pool) fail that call only, with 503 too."""
        probing = False
        if self._away is not None:
            if time.monotonic() < self._next_probe or not self._probing.acquire(blocking=False):
                raise self._unavailable(self._away)
            probing = True
        try:
            try:
                if probing:  # a direct connection answers at once; the pool may be backing off
                    self._connect_directly()
                with self._pooled() as conn:
                    yield conn
            except PoolTimeout as exc:  # _pooled found the database away, or it stayed busy for the whole timeout
                if probing or not self._reachable():
                    self._mark_away(exc)
                raise self._unavailable(_first_line(exc), busy=self._away is None) from exc
            except psycopg.OperationalError as exc:
                if exc.sqlstate is None or exc.sqlstate.startswith(CONNECTION_LOST):
                    self._mark_away(exc)
                    raise self._unavailable(self._away) from exc
                raise self._unavailable(_first_line(exc), busy=True) from exc
            except psycopg.DataError as exc:  # a value from outside that the database cannot hold: the caller's error
                raise UnstorableValueError(
                    f"The store cannot hold a value of this request: {_first_line(exc)}. "
                    "Send plain text without NUL characters and numbers in range."
                ) from exc
        finally:
            if probing:
                self._next_probe = time.monotonic() + PROBE_INTERVAL_S
                self._probing.release()
        if self._away is not None:
            logger.info("the store's database %s answers again", self.location)
            self._away = None

    @contextmanager
    def _pooled(self) -> Iterator[psycopg.Connection]:
        """A pooled connection. A database that just went away shows as a pool that hands out
        nothing: after a short wait one direct connection tells that apart from a busy pool, so
        the first caller to meet the outage fails in a fraction of a second, not the whole timeout."""
        try:
            with self._pool.connection(timeout=QUICK_WAIT_S) as conn:
                yield conn
                return
        except PoolTimeout:
            if not self._reachable():
                raise
        with self._pool.connection(timeout=POOL_TIMEOUT_S - QUICK_WAIT_S) as conn:  # up, but every connection is busy
            yield conn

    def _connect_directly(self) -> None:
        """Open and close one connection outside the pool (raises what connecting raises)."""
        psycopg.connect(self.url, **{**SESSION, "connect_timeout": 1}).close()

    def _reachable(self) -> bool:
        try:
            self._connect_directly()
            return True
        except psycopg.Error:
            return False

    def _mark_away(self, exc: BaseException) -> None:
        if self._away is None:
            logger.warning("the store's database %s cannot be reached: %s", self.location, _first_line(exc))
            self._next_probe = time.monotonic() + PROBE_INTERVAL_S
        self._away = _first_line(exc)

    def _unavailable(self, reason: str, *, busy: bool = False) -> StoreUnavailableError:
        if busy:
            return StoreUnavailableError(
                f"The prompt store's database ({self.location}) could not do this now: {reason}. Retry shortly."
            )
        return StoreUnavailableError(
            f"The prompt store's database ({self.location}) cannot be reached: {reason}. "
            "Prompts already loaded keep serving; retry store operations later."
        )

    @contextmanager
    def transaction(self, *locks: tuple[str, bool]) -> Iterator[psycopg.Connection]:
        """A transaction holding advisory locks, given as (key, shared), in the order given."""
        with self.connection() as conn, conn.transaction():
            for key, shared in locks:
                function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
                conn.execute(f"SELECT {function}(hashtextextended(%s, 0))", (key,))
            yield conn

    def close(self) -> None:
        with self._listener_lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        self._pool.close()

    def wait_for_change(self, timeout: float, stop: threading.Event) -> None:
        """Wake on the first NOTIFY after the last call, on `stop`, or after `timeout`. Without a
        listening connection (the database is away) this waits out `timeout` and tries again
        next time: the caller's rescans are then the fallback poll."""
        if self._away is not None:  # the caller's rescans are how the store finds out it is back
            timeout = min(timeout, PROBE_INTERVAL_S)
        listener, fresh = self._listening()
        if listener is None:  # try to listen again in a second; the caller rescans meanwhile
            stop.wait(min(timeout, PROBE_INTERVAL_S))
            return
        if fresh:  # what changed before this LISTEN was never notified: the caller rescans now
            return
        deadline = time.monotonic() + timeout
        try:
            while not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0 or any(True for _ in listener.notifies(timeout=min(left, 0.5), stop_after=1)):
                    return
        except psycopg.Error as exc:
            logger.warning("lost the store's change notices (%s); polling until they are back", _first_line(exc))
            self._listen_failing = True
            with self._listener_lock:
                if self._listener is listener:
                    self._listener = None
            listener.close()
            stop.wait(min(timeout, 1.0))

    def _listening(self) -> tuple[psycopg.Connection | None, bool]:
        """The listening connection, and whether it was (re)made just now."""
        with self._listener_lock:
            if self._listener is not None:
                return self._listener, False
            try:
                self._listener = psycopg.connect(self.url, **SESSION)
                self._listener.execute(f"LISTEN {self.channel}")
            except psycopg.Error as exc:
                if not self._listen_failing:
                    logger.warning("cannot LISTEN for store changes (%s); polling until it can", _first_line(exc))
                self._listen_failing, self._listener = True, None
                return None, False
            if self._listen_failing:
                logger.info("listening for store changes again")
            self._listen_failing = False
            return self._listener, True


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
