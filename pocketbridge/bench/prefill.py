"""
Load N events into a PocketBridge database, fast, so the server can be
measured on a table that is not nearly empty (``pocketbridge-bench --prefill``).

The events belong to new users (``events_per_user`` each, two devices and
four streams per user), with consistent ``users``, ``devices`` and
``streams`` rows: head seqs, stored bytes, ``last_device_seq`` and stream
heads are what the server itself would have written. Ids are random per
call, so a second prefill adds more users. The database must already be
migrated (start the server on it once). Rows are written in bulk:
PostgreSQL builds them with ``generate_series`` in one ``INSERT … SELECT``
per chunk; SQLite gets ``executemany`` chunks, each its own transaction, so
a running server's writer waits at most one chunk.

    python -m pocketbridge.bench.prefill DATABASE N [--events-per-user K] [--analyze yes|no]

``DATABASE`` is a ``postgresql://`` URL, or the SQLite file (a path or
``sqlite:///path``; the server's file is ``DATA_DIR/pocketbridge.sqlite3``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import secrets
import sqlite3
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

STREAMS = 4
DEVICES = 2
TYPE = "bench:prefill"
CHUNK = 50_000


def _payload(payload_bytes: int) -> str:
    return base64.b64encode(os.urandom(payload_bytes)).decode("ascii")


def is_postgres(database: str) -> bool:
    """Whether ``database`` names PostgreSQL (else a SQLite file)."""
    return database.startswith(("postgresql://", "postgres://"))


def sqlite_path(database: str) -> str:
    """The file of a ``sqlite:///path`` URL or a plain path."""
    return database[len("sqlite://"):] if database.startswith("sqlite://") else database


def prefill(database: str, count: int, events_per_user: int = 1000, payload_bytes: int = 256,
            analyze: Optional[bool] = None, now_ms: Optional[int] = None) -> Dict[str, Any]:
    """
    Load ``count`` events (blocks); returns what was written and how long it took.

    ``analyze`` defaults to what a production database would have: PostgreSQL's
    autovacuum analyzes a table that grew this much, the server never runs
    ANALYZE on SQLite.
    """
    if count <= 0:
        return {"events": 0, "users": 0, "seconds": 0.0}
    now = int(time.time() * 1000) if now_ms is None else now_ms
    per_user = max(1, min(events_per_user, count))
    t0 = time.monotonic()
    if is_postgres(database):
        import psycopg2

        conn = psycopg2.connect(database)
        try:
            users = prefill_postgres(conn, count, per_user, payload_bytes, now, analyze is not False)
        finally:
            conn.close()
    else:
        conn = sqlite3.connect(sqlite_path(database), isolation_level=None, timeout=60)
        try:
            conn.execute("PRAGMA busy_timeout=60000")
            users = prefill_sqlite(conn, count, per_user, payload_bytes, now, bool(analyze))
        finally:
            conn.close()
    return {"events": count, "users": users, "events_per_user": per_user,
            "payload_bytes": payload_bytes, "seconds": round(time.monotonic() - t0, 1)}


# ---------------------------------------------------------------- SQLite

def _ids(tag: str, users: int) -> List[str]:
    return [hashlib.sha256("{}:{}".format(tag, u).encode()).hexdigest() for u in range(users)]


def _device(user_id: str, d: int) -> str:
    h = hashlib.sha256("{}:{}".format(user_id, d).encode()).hexdigest()
    return "{}-{}-4{}-8{}-{}".format(h[:8], h[8:12], h[13:16], h[17:20], h[20:32])


def _event_rows(user_ids: List[str], counts: List[int], payload: str, now: int,
                tag: str) -> Iterator[Tuple[Any, ...]]:
    size = len(payload)
    for user, n in zip(user_ids, counts):
        devices = [_device(user, d) for d in range(DEVICES)]
        for seq in range(1, n + 1):
            k = seq - 1
            eid = hashlib.md5("{}:{}:{}".format(tag, user, seq).encode()).hexdigest()
            yield (user, seq, "{}-{}-7{}-8{}-{}".format(eid[:8], eid[8:12], eid[13:16], eid[17:20], eid[20:32]),
                   devices[k % DEVICES], k // DEVICES + 1, "prefill:{}".format(k % STREAMS), k // STREAMS + 1,
                   TYPE, payload, size, None, now)


def _split(count: int, per_user: int) -> List[int]:
    full, rest = divmod(count, per_user)
    return [per_user] * full + ([rest] if rest else [])


def prefill_sqlite(conn: sqlite3.Connection, count: int, per_user: int, payload_bytes: int, now: int,
                   analyze: bool = False) -> int:
    """Write the rows through an autocommit ``sqlite3`` connection; returns the number of users."""
    tag = secrets.token_hex(8)
    counts = _split(count, per_user)
    user_ids = _ids(tag, len(counts))
    payload = _payload(payload_bytes)
    size = len(payload)
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO users (user_id, head_seq, purged_below_seq, stored_bytes, created_at, last_activity)"
        " VALUES (?, ?, 0, ?, ?, ?)", [(u, n, n * size, now, now) for u, n in zip(user_ids, counts)])
    conn.executemany(
        "INSERT INTO devices (user_id, device_id, name, type, created_at, last_seen, last_device_seq)"
        " VALUES (?, ?, 'prefill', 'desktop', ?, ?, ?)",
        [(u, _device(u, d), now, now, (n - d + DEVICES - 1) // DEVICES)
         for u, n in zip(user_ids, counts) for d in range(DEVICES)])
    conn.executemany(
        "INSERT INTO streams (user_id, stream_id, head) VALUES (?, ?, ?)",
        [(u, "prefill:{}".format(s), (n - s + STREAMS - 1) // STREAMS)
         for u, n in zip(user_ids, counts) for s in range(STREAMS) if n > s])
    conn.execute("COMMIT")
    rows = _event_rows(user_ids, counts, payload, now, tag)
    while True:
        chunk = [r for _, r in zip(range(CHUNK), rows)]
        if not chunk:
            break
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO events (user_id, seq, event_id, device_id, device_seq, stream_id, stream_seq, type,"
            " encrypted_payload, payload_size, ttl, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", chunk)
        conn.execute("COMMIT")
    if analyze:
        conn.execute("ANALYZE")
    return len(counts)


# ---------------------------------------------------------------- PostgreSQL

# Per user u (1-based, ids from md5 of a per-call tag): seq 1..n, device
# (seq-1) % 2 with device_seq (seq-1)/2 + 1, stream (seq-1) % 4 with
# stream_seq (seq-1)/4 + 1.
_PG_USER = "md5(%(tag)s || ':' || u) || md5(%(tag)s || ':' || u || ':2')"
_PG_UUID = ("substr({h}, 1, 8) || '-' || substr({h}, 9, 4) || '-4' || substr({h}, 14, 3) || '-8' || "
            "substr({h}, 18, 3) || '-' || substr({h}, 21, 12)")


def _pg_device(d: str) -> str:
    return _PG_UUID.format(h="md5(" + _PG_USER + " || ':d' || " + d + ")")


def prefill_postgres(conn: Any, count: int, per_user: int, payload_bytes: int, now: int, analyze: bool = True) -> int:
    """Write the rows through a psycopg2 connection (committed per chunk); returns the number of users."""
    tag = secrets.token_hex(8)
    counts = _split(count, per_user)
    users, last = len(counts), counts[-1]
    params = {"tag": tag, "per": per_user, "users": users, "last": last, "now": now,
              "payload": _payload(payload_bytes), "streams": STREAMS, "devices": DEVICES}
    n_of = "(CASE WHEN u = %(users)s THEN %(last)s ELSE %(per)s END)"
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO users (user_id, head_seq, purged_below_seq, stored_bytes, created_at, last_activity)"
            " SELECT " + _PG_USER + ", " + n_of + ", 0, " + n_of + " * length(%(payload)s), %(now)s, %(now)s"
            " FROM generate_series(1, %(users)s) u", params)
        cur.execute(
            "INSERT INTO devices (user_id, device_id, name, type, created_at, last_seen, last_device_seq)"
            " SELECT " + _PG_USER + ", " + _pg_device("d") + ", 'prefill', 'desktop', %(now)s, %(now)s,"
            " (" + n_of + " - d + %(devices)s - 1) / %(devices)s"
            " FROM generate_series(1, %(users)s) u, generate_series(0, %(devices)s - 1) d", params)
        cur.execute(
            "INSERT INTO streams (user_id, stream_id, head)"
            " SELECT " + _PG_USER + ", 'prefill:' || s, (" + n_of + " - s + %(streams)s - 1) / %(streams)s"
            " FROM generate_series(1, %(users)s) u, generate_series(0, %(streams)s - 1) s"
            " WHERE " + n_of + " > s", params)
        conn.commit()
        step = max(1, CHUNK // per_user)
        for first in range(1, users + 1, step):
            chunk = dict(params, lo=first, hi=min(users, first + step - 1))
            eid = "md5(%(tag)s || ':' || u || ':' || seq)"
            cur.execute(
                "INSERT INTO events (user_id, seq, event_id, device_id, device_seq, stream_id, stream_seq, type,"
                " encrypted_payload, payload_size, ttl, created_at)"
                " SELECT " + _PG_USER + ", seq, " + _PG_UUID.format(h=eid).replace("'-4'", "'-7'") + ", "
                + _pg_device("((seq - 1) %% %(devices)s)") + ", (seq - 1) / %(devices)s + 1,"
                " 'prefill:' || ((seq - 1) %% %(streams)s), (seq - 1) / %(streams)s + 1, '" + TYPE + "',"
                " %(payload)s, length(%(payload)s), NULL, %(now)s"
                " FROM generate_series(%(lo)s, %(hi)s) u, generate_series(1, " + n_of + ") seq", chunk)
            conn.commit()
    if analyze:
        old = conn.autocommit
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("ANALYZE users, devices, streams, events")
        conn.autocommit = old
    return users


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m pocketbridge.bench.prefill DATABASE N``."""
    p = argparse.ArgumentParser(prog="python -m pocketbridge.bench.prefill", description=__doc__.split("\n\n")[0])
    p.add_argument("database", help="postgresql:// URL, or the SQLite file (path or sqlite:///path)")
    p.add_argument("count", type=int, help="events to load")
    p.add_argument("--events-per-user", type=int, default=1000)
    p.add_argument("--payload-bytes", type=int, default=256, help="payload bytes before base64 (default 256)")
    p.add_argument("--analyze", choices=("yes", "no"), default=None,
                   help="ANALYZE afterwards (default: yes for PostgreSQL, no for SQLite, as in production)")
    a = p.parse_args(argv)
    result = prefill(a.database, a.count, a.events_per_user, a.payload_bytes,
                     None if a.analyze is None else a.analyze == "yes")
    sys.stdout.write("{}\n".format(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------- in the bench

async def measure(reactor: Any, **kwargs: Any) -> Dict[str, Any]:
    """``prefill`` as a bench child (``runner.run_child``); blocks its own process only."""
    return prefill(**kwargs)


#: Numbers compared fresh vs prefilled: (label, key).
COMPARED: List[Tuple[str, str]] = [
    ("1 handshakes/s (returning devices)", "handshakes_per_s"),
    ("2 events/s end to end", "events_per_s"),
    ("  delivery latency p50 ms (saturated)", "events_latency_p50_ms"),
    ("  delivery latency p99 ms (saturated)", "events_latency_p99_ms"),
    ("3 latency p50 ms at fixed rate", "latency_p50_ms"),
    ("  latency p99 ms at fixed rate", "latency_p99_ms"),
    ("5 catch-up events/s", "catchup_events_per_s"),
    ("  backlog upload events/s", "catchup_upload_events_per_s"),
    ("6 fan-out deliveries/s", "fanout_deliveries_per_s"),
    ("7 two nodes events/s", "two_nodes_events_per_s"),
]


def compare(fresh: Dict[str, Any], prefilled: Dict[str, Any]) -> Dict[str, Any]:
    """Flat keys ``<key>_prefilled`` and ``<key>_prefilled_ratio`` (prefilled / fresh) for each compared number."""
    out: Dict[str, Any] = {}
    for _, key in COMPARED:
        a, b = fresh.get(key), prefilled.get(key)
        if a is None and b is None:
            continue
        out[key + "_prefilled"] = b
        out[key + "_prefilled_ratio"] = round(b / a, 3) if a and b is not None else None
    return out


def table_lines(result: Dict[str, Any]) -> List[str]:
    """The fresh vs prefilled section of the bench's text table (empty without ``--prefill``)."""
    loaded = result.get("prefill")
    if not loaded:
        return []
    lines = ["", "fresh database vs after loading {:,} events ({:,} users, {} s to load):".format(
        loaded.get("events", 0), loaded.get("users", 0), loaded.get("seconds", "?"))]
    lines.append("  {:<40}{:>12}{:>12}{:>18}".format("metric", "fresh", "prefilled", "prefilled/fresh"))
    for label, key in COMPARED:
        if key + "_prefilled" not in result:
            continue
        cells = [result.get(key), result.get(key + "_prefilled"), result.get(key + "_prefilled_ratio")]
        lines.append("  {:<40}".format(label) + "".join(
            "{:>12}".format("-" if v is None else "{:,.2f}".format(v) if v < 100 else "{:,.0f}".format(v))
            for v in cells[:2]) + "{:>18}".format("-" if cells[2] is None else "{:.3f}".format(cells[2])))
    return lines


def prefilled_pass(run: Any, fresh: Dict[str, Any]) -> Dict[str, Any]:
    """
    ``--prefill``: load the events, run the scenarios again (not memory: it
    needs a fresh server) and return the result keys: ``prefill`` (what was
    loaded), ``<key>_prefilled`` and ``<key>_prefilled_ratio``, and the second
    pass's details under ``prefilled``. Errors go to ``run.errors`` as
    ``prefill`` or ``prefilled_<scenario>``.
    """
    from pocketbridge.bench import report
    from pocketbridge.bench.runner import error_of, run_child

    a = run.args
    run.say("prefill: loading {:,} events into the server's database ...".format(a.prefill))
    loaded = run_child(measure, 900 + a.prefill / 500, database=a.prefill_database, count=a.prefill,
                       events_per_user=a.prefill_events_per_user, payload_bytes=run.sizes.payload_bytes)
    err = error_of(loaded)
    if err:
        run.errors["prefill"] = err
        run.say("  prefill failed: {}".format(err.splitlines()[0]))
        return {"prefill": None}
    run.say("  loaded {events:,} events for {users:,} users in {seconds} s".format(**loaded))
    saved = run.scenarios, run.errors, run.cpu, run.server_metrics
    run.scenarios, run.errors, run.cpu, run.server_metrics = {}, {}, {}, {}
    try:
        run.run_scenarios([n for n in a.selected if n != "memory"])
        second = report.build(run.scenarios, run.baselines, a.storage)
        details = {"scenarios": run.scenarios, "cpu": run.cpu, "server_metrics": run.server_metrics}
        errors = {"prefilled_" + k: v for k, v in run.errors.items()}
    finally:
        run.scenarios, run.errors, run.cpu, run.server_metrics = saved
    run.errors.update(errors)
    return {"prefill": loaded, **compare(fresh, second), "prefilled": details}
