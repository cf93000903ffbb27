"""
The storage layer shared by both dialects.

All SQL is parameterised and written once with ``?`` placeholders; a dialect
subclass supplies the connection pool, the transaction start, row locking and
the placeholder style. Every ``_txn_*`` function runs in a database thread,
touches only its cursor, and is safe to retry (STYLE.md §8).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from twisted.enterprise import adbapi
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from pocketbridge.protocol.events import NewEvent, StoredEvent
from pocketbridge.server.storage import migrations
from pocketbridge.server.storage.q_account import AccountQueries
from pocketbridge.server.storage.q_admin import AdminQueries
from pocketbridge.server.storage.q_devices import DevicesQueries
from pocketbridge.server.storage.q_jobs import JobQueries
from pocketbridge.server.storage.q_pairing import PairingQueries
from pocketbridge.server.storage.q_pairing_v2 import PairingV2Queries

log = Logger()
T = TypeVar("T")

EVENT_COLUMNS = (
    "user_id, seq, event_id, device_id, device_seq, stream_id, stream_seq, type, encrypted_payload, ttl, created_at"
)
# Bytes a relayed event adds around its payload, stream_id and type when
# serialized: keys, ids (user 64, event and device 36 each), five integers.
RELAY_OVERHEAD = 400
# Rows per set-based lookup statement (keeps the parameter count far below driver limits).
SET_CHUNK = 500


#: Seconds between two "storage … failed" warnings for one kind of call (one outage, few lines).
OUTAGE_LOG_INTERVAL = 60.0


class StorageUnavailable(Exception):
    """The database could not be reached or a transaction failed."""


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


@dataclass(frozen=True)
class DeviceState:
    """A device row as the gateway needs it."""

    user_id: str
    device_id: str
    name: Optional[str]
    type: str
    created_at: int
    last_seen: int
    last_device_seq: int
    delivered_seq: int
    revoked_at: Optional[int]


@dataclass(frozen=True)
class Outcome:
    """What the writer did with one event: stored, duplicate, conflict, quota or no_user."""

    kind: str
    seq: Optional[int] = None
    stream_seq: Optional[int] = None
    stored: Optional[StoredEvent] = None


def _stored(row: Sequence[Any]) -> StoredEvent:
    return StoredEvent(
        user_id=row[0],
        seq=int(row[1]),
        event_id=row[2],
        device_id=row[3],
        device_seq=int(row[4]),
        stream_id=row[5],
        stream_seq=int(row[6]),
        type=row[7],
        encrypted_payload=row[8],
        ttl=None if row[9] is None else int(row[9]),
        created_at=int(row[10]),
    )


def _in(n: int) -> str:
    return "(" + ",".join("?" * n) + ")"


# Set-based lookups by key: the keys are a VALUES list joined to the table,
# the keys first. "k CROSS JOIN table" fixes that join order in SQLite (one
# index search per key: a row-value "IN (VALUES …)" is a full table scan in
# SQLite 3.40); PostgreSQL ignores the hint and picks its own plan, a nested
# loop over the index once the table is large.

def _values(name: str, columns: str, width: int, n: int) -> str:
    return "{}({}) AS (VALUES {})".format(name, columns, ",".join(["(" + ", ".join("?" * width) + ")"] * n))


def existing_sql(pairs: int, triples: int) -> str:
    """Stored events matching ``pairs`` (user_id, event_id) or ``triples`` (user_id, device_id, device_seq)."""
    columns = ", ".join("e." + c.strip() for c in EVENT_COLUMNS.split(","))
    ctes, parts = [], []
    if pairs:
        ctes.append(_values("eid", "u, e", 2, pairs))
        parts.append("SELECT " + columns + " FROM eid CROSS JOIN events e WHERE e.user_id = eid.u AND e.event_id = eid.e")
    if triples:
        ctes.append(_values("dseq", "u, d, s", 3, triples))
        parts.append("SELECT " + columns + " FROM dseq CROSS JOIN events e"
                     " WHERE e.user_id = dseq.u AND e.device_id = dseq.d AND e.device_seq = dseq.s")
    return "WITH " + ", ".join(ctes) + " " + " UNION ALL ".join(parts)


def stream_heads_sql(pairs: int) -> str:
    """Heads of ``pairs`` (user_id, stream_id)."""
    return ("WITH " + _values("k", "u, s", 2, pairs) + " SELECT st.user_id, st.stream_id, st.head"
            " FROM k CROSS JOIN streams st WHERE st.user_id = k.u AND st.stream_id = k.s")


class Storage(DevicesQueries, PairingQueries, PairingV2Queries, AccountQueries, AdminQueries, JobQueries):
    """
    Users, devices and events in one SQL database via adbapi.

    Subclasses set ``dialect`` and implement ``_make_pool``, ``_begin`` and
    ``_sql``. Public methods return Deferreds.
    """

    dialect = ""
    lock_suffix = ""  # " FOR UPDATE" where row locks exist

    def __init__(self) -> None:
        self.pool: Optional[adbapi.ConnectionPool] = None
        # Outage log throttle per kind of call and error class: when it last logged, failures not logged since.
        self._outage_logged: Dict[Tuple[str, str], float] = {}
        self._outage_quiet: Dict[Tuple[str, str], int] = {}

    # -------------------------------------------------------------- plumbing

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

    def _make_pool(self) -> adbapi.ConnectionPool:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        """Translate ``?`` placeholders to the driver's style."""
        return sql

    def _begin(self, txn: Any) -> None:
        """Start the transaction (SQLite needs an explicit BEGIN IMMEDIATE)."""

    def _execute(self, txn: Any, sql: str, params: Sequence[Any] = ()) -> None:
        txn.execute(self._sql(sql), tuple(params))

    def _executemany(self, txn: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        txn.executemany(self._sql(sql), rows)

    def run(self, description: str, fn: Callable[..., T], *args: Any) -> "Deferred[T]":
        """
        Run ``fn(txn, *args)`` in one transaction. An operational or
        connection error (``is_outage``) becomes StorageUnavailable; a
        cancelled call (its client went away) fails with CancelledError,
        unlogged; anything else is a bug: logged with its traceback and
        passed on as it is.
        """
        assert self.pool is not None, "storage not started"

        def interaction(txn: Any) -> T:
            self._begin(txn)
            return fn(txn, *args)

        d = self.pool.runInteraction(interaction)

        def failed(f: Any) -> Any:
            if f.check(StorageUnavailable, migrations.SchemaTooNew, CancelledError):
                return f
            if is_outage(f.value):
                self._log_outage(description, type(f.value).__name__, f.getErrorMessage())
                raise StorageUnavailable(description)
            log.failure("storage {description}: bug", f, description=description)
            return f

        d.addErrback(failed)
        return d

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

    def _lock_migrations(self, txn: Any) -> None:
        """Serialise concurrent migrators (several nodes starting at once)."""

    def _txn_migrate(self, txn: Any) -> int:
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
            log.info("applied migration {name}", name=name)
        return len(files)

    def migrate(self) -> "Deferred[int]":
        """Apply pending migrations (the pool must be open)."""
        return self.run("migrate", self._txn_migrate)

    def ping(self) -> "Deferred[bool]":
        """A trivial query, for /health."""
        return self.run("ping", lambda txn: (self._execute(txn, "SELECT 1"), True)[1])  # type: ignore[func-returns-value]  # tuple: query, then True

    # -------------------------------------------------------------- devices

    def register_device(
        self, user_id: str, device_id: str, name: Optional[str], dtype: str, now: int
    ) -> "Deferred[Tuple[DeviceState, bool]]":
        """
        Create the user and device rows if absent; fires with (device, created).

        A revoked device is returned as is (never re-created); ``created`` is
        true only for the call whose insert created the device row.
        """
        return self.run("register_device", self._txn_register, user_id, device_id, name, dtype, now)

    def _txn_register(
        self, txn: Any, user_id: str, device_id: str, name: Optional[str], dtype: str, now: int
    ) -> Tuple[DeviceState, bool]:
        # A returning device (the common case) only reads: no write, so no
        # durable commit on the handshake path. Its last_seen is "now" from
        # presence while it is online and is written when its last socket closes.
        existing = self._txn_get_device(txn, user_id, device_id)
        if existing is not None:
            return existing, False
        self._execute(
            txn,
            "INSERT INTO users (user_id, head_seq, purged_below_seq, stored_bytes, created_at, last_activity)"
            " VALUES (?, 0, 0, 0, ?, ?) ON CONFLICT (user_id) DO NOTHING",
            (user_id, now, now),
        )
        # A device row removed by a legacy (soft) revocation may come back: it
        # starts from the device_seqs already stored, so last_ack_device_seq is true.
        self._execute(
            txn,
            "INSERT INTO devices (user_id, device_id, name, type, created_at, last_seen, last_device_seq)"
            " VALUES (?, ?, ?, ?, ?, ?, COALESCE((SELECT MAX(device_seq) FROM events"
            " WHERE user_id = ? AND device_id = ?), 0)) ON CONFLICT (user_id, device_id) DO NOTHING",
            (user_id, device_id, name, dtype, now, now, user_id, device_id),
        )
        created = txn.rowcount == 1
        device = self._txn_get_device(txn, user_id, device_id)
        assert device is not None
        return device, created

    def register_and_read_head(
        self, user_id: str, device_id: str, name: Optional[str], dtype: str, now: int
    ) -> "Deferred[Tuple[DeviceState, bool, int, int]]":
        """``register_device`` and ``user_state`` in one transaction: (device, created, head, purged_below)."""

        def both(txn: Any) -> Tuple[DeviceState, bool, int, int]:
            device, created = self._txn_register(txn, user_id, device_id, name, dtype, now)
            head, purged = self._txn_user_state(txn, user_id)
            return device, created, head, purged

        return self.run("register_and_read_head", both)

    def get_device(self, user_id: str, device_id: str) -> "Deferred[Optional[DeviceState]]":
        """The device row, or None."""
        return self.run("get_device", self._txn_get_device, user_id, device_id)

    def _txn_get_device(self, txn: Any, user_id: str, device_id: str) -> Optional[DeviceState]:
        self._execute(
            txn,
            "SELECT user_id, device_id, name, type, created_at, last_seen, last_device_seq, delivered_seq, revoked_at"
            " FROM devices WHERE user_id = ? AND device_id = ?",
            (user_id, device_id),
        )
        row = txn.fetchone()
        if row is None:
            return None
        return DeviceState(
            row[0], row[1], row[2], row[3], int(row[4]), int(row[5]), int(row[6]), int(row[7]),
            None if row[8] is None else int(row[8]),
        )

    def update_cursors(
        self, cursors: Dict[Tuple[str, str], int], now: int, last_seen: Optional[Dict[Tuple[str, str], int]] = None,
    ) -> "Deferred[None]":
        """
        Raise each device's ``delivered_seq`` to at least the given seq (never
        lowers it) and set its ``last_seen``: the time in ``last_seen`` (its
        last socket closed then), else ``now``. A device only in ``last_seen``
        keeps its cursor (GREATEST with 0). One transaction for the whole batch.
        """
        seen = last_seen or {}
        keys = sorted(set(cursors) | set(seen))
        rows = [(cursors.get(key, 0), seen.get(key, now), key[0], key[1]) for key in keys]
        return self.run("update_cursors", self._txn_update_cursors, rows)

    def _txn_update_cursors(self, txn: Any, rows: List[Tuple[int, int, str, str]]) -> None:
        self._executemany(
            txn,
            "UPDATE devices SET delivered_seq = " + self.greatest("delivered_seq", "?") + ", last_seen = ?"
            " WHERE user_id = ? AND device_id = ?",
            rows,
        )

    def record_unacked(self, user_id: str, device_id: str, delivered: int, blocker: int, now: int) -> "Deferred[bool]":
        """
        A connection ended with ``blocker`` (= delivered + 1) sent but never
        acknowledged. The third connection in a row that ends so moves the
        cursor past it (PROTOCOL.md §7.2); fires True when that happened.
        """
        return self.run("record_unacked", self._txn_unacked, user_id, device_id, delivered, blocker, now)

    def _txn_unacked(self, txn: Any, user_id: str, device_id: str, delivered: int, blocker: int, now: int) -> bool:
        self._execute(
            txn, "SELECT delivered_seq, stuck_seq, stuck_count FROM devices WHERE user_id = ? AND device_id = ?"
            + self.lock_suffix, (user_id, device_id),
        )
        row = txn.fetchone()
        if row is None:
            return False
        stored, stuck_seq, count = int(row[0]), int(row[1]), int(row[2])
        current = max(stored, delivered)
        if current >= blocker:
            return False
        count = count + 1 if stuck_seq == blocker else 1
        gave_up = count >= 3
        self._execute(
            txn,
            "UPDATE devices SET delivered_seq = ?, stuck_seq = ?, stuck_count = ?, last_seen = ?"
            " WHERE user_id = ? AND device_id = ?",
            (blocker if gave_up else current, blocker, 0 if gave_up else count, now, user_id, device_id),
        )
        return gave_up

    def touch_device(self, user_id: str, device_id: str, now: int) -> "Deferred[None]":
        """Set ``last_seen`` (when the device's last socket closed)."""
        return self.run("touch_device", self._txn_touch, user_id, device_id, now)

    def _txn_touch(self, txn: Any, user_id: str, device_id: str, now: int) -> None:
        self._execute(txn, "UPDATE devices SET last_seen = ? WHERE user_id = ? AND device_id = ?", (now, user_id, device_id))

    def greatest(self, a: str, b: str) -> str:
        """SQL for the larger of two values."""
        return "GREATEST({}, {})".format(a, b)

    # -------------------------------------------------------------- reading events

    def head(self, user_id: str) -> "Deferred[int]":
        """The user's highest committed seq (0 for none)."""
        return self.run("head", self._txn_head, user_id)

    def _txn_head(self, txn: Any, user_id: str) -> int:
        self._execute(txn, "SELECT head_seq FROM users WHERE user_id = ?", (user_id,))
        row = txn.fetchone()
        return int(row[0]) if row else 0

    def user_state(self, user_id: str) -> "Deferred[Tuple[int, int]]":
        """(head_seq, purged_below_seq) of the user ((0, 0) for none)."""
        return self.run("user_state", self._txn_user_state, user_id)

    def _txn_user_state(self, txn: Any, user_id: str) -> Tuple[int, int]:
        self._execute(txn, "SELECT head_seq, purged_below_seq FROM users WHERE user_id = ?", (user_id,))
        row = txn.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def count_backlog(self, user_id: str, after: int, upto: int, exclude_device: str, now: int) -> "Deferred[int]":
        """Events of other devices with after < seq ≤ upto, not expired at ``now``."""
        return self.run("count_backlog", self._txn_count, user_id, after, upto, exclude_device, now)

    def _txn_count(self, txn: Any, user_id: str, after: int, upto: int, exclude: str, now: int) -> int:
        self._execute(
            txn,
            "SELECT COUNT(*) FROM events WHERE user_id = ? AND seq > ? AND seq <= ? AND device_id <> ?"
            " AND (ttl IS NULL OR ttl > ?)",
            (user_id, after, upto, exclude, now),
        )
        return int(txn.fetchone()[0])

    def read_page(
        self, user_id: str, after: int, upto: int, exclude_device: Optional[str], limit: int, max_bytes: int, now: int
    ) -> "Deferred[Tuple[List[StoredEvent], bool]]":
        """
        The next page of events with after < seq ≤ upto, in seq order.

        Skips events of ``exclude_device`` and events expired at ``now``. At
        most ``limit`` events and about ``max_bytes`` of serialized JSON, but at
        least one. Fires with (events, more_remaining).
        """
        return self.run("read_page", self._txn_read_page, user_id, after, upto, exclude_device, limit, max_bytes, now)

    def _txn_read_page(
        self, txn: Any, user_id: str, after: int, upto: int, exclude: Optional[str], limit: int, max_bytes: int, now: int,
        payload_only: bool = False,
    ) -> Tuple[List[StoredEvent], bool]:
        """
        ``read_page`` in a transaction. ``max_bytes`` bounds the serialized
        events, or with ``payload_only`` just the sum of their payloads.
        """
        where = "user_id = ? AND seq > ? AND seq <= ? AND (ttl IS NULL OR ttl > ?)"
        tail: List[Any] = [now]
        if exclude is not None:
            where += " AND device_id <> ?"
            tail.append(exclude)
        # Sizes first, so a page of large events never loads more than it sends.
        # Read them in growing seq windows: each statement scans a bounded
        # range whatever plan the database picks (without statistics a plain
        # "seq > after ORDER BY seq LIMIT" can scan the user's whole backlog).
        sizes: List[Any] = []
        low, window = after, max(2 * (limit + 1), 256)
        while True:
            high = min(upto, low + window)
            self._execute(
                txn, "SELECT seq, payload_size, LENGTH(stream_id) + LENGTH(type) FROM events WHERE " + where
                + " ORDER BY seq LIMIT ?", [user_id, low, high] + tail + [limit + 1 - len(sizes)])
            sizes.extend(txn.fetchall())
            if len(sizes) > limit or high >= upto:
                break
            low, window = high, window * 2
        params: List[Any] = [user_id, after, upto] + tail
        if not sizes:
            return [], False
        total = 0
        last = None
        count = 0
        for seq, size, ids in sizes[:limit]:
            cost = int(size) if payload_only else int(size) + int(ids) + RELAY_OVERHEAD
            if count and total + cost > max_bytes:
                break
            total += cost
            last = int(seq)
            count += 1
        more = len(sizes) > count
        self._execute(
            txn,
            "SELECT " + EVENT_COLUMNS + " FROM events WHERE " + where + " AND seq <= ? ORDER BY seq",
            params + [last],
        )
        return [_stored(r) for r in txn.fetchall()], more

    def read_range(self, user_id: str, after: int, upto: int) -> "Deferred[List[StoredEvent]]":
        """Every event with after < seq ≤ upto (all devices, expired included), for gap filling."""
        return self.run("read_range", self._txn_read_range, user_id, after, upto)

    def _txn_read_range(self, txn: Any, user_id: str, after: int, upto: int) -> List[StoredEvent]:
        self._execute(
            txn,
            "SELECT " + EVENT_COLUMNS + " FROM events WHERE user_id = ? AND seq > ? AND seq <= ? ORDER BY seq",
            (user_id, after, upto),
        )
        return [_stored(r) for r in txn.fetchall()]

    # -------------------------------------------------------------- the write path

    def commit_batch(self, events: List[NewEvent], now: int, max_user_bytes: int) -> "Deferred[List[Outcome]]":
        """
        Store a batch in one transaction; fires with one Outcome per event, in order.

        Duplicates and conflicts are decided under each user's row lock, before
        any seq is allocated (ARCHITECTURE.md, the event path step 2).
        """
        return self.run("commit_batch", self._txn_commit, events, now, max_user_bytes)

    def _txn_commit(self, txn: Any, events: List[NewEvent], now: int, max_user_bytes: int) -> List[Outcome]:
        by_user: Dict[str, List[int]] = {}
        for i, ev in enumerate(events):
            by_user.setdefault(ev.user_id, []).append(i)
        users = sorted(by_user)
        # Lock the users' counter rows in a fixed order (no deadlock between nodes).
        self._execute(
            txn,
            "SELECT user_id, head_seq, stored_bytes FROM users WHERE user_id IN " + _in(len(users))
            + " ORDER BY user_id" + self.lock_suffix,
            users,
        )
        heads = {r[0]: [int(r[1]), int(r[2])] for r in txn.fetchall()}
        outcomes: List[Optional[Outcome]] = [None] * len(events)
        inserts: List[Tuple[Any, ...]] = []
        device_max: Dict[Tuple[str, str], int] = {}
        stream_heads_changed: Dict[Tuple[str, str], int] = {}
        known = [ev for ev in events if ev.user_id in heads]
        # One statement each for the whole batch, not one per user: at load a
        # batch holds many users, and every statement is a round trip.
        by_eid, by_dseq = self._existing(txn, known)
        streams = self._stream_heads(txn, sorted({(ev.user_id, ev.stream_id) for ev in known}))
        for user in users:
            idx = by_user[user]
            if user not in heads:
                for i in idx:
                    outcomes[i] = Outcome("no_user")
                continue
            head, stored_bytes = heads[user]
            for i in idx:
                ev = events[i]
                prior = by_eid.get((user, ev.event_id))
                same_seq = by_dseq.get((user, ev.device_id, ev.device_seq))
                if prior is not None or same_seq is not None:
                    if prior is not None and prior[0] == ev.device_id and prior[1] == ev.device_seq:
                        outcomes[i] = Outcome("duplicate", prior[2], prior[3], prior[4])
                    else:
                        outcomes[i] = Outcome("conflict")
                    continue
                if stored_bytes + ev.payload_size > max_user_bytes:
                    outcomes[i] = Outcome("quota")
                    continue
                head += 1
                stored_bytes += ev.payload_size
                sseq = streams.get((user, ev.stream_id), 0) + 1
                streams[(user, ev.stream_id)] = sseq
                stream_heads_changed[(user, ev.stream_id)] = sseq
                row = StoredEvent(
                    user, head, ev.event_id, ev.device_id, ev.device_seq, ev.stream_id, sseq,
                    ev.type, ev.encrypted_payload, ev.ttl, now,
                )
                # Later events in this batch see this one as existing.
                entry = (ev.device_id, ev.device_seq, head, sseq, row)
                by_eid[(user, ev.event_id)] = entry
                by_dseq[(user, ev.device_id, ev.device_seq)] = entry
                outcomes[i] = Outcome("stored", head, sseq, row)
                inserts.append(
                    (user, head, ev.event_id, ev.device_id, ev.device_seq, ev.stream_id, sseq, ev.type,
                     ev.encrypted_payload, ev.payload_size, ev.ttl, now)
                )
                key = (user, ev.device_id)
                device_max[key] = max(device_max.get(key, 0), ev.device_seq)
            heads[user] = [head, stored_bytes]
        if inserts:
            self._insert_events(txn, inserts)
            self._update_users(txn, [(u, heads[u][0], heads[u][1], now) for u in users if u in heads])
            self._upsert_streams(txn, [(u, st, h) for (u, st), h in sorted(stream_heads_changed.items())])
            self._update_devices(txn, [(u, d, m, now) for (u, d), m in sorted(device_max.items())])
        return [o if o is not None else Outcome("conflict") for o in outcomes]

    # Bulk writes of a batch; PostgreSQL overrides them with one statement each.

    def _update_users(self, txn: Any, rows: List[Tuple[str, int, int, int]]) -> None:
        """(user_id, head_seq, stored_bytes, last_activity) per user."""
        self._executemany(
            txn, "UPDATE users SET head_seq = ?, stored_bytes = ?, last_activity = ? WHERE user_id = ?",
            [(h, b, t, u) for u, h, b, t in rows])

    def _upsert_streams(self, txn: Any, rows: List[Tuple[str, str, int]]) -> None:
        """(user_id, stream_id, head) per changed stream."""
        self._executemany(
            txn, "INSERT INTO streams (user_id, stream_id, head) VALUES (?, ?, ?)"
            " ON CONFLICT (user_id, stream_id) DO UPDATE SET head = excluded.head", rows)

    def _update_devices(self, txn: Any, rows: List[Tuple[str, str, int, int]]) -> None:
        """(user_id, device_id, highest device_seq stored, now) per sending device."""
        self._executemany(
            txn, "UPDATE devices SET last_device_seq = " + self.greatest("last_device_seq", "?")
            + ", last_seen = ? WHERE user_id = ? AND device_id = ?", [(m, t, u, d) for u, d, m, t in rows])

    def _insert_events(self, txn: Any, rows: List[Tuple[Any, ...]]) -> None:
        self._executemany(
            txn,
            "INSERT INTO events (user_id, seq, event_id, device_id, device_seq, stream_id, stream_seq, type,"
            " encrypted_payload, payload_size, ttl, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    def _existing(
        self, txn: Any, events: List[NewEvent]
    ) -> Tuple[Dict[Tuple[str, str], Tuple[Any, ...]], Dict[Tuple[str, str, int], Tuple[Any, ...]]]:
        """Stored events sharing an (user, event_id) or (user, device, device_seq) with the batch."""
        by_eid: Dict[Tuple[str, str], Tuple[Any, ...]] = {}
        by_dseq: Dict[Tuple[str, str, int], Tuple[Any, ...]] = {}
        if not events:
            return by_eid, by_dseq
        pairs = sorted({(e.user_id, e.event_id) for e in events})
        triples = sorted({(e.user_id, e.device_id, e.device_seq) for e in events})
        rows: List[Sequence[Any]] = []
        for chunk in range(0, max(len(pairs), len(triples)), SET_CHUNK):
            p = pairs[chunk:chunk + SET_CHUNK]
            t = triples[chunk:chunk + SET_CHUNK]
            self._execute(txn, existing_sql(len(p), len(t)),
                          [x for pair in p for x in pair] + [x for triple in t for x in triple])
            rows.extend(txn.fetchall())
        for r in rows:
            st = _stored(r)
            entry = (st.device_id, st.device_seq, st.seq, st.stream_seq, st)
            by_eid[(st.user_id, st.event_id)] = entry
            by_dseq[(st.user_id, st.device_id, st.device_seq)] = entry
        return by_eid, by_dseq

    def _stream_heads(self, txn: Any, pairs: List[Tuple[str, str]]) -> Dict[Tuple[str, str], int]:
        """Current head of each (user, stream) of the batch."""
        out: Dict[Tuple[str, str], int] = {}
        for chunk in range(0, len(pairs), SET_CHUNK):
            p = pairs[chunk:chunk + SET_CHUNK]
            self._execute(txn, stream_heads_sql(len(p)), [x for pair in p for x in pair])
            out.update({(r[0], r[1]): int(r[2]) for r in txn.fetchall()})
        return out
