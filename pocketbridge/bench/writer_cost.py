"""
The database cost of the event path, without a server in between: how long
the writer's transaction (``Storage._txn_commit``) and a catch-up page read
(``Storage._txn_read_page``) take on a given database, so the same code can be
timed on a fresh database and on one prefilled with a million events
(``pocketbridge.bench.prefill``). Much less sensitive to a busy machine than
end-to-end numbers: it times only the storage functions, one at a time.

    python -m pocketbridge.bench.writer_cost DATABASE [--batches 40] [--batch-events 100] [--users 20]

``DATABASE`` as for ``prefill`` (a ``postgresql://`` URL or a SQLite file);
it must be migrated. Each batch is committed (durably) in its own
transaction, like the server's writer; events go to new users, so repeated
runs add rows.
"""

from __future__ import annotations

import argparse
import secrets
import sqlite3
import sys
import time
from typing import Any, Dict, List, Optional

from pocketbridge.bench.prefill import is_postgres, sqlite_path
from pocketbridge.bench.stats import latency_summary
from pocketbridge.protocol.events import NewEvent
from pocketbridge.server.storage import Storage


def _open(database: str) -> Any:
    """(storage, connection) for ``database``."""
    if is_postgres(database):
        import psycopg2

        from pocketbridge.server.storage.postgres import PostgresStorage

        return PostgresStorage(database), psycopg2.connect(database)
    from pocketbridge.server.storage.sqlite import SQLiteStorage

    path = sqlite_path(database)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return SQLiteStorage(path), conn


def _timed(storage: Storage, conn: Any, fn: Any, *args: Any) -> float:
    """Seconds for one transaction running ``fn(cursor, *args)``, commit included."""
    cur = conn.cursor()
    t0 = time.perf_counter()
    storage._begin(cur)
    fn(cur, *args)
    conn.commit() if storage.dialect == "postgresql" else cur.execute("COMMIT")
    return time.perf_counter() - t0


def measure(database: str, batches: int = 40, batch_events: int = 100, users: int = 20,
            payload_bytes: int = 256) -> Dict[str, Any]:
    """Writer transaction and catch-up page times (ms) on ``database``."""
    storage, conn = _open(database)
    try:
        cur = conn.cursor()
        cur.execute("SELECT COUNT(*) FROM events")
        rows_before = int(cur.fetchone()[0])
        conn.commit() if storage.dialect == "postgresql" else None
        now = int(time.time() * 1000)
        ids = [(secrets.token_hex(32), "{}-2222-4333-8444-555555555555".format(secrets.token_hex(4)))
               for _ in range(users)]
        for user, device in ids:
            _timed(storage, conn, storage._txn_register, user, device, "bench", "desktop", now)
        payload = "A" * ((payload_bytes + 2) // 3 * 4)
        per_user = max(1, batch_events // users)
        commit_s: List[float] = []
        for b in range(batches):
            batch = [NewEvent(u, d, "{}-{:04x}-7000-8000-{:012x}".format(u[:8], i, b), b * per_user + i + 1,
                              "bench:{}".format(i % 4), "bench", payload, None)
                     for u, d in ids for i in range(per_user)]
            commit_s.append(_timed(storage, conn, storage._txn_commit, batch, now, 2 ** 40))
        # Re-sent batches: every event a duplicate (the lookups find them all).
        dup_s = [_timed(storage, conn, storage._txn_commit,
                        [NewEvent(u, d, "{}-{:04x}-7000-8000-{:012x}".format(u[:8], i, b), b * per_user + i + 1,
                                  "bench:{}".format(i % 4), "bench", payload, None)
                         for u, d in ids for i in range(per_user)], now, 2 ** 40) for b in range(min(batches, 10))]
        user, device = ids[0]
        top = batches * per_user
        page_s = [_timed(storage, conn, storage._txn_read_page, user, after, top, "other-device", 100, 1 << 20, now)
                  for after in range(0, max(1, top - 100), max(1, top // 10))]
    finally:
        conn.close()

    def ms(values: List[float]) -> Dict[str, Optional[float]]:
        s = latency_summary(values)
        return {k: s.get(k) for k in ("p50_ms", "p95_ms", "max_ms")}

    return {"events_in_table_before": rows_before, "batch_events": per_user * users, "users": users,
            "commit": ms(commit_s), "duplicate_commit": ms(dup_s), "read_page_100": ms(page_s)}


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m pocketbridge.bench.writer_cost DATABASE``."""
    p = argparse.ArgumentParser(prog="python -m pocketbridge.bench.writer_cost",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("database")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--batch-events", type=int, default=100)
    p.add_argument("--users", type=int, default=20)
    a = p.parse_args(argv)
    sys.stdout.write("{}\n".format(measure(a.database, a.batches, a.batch_events, a.users)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
