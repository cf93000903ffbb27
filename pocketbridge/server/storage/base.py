"""
The base every store is built on: one connection pool, one way to run a
transaction, and the narrow mapping of database outages to StorageUnavailable.

All SQL is parameterised and written once with ``?`` placeholders; a dialect
(``sqlite.py``, ``postgres.py``) supplies the pool, the transaction start, row
locking and the placeholder style. The per-domain stores (``events``,
``devices``, ``account``, ``pairing``, ``pairing_v2``, ``jobs``, ``admin``)
subclass ``BaseStore`` and ``datastore.Storage`` combines them. Every
``_txn_*`` function runs in a database thread, touches only its cursor, and is
safe to retry (STYLE.md §8); work that must wait for COMMIT is registered
with ``Txn.call_after``.
"""

from __future__ import annotations

import enum
import sqlite3
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from twisted.enterprise import adbapi
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pocketbridge.server.storage import migrations

log = Logger()
T = TypeVar("T")

#: Seconds between two "storage … failed" warnings for one kind of call (one outage, few lines).
OUTAGE_LOG_INTERVAL = 60.0


class StorageUnavailable(Exception):
    """The database could not be reached or a transaction failed."""


class StrEnum(str, enum.Enum):
    """
    An Enum whose members are their text (``enum.StrEnum`` arrived in 3.11):
    they equal the strings they replace, and logs and metric labels show the
    value, not ``Class.MEMBER``.
    """

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


# SQLite primary result codes that mean the database, not the statement, is at
# fault: BUSY, LOCKED, NOMEM, READONLY, INTERRUPT, IOERR, CORRUPT, FULL,
# CANTOPEN, PROTOCOL, NOLFS, NOTADB. (SQLITE_ERROR, e.g. "no such table" or a
# syntax error, and CONSTRAINT are bugs.)
SQLITE_OUTAGE_CODES = frozenset({5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 22, 26})


def is_outage(error: BaseException) -> bool:
    """True for operational and connection errors of either driver (or adbapi's lost connection)."""
    if isinstance(error, adbapi.ConnectionLost):
        return True
    if isinstance(error, sqlite3.DatabaseError):
        code = getattr(error, "sqlite_errorcode", None)
        if code is not None:
            return (int(code) & 0xFF) in SQLITE_OUTAGE_CODES
        # Without a result code (older Python), trust the class: OperationalError and plain DatabaseError.
        return type(error) in (sqlite3.OperationalError, sqlite3.DatabaseError)
    try:
        import psycopg2
    except ImportError:  # pragma: no cover - psycopg2 is installed with the package
        return False
    return isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError))


class Txn:
    """
    One attempt at a transaction: the driver's cursor, and the effects to run
    once it has committed.

    Used in a database thread only. ``execute``/``fetch*``/``rowcount`` are the
    DB-API cursor's; driver-specific helpers take ``cursor``. The ``_txn_*``
    functions accept a bare cursor as well (the benchmarks and plan tests
    drive them directly); only a function that calls ``call_after`` needs a Txn.
    """

    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor
        self._after: List[Tuple[Callable[..., object], Tuple[Any, ...], Dict[str, Any]]] = []

    def execute(self, sql: Any, params: Optional[Sequence[Any]] = None) -> None:
        """Run one statement (``params`` in the driver's placeholder style, see ``BaseStore._sql``)."""
        if params is None:
            self.cursor.execute(sql)
        else:
            self.cursor.execute(sql, params)

    def executemany(self, sql: Any, rows: Sequence[Sequence[Any]]) -> None:
        self.cursor.executemany(sql, rows)

    def fetchone(self) -> Any:
        return self.cursor.fetchone()

    def fetchall(self) -> List[Any]:
        return list(self.cursor.fetchall())

    @property
    def rowcount(self) -> int:
        return int(self.cursor.rowcount)

    def call_after(self, fn: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """
        Run ``fn(*args, **kwargs)`` in the reactor thread once this transaction
        has committed, before its caller sees the result. Never on rollback,
        and never for an attempt that was retried (each attempt has its own Txn).
        """
        self._after.append((fn, args, kwargs))

    def run_effects(self, description: str) -> None:
        """Run the registered effects in order (after COMMIT). One that raises is logged; the rest still run."""
        effects, self._after = self._after, []
        for fn, args, kwargs in effects:
            try:
                fn(*args, **kwargs)
            except Exception:
                log.failure("storage {description}: effect after commit failed", description=description)


class BaseStore:
    """
    The connection pool and the transaction runner shared by every store.

    A dialect sets ``dialect`` and ``lock_suffix`` and implements
    ``_make_pool``, ``_begin`` and ``_sql``. Public methods of the stores
    return Deferreds.
    """

    dialect = ""
    lock_suffix = ""  # " FOR UPDATE" where row locks exist

    def __init__(self) -> None:
        self.pool: Optional[adbapi.ConnectionPool] = None
        # Outage log throttle per kind of call and error class: when it last logged, failures not logged since.
        self._outage_logged: Dict[Tuple[str, str], float] = {}
        self._outage_quiet: Dict[Tuple[str, str], int] = {}

    # -------------------------------------------------------------- dialect hooks

    def _make_pool(self) -> adbapi.ConnectionPool:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        """Translate ``?`` placeholders to the driver's style."""
        return sql

    def _begin(self, txn: Any) -> None:
        """Start the transaction (SQLite needs an explicit BEGIN IMMEDIATE)."""

    def _lock_migrations(self, txn: Txn) -> None:
        """Serialise concurrent migrators (several nodes starting at once)."""

    def _try_job_lock(self, txn: Txn, job: str) -> bool:
        """Take ``job``'s cluster-wide lock for this transaction. SQLite has one process and BEGIN IMMEDIATE."""
        return True

    def greatest(self, a: str, b: str) -> str:
        """SQL for the larger of two values."""
        return "GREATEST({}, {})".format(a, b)

    def _execute(self, txn: Any, sql: str, params: Sequence[Any] = ()) -> None:
        txn.execute(self._sql(sql), tuple(params))

    def _executemany(self, txn: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        txn.executemany(self._sql(sql), rows)

    # -------------------------------------------------------------- running transactions

    def _log_outage(self, description: str, kind: str, error: str) -> None:
        """One warning per kind of call and error class per ``OUTAGE_LOG_INTERVAL``, however many calls fail."""
        key = (description, kind)
        now = time.monotonic()
        last = self._outage_logged.get(key)
        if last is not None and now - last < OUTAGE_LOG_INTERVAL:
            self._outage_quiet[key] = self._outage_quiet.get(key, 0) + 1
            return
        self._outage_logged[key] = now
        quiet = self._outage_quiet.pop(key, 0)
        if quiet:
            log.warn("storage {description} failed: {error} ({quiet} more failures since the last line)",
                     description=description, error=error, quiet=quiet)
        else:
            log.warn("storage {description} failed: {error}", description=description, error=error)

    def run(self, description: str, fn: Callable[..., T], *args: Any) -> "Deferred[T]":
        """
        Run ``fn(txn, *args)`` in one transaction (``txn`` a ``Txn``); after
        COMMIT, run the effects it registered, then fire with its result.

        An operational or connection error (``is_outage``) becomes
        StorageUnavailable; a cancelled call (its client went away) fails
        with CancelledError, unlogged (a transaction that still commits runs
        its effects all the same); anything else is a bug: logged with its
        traceback and passed on as it is.
        """
        assert self.pool is not None, "storage not started"

        def interaction(cursor: Any) -> Tuple[T, Txn]:
            txn = Txn(cursor)
            self._begin(txn)
            return fn(txn, *args), txn

        result: "Deferred[T]" = Deferred()

        def committed(done: Tuple[T, Txn]) -> None:
            value, txn = done
            txn.run_effects(description)
            result.callback(value)

        # The pool's Deferred is not the caller's: cancelling the caller's
        # cannot drop the effects of a transaction that commits anyway.
        self.pool.runInteraction(interaction).addCallbacks(committed, result.errback)

        def failed(f: Failure) -> Any:
            if f.check(StorageUnavailable, migrations.SchemaTooNew, CancelledError):
                return f
            if is_outage(f.value):
                self._log_outage(description, type(f.value).__name__, f.getErrorMessage())
                raise StorageUnavailable(description)
            log.failure("storage {description}: bug", f, description=description)
            return f

        result.addErrback(failed)
        return result

    def run_locked(self, job: str, fn: Callable[..., int], *args: Any) -> "Deferred[Optional[int]]":
        """Run ``fn(txn, *args)`` under ``job``'s cluster-wide lock; fires None when another node holds it."""

        def locked(txn: Txn) -> Optional[int]:
            if not self._try_job_lock(txn, job):
                return None
            return fn(txn, *args)

        return self.run("job:" + job, locked)

    # -------------------------------------------------------------- lifecycle

    def open(self) -> None:
        """Open the connection pool (migrations ran before, see ``storage.sync``)."""
        if self.pool is None:
            self.pool = self._make_pool()

    def start(self) -> "Deferred[int]":
        """Open the pool and apply pending migrations; fires with the schema version."""
        self.open()
        return self.run("migrate", self._txn_migrate)

    def close(self) -> None:
        """Close the pool."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def _txn_migrate(self, txn: Txn) -> int:
        self._lock_migrations(txn)
        files = migrations.available(self.dialect)
        have = migrations.current_version(txn)
        if have > len(files):
            raise migrations.SchemaTooNew(
                "database schema version {} is newer than this server ({})".format(have, len(files))
            )
        for version, name, sql in files[have:]:
            for statement in migrations.statements(sql):
                txn.execute(statement)
            self._execute(
                txn, "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)", (version, name, int(time.time() * 1000))
            )
            # All pending files share this transaction: say "applied" only once it committed.
            txn.call_after(log.info, "applied migration {name}", name=name)
        return len(files)

    def migrate(self) -> "Deferred[int]":
        """Apply pending migrations (the pool must be open)."""
        return self.run("migrate", self._txn_migrate)

    def ping(self) -> "Deferred[bool]":
        """A trivial query, for /health."""

        def txn_fn(txn: Txn) -> bool:
            self._execute(txn, "SELECT 1")
            return True

        return self.run("ping", txn_fn)
