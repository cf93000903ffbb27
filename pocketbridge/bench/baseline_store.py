"""
Storage and bus baselines: what PostgreSQL, SQLite and Redis do on this
machine when driven directly, with no server in between.

- PostgreSQL (psycopg2, ``synchronous_commit = on``) in a throwaway
  database created and dropped here: one-row commits/s (the fsync ceiling of
  one connection), multi-row commits (``batch`` rows per INSERT and per
  transaction), and keyset-paged reads of those rows (the catch-up query).
  The table mirrors the server's ``events`` table and its unique indexes.
- SQLite (WAL, ``synchronous=FULL``, ``BEGIN IMMEDIATE``), the same writes,
  in a temporary directory.
- Redis: PUBLISH with txredisapi (hiredis parser, TCP_NODELAY, as the
  server's bus) with ``window`` commands in flight, counted when a
  subscriber on another connection has received them.

The database functions block; each runs alone in its child process.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, List, Tuple

from pocketbridge.bench import load
from pocketbridge.bench.stats import latency_summary, rate

_COLUMNS = ("user_id, seq, event_id, device_id, device_seq, stream_id, stream_seq, type, encrypted_payload, "
            "payload_size, ttl, created_at")
_CREATE = [
    "CREATE TABLE bench_events (user_id TEXT NOT NULL, seq BIGINT NOT NULL, event_id TEXT NOT NULL, "
    "device_id TEXT NOT NULL, device_seq BIGINT NOT NULL, stream_id TEXT NOT NULL, stream_seq BIGINT NOT NULL, "
    "type TEXT NOT NULL, encrypted_payload TEXT NOT NULL, payload_size BIGINT NOT NULL, ttl BIGINT, "
    "created_at BIGINT NOT NULL, PRIMARY KEY (user_id, seq))",
    "CREATE UNIQUE INDEX bench_events_event_id ON bench_events (user_id, event_id)",
    "CREATE UNIQUE INDEX bench_events_device_seq ON bench_events (user_id, device_id, device_seq)",
    "CREATE INDEX bench_events_created ON bench_events (created_at)",
]
_USER = "cd" * 32
_DEVICE = str(uuid.uuid4())


def _rows(start: int, n: int, payload: str) -> List[Tuple[Any, ...]]:
    now = int(time.time() * 1000)
    return [(_USER, s, str(uuid.uuid4()), _DEVICE, s, load.STREAM, s, load.TYPE, payload, len(payload), None, now)
            for s in range(start, start + n)]


def _timed_inserts(duration: float, batch: int, payload: str, seq: List[int],
                   prepare: Callable[[List[Tuple[Any, ...]]], Any], execute: Callable[[Any], None],
                   ) -> Tuple[int, List[float], float]:
    """
    Insert-and-commit ``batch`` rows at a time for ``duration`` s of
    database time: (transactions, each one's seconds, their total). Building
    the rows and the statement is not timed: this is the database's ceiling,
    not the client's.
    """
    times: List[float] = []
    spent = 0.0
    while spent < duration:
        statement = prepare(_rows(seq[0] + 1, batch, payload))
        seq[0] += batch
        t = time.perf_counter()
        execute(statement)
        took = time.perf_counter() - t
        times.append(took)
        spent += took
    return len(times), times, spent


def _write_read(prepare: Callable[[List[Tuple[Any, ...]]], Any], execute: Callable[[Any], None],
                read_page: Callable[[int, int], int], analyze: Callable[[], None],
                duration: float, batch: int, payload: str, read_limit: int, read_max: int) -> Dict[str, Any]:
    seq = [0]
    n1, t1, e1 = _timed_inserts(duration, 1, payload, seq, prepare, execute)
    nb, tb, eb = _timed_inserts(duration, batch, payload, seq, prepare, execute)
    analyze()  # a maintained table: without statistics the page query scans the whole rest of the table
    # Read back in keyset pages, as a catch-up does: first just after the
    # writes (as the catch-up scenario does), then again with warm pages.
    reads = []
    for _ in range(2):
        read = 0
        t0 = time.perf_counter()
        while read < min(read_max, seq[0]):
            got = read_page(read, read_limit)
            if got == 0:
                break
            read += got
        reads.append((read, time.perf_counter() - t0))
    return {
        "commits_per_s": rate(n1, e1),
        **latency_summary(t1, "commit_"),
        "batch": batch,
        "batch_commits_per_s": rate(nb, eb),
        "rows_per_s": rate(nb * batch, eb),
        **latency_summary(tb, "batch_commit_"),
        "read_limit": read_limit,
        "read_rows": reads[0][0],
        "read_rows_per_s": rate(*reads[0]),
        "read_rows_per_s_warm": rate(*reads[1]),
    }


async def postgres(reactor: Any, admin_url: str, duration: float, batch: int, payload_bytes: int,
                   read_limit: int, read_max: int) -> Dict[str, Any]:
    """PostgreSQL baseline in a database created for it (and dropped afterwards)."""
    import psycopg2

    payload = load.PayloadMaker(payload_bytes)()
    dbname = "pb_bench_baseline_{}".format(uuid.uuid4().hex[:12])
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute("CREATE DATABASE " + dbname)
        conn = psycopg2.connect(admin_url, dbname=dbname)
        try:
            cur = conn.cursor()
            cur.execute("SET synchronous_commit = on")
            for stmt in _CREATE:
                cur.execute(stmt)
            conn.commit()
            settings = {}
            for name in ("fsync", "synchronous_commit", "wal_sync_method", "autovacuum", "server_version"):
                cur.execute("SHOW " + name)
                row = cur.fetchone()
                settings[name] = row[0] if row else None

            def prepare(rows: List[Tuple[Any, ...]]) -> bytes:
                values = b",".join(cur.mogrify("(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)", r) for r in rows)
                return b"INSERT INTO bench_events (" + _COLUMNS.encode() + b") VALUES " + values

            def execute(statement: bytes) -> None:
                cur.execute(statement)
                conn.commit()

            def read_page(after: int, limit: int) -> int:
                cur.execute("SELECT " + _COLUMNS + " FROM bench_events WHERE user_id = %s AND seq > %s "
                            "ORDER BY seq LIMIT %s", (_USER, after, limit))
                n = len(cur.fetchall())
                conn.commit()
                return n

            def analyze() -> None:
                cur.execute("ANALYZE bench_events")
                conn.commit()

            result = _write_read(prepare, execute, read_page, analyze, duration, batch, payload, read_limit, read_max)
        finally:
            conn.close()
    finally:
        with admin.cursor() as cur:
            cur.execute("DROP DATABASE IF EXISTS " + dbname)
        admin.close()
    return {**result, **settings}


async def sqlite(reactor: Any, duration: float, batch: int, payload_bytes: int, read_limit: int,
                 read_max: int, directory: str = "") -> Dict[str, Any]:
    """SQLite baseline (WAL, synchronous=FULL) in a temporary directory."""
    payload = load.PayloadMaker(payload_bytes)()
    tmp = tempfile.mkdtemp(prefix="pb-bench-sqlite-", dir=directory or None)
    try:
        conn = sqlite3.connect(os.path.join(tmp, "bench.db"), isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        for stmt in _CREATE:
            conn.execute(stmt)
        marks = ",".join(["?"] * 12)

        def prepare(rows: List[Tuple[Any, ...]]) -> Tuple[str, List[Any]]:
            sql = "INSERT INTO bench_events (" + _COLUMNS + ") VALUES " + ",".join(["(" + marks + ")"] * len(rows))
            return sql, [v for r in rows for v in r]

        def execute(statement: Tuple[str, List[Any]]) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(*statement)
            conn.execute("COMMIT")

        def read_page(after: int, limit: int) -> int:
            return len(conn.execute("SELECT " + _COLUMNS + " FROM bench_events WHERE user_id = ? AND seq > ? "
                                    "ORDER BY seq LIMIT ?", (_USER, after, limit)).fetchall())

        # SQLite caps bound variables per statement (32766); stay under it.
        def analyze() -> None:
            conn.execute("ANALYZE")

        result = _write_read(prepare, execute, read_page, analyze, duration, min(batch, 2000), payload, read_limit,
                             read_max)
        conn.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**result, "synchronous": "FULL", "journal_mode": "WAL"}


async def redis(reactor: Any, url: str, duration: float, warmup: float, window: int,
                payload_bytes: int) -> Dict[str, Any]:
    """PUBLISH/s as the server's bus does it, counted at a subscriber."""
    import txredisapi
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from pocketbridge.server.fanout.redisconn import parse_redis_url

    host, port, db, password = parse_redis_url(url)
    channel = "pb-bench:{}".format(uuid.uuid4().hex)
    counts = {"received": 0, "recording": False}

    class Sub(txredisapi.SubscriberProtocol):  # type: ignore[misc]
        def messageReceived(self, pattern: Any, ch: Any, message: Any) -> None:
            if counts["recording"]:
                counts["received"] += 1

    async def connect(proto: Any) -> Any:
        await connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=5), proto)
        proto.transport.setTcpNoDelay(True)
        await proto.whenConnected()
        return proto

    sub = await connect(Sub(charset=None, password=password, dbid=db, convertNumbers=False))
    await sub.subscribe(channel)
    pub = await connect(txredisapi.RedisProtocol(charset=None, password=password, dbid=db, convertNumbers=False))
    # A notification of the size the server publishes for an event (payload inline).
    message = load.PayloadMaker(payload_bytes)().encode() + b"x" * 180
    state = {"running": True, "in_flight": 0}

    def send() -> None:
        state["in_flight"] += 1
        pub.publish(channel, message).addBoth(done)

    def done(_: Any) -> None:
        state["in_flight"] -= 1
        if state["running"]:
            send()

    for _ in range(window):
        send()
    await load.sleep(reactor, warmup)
    counts["recording"] = True
    t0 = time.monotonic()
    await load.sleep(reactor, duration)
    counts["recording"] = False
    elapsed = time.monotonic() - t0
    state["running"] = False
    await load.sleep(reactor, 0.3)
    pub.transport.loseConnection()
    sub.transport.loseConnection()
    return {"publish_per_s": rate(int(counts["received"]), elapsed), "window": window,
            "message_bytes": len(message)}

