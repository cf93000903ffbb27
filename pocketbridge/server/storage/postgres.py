"""The production dialect: PostgreSQL through psycopg2, row locks per user."""

from __future__ import annotations

import threading
import time
from typing import Any, List, Tuple

from twisted.enterprise import adbapi
from twisted.logger import Logger

from pocketbridge.server.storage.base import Txn
from pocketbridge.server.storage.datastore import Storage

log = Logger()
#: Seconds between two "connection lost" lines of one pool (one line per outage, not per query).
LOST_LOG_INTERVAL = 60.0


MIGRATION_LOCK = 0x70625F6D6967  # "pb_mig"
JOB_LOCK_CLASS = 0x70626A  # "pbj"


def _cursor(txn: Any) -> Any:
    """The driver cursor under a Txn (psycopg2's ``execute_values`` needs one); a bare cursor as it is."""
    return txn.cursor if isinstance(txn, Txn) else txn


def _setup(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("SET synchronous_commit = on")
        cur.execute("SET statement_timeout = '30s'")
    conn.commit()


class _Connection(adbapi.Connection):
    """adbapi's reconnecting connection, without a traceback when the rollback of a dead connection fails."""

    def rollback(self) -> None:
        pool: Any = self._pool
        try:
            self._connection.rollback()
            cursor = self._connection.cursor()
            cursor.execute(pool.good_sql)
            cursor.close()
            self._connection.commit()
            return
        except BaseException as e:
            pool.connection_lost(e)
        pool.disconnect(self._connection)
        raise adbapi.ConnectionLost()


class QuietPool(adbapi.ConnectionPool):
    """
    A ConnectionPool that reports a lost database connection as one warning
    line (at most one per ``LOST_LOG_INTERVAL``) instead of adbapi's
    "Rollback failed" and "Connection close failed" tracebacks. The error
    itself still reaches the caller (``Storage.run``).
    """

    connectionFactory = _Connection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lost_lock = threading.Lock()
        self._lost_logged = -LOST_LOG_INTERVAL

    def connection_lost(self, error: BaseException) -> None:
        """A connection failed its rollback (database gone): log once per interval."""
        now = time.monotonic()
        with self._lost_lock:
            if now - self._lost_logged < LOST_LOG_INTERVAL:
                return
            self._lost_logged = now
        log.warn("database connection lost, reconnecting: {error}", error=str(error).strip() or type(error).__name__)

    def _runInteraction(self, interaction: Any, *args: Any, **kw: Any) -> Any:
        """
        adbapi's transaction, once more on a fresh connection when the pooled
        one turned out dead before COMMIT was sent (after a database restart
        every pooled connection is dead; nothing of that attempt was stored,
        and every transaction here is safe to retry, STYLE.md §8).
        """
        for attempt in (1, 2):
            conn = self.connectionFactory(self)
            trans = self.transactionFactory(self, conn)
            committing = False
            try:
                result = interaction(trans, *args, **kw)
                trans.close()
                committing = True
                conn.commit()
                return result
            except BaseException:
                try:
                    conn.rollback()
                except adbapi.ConnectionLost:
                    # Logged once by connection_lost; the original error is what matters.
                    if attempt == 1 and not committing:
                        continue
                raise
        raise AssertionError("unreachable")

    def _close(self, conn: Any) -> None:
        try:
            conn.close()
        except BaseException:
            pass  # closing a connection that is already dead


class PostgresStorage(Storage):
    """Storage in PostgreSQL; several nodes may share one database."""

    dialect = "postgresql"
    lock_suffix = " FOR UPDATE"

    def __init__(self, url: str, pool_size: int = 4) -> None:
        super().__init__()
        self.url = url
        self.pool_size = pool_size

    def _make_pool(self) -> adbapi.ConnectionPool:
        return QuietPool(
            "psycopg2",
            self.url,
            cp_min=1,
            cp_max=self.pool_size,
            cp_reconnect=True,
            cp_openfun=_setup,
            cp_noisy=False,
            connect_timeout=5,
        )

    def _lock_migrations(self, txn: Txn) -> None:
        # A transaction-scoped advisory lock: the second node waits, then finds
        # the schema current.
        txn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))

    def _try_job_lock(self, txn: Txn, job: str) -> bool:
        # Transaction-scoped: released at commit, so each batch is one lock hold.
        txn.execute("SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))", (JOB_LOCK_CLASS, job))
        return bool(txn.fetchone()[0])

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _write_batch(
        self, txn: Txn, inserts: List[Tuple[Any, ...]], users: List[Tuple[str, int, int, int]],
        streams: List[Tuple[str, str, int]], devices: List[Tuple[str, str, int, int]],
    ) -> None:
        """
        The batch's four writes as one statement (data-modifying CTEs): one
        round trip instead of four; a round trip also costs the pool thread a
        wait for the GIL the busy reactor thread holds.

        Locks stay as before: the users' rows are held since the batch's
        first statement; devices are locked in key order by the materialized
        ``SELECT … ORDER BY … FOR UPDATE`` (see ``_update_devices_in_order``);
        events and streams rows are the batch's users' own, under those locks.
        """
        cur = _cursor(txn)

        def values(template: str, rows: List[Tuple[Any, ...]]) -> bytes:
            return b",".join(cur.mogrify(template, row) for row in rows)

        ctes = [
            b"ev AS (INSERT INTO events (user_id, seq, event_id, device_id, device_seq, stream_id, stream_seq,"
            b" type, encrypted_payload, payload_size, ttl, created_at) VALUES "
            + values("(" + ", ".join(["%s"] * 12) + ")", inserts) + b")",
            b"us AS (UPDATE users AS u SET head_seq = v.h, stored_bytes = v.b, last_activity = v.t FROM (VALUES "
            + values("(%s, %s::bigint, %s::bigint, %s::bigint)", list(users))
            + b") AS v(uid, h, b, t) WHERE u.user_id = v.uid)",
        ]
        if streams:
            ctes.append(b"st AS (INSERT INTO streams (user_id, stream_id, head) VALUES " + values("(%s, %s, %s)", list(streams))
                        + b" ON CONFLICT (user_id, stream_id) DO UPDATE SET head = excluded.head)")
        if devices:
            ctes.append(
                b"dv(uid, did, m, t) AS (VALUES " + values("(%s, %s, %s::bigint, %s::bigint)", list(devices)) + b"),"
                b" l AS MATERIALIZED (SELECT d.user_id, d.device_id, dv.m, dv.t FROM dv JOIN devices d"
                b" ON d.user_id = dv.uid AND d.device_id = dv.did ORDER BY d.user_id, d.device_id FOR UPDATE OF d),"
                b" du AS (UPDATE devices AS d SET last_device_seq = GREATEST(d.last_device_seq, l.m), last_seen = l.t"
                b" FROM l WHERE d.user_id = l.user_id AND d.device_id = l.device_id)")
        cur.execute(b"WITH " + b", ".join(ctes) + b" SELECT 1")

    def _txn_update_cursors(self, txn: Txn, rows: List[Tuple[int, int, str, str]]) -> None:
        self._update_devices_in_order(txn, "delivered_seq", [(u, d, seq, t) for seq, t, u, d in rows])

    def _update_devices_in_order(self, txn: Txn, column: str, rows: List[Tuple[str, str, int, int]]) -> None:
        """
        Raise ``column`` to at least the given value and set ``last_seen``, per
        (user_id, device_id, value, now), in one statement.

        The rows are locked first, in key order, by a materialized ``SELECT …
        ORDER BY … FOR UPDATE`` (LockRows runs above the sort): the writer's
        ``last_device_seq`` and the cursor flush's ``delivered_seq`` updates
        lock devices in the same order whatever join the planner picks, so
        they cannot deadlock (the order of ``rename_device`` too).
        """
        from psycopg2.extras import execute_values

        execute_values(
            _cursor(txn), "WITH v(uid, did, m, t) AS (VALUES %s),"
            " l AS MATERIALIZED (SELECT d.user_id, d.device_id, v.m, v.t FROM v JOIN devices d"
            " ON d.user_id = v.uid AND d.device_id = v.did ORDER BY d.user_id, d.device_id FOR UPDATE OF d)"
            " UPDATE devices AS d SET {c} = GREATEST(d.{c}, l.m), last_seen = l.t"
            " FROM l WHERE d.user_id = l.user_id AND d.device_id = l.device_id".format(c=column), rows,
            template="(%s, %s, %s::bigint, %s::bigint)", page_size=max(1, len(rows)))  # one statement: one order
