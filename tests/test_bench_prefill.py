"""
``pocketbridge-bench --prefill``: the bulk generator writes rows the server
itself would have written (so a prefilled database is a real one), and the
bench measures, loads, measures again and reports both.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from typing import Any, Dict, List

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pocketbridge.bench.prefill import prefill
from pocketbridge.protocol.events import NewEvent
from pocketbridge.server.storage import Storage
from pocketbridge.server.storage.postgres import PostgresStorage
from pocketbridge.server.storage.sqlite import SQLiteStorage
from pocketbridge.server.storage.sync import migrate_connection
from tests.harness import create_database, start_server
from tests.test_bench_smoke import RAISED_LIMITS

NOW = 1_700_000_000_000

# Every counter the server keeps, recomputed from the events themselves; no row may disagree.
# (Seqs are unique per user, device_seqs per device: MAX = COUNT means 1..n without gaps.)
MISMATCHES = [
    "SELECT COUNT(*) FROM users u LEFT JOIN (SELECT user_id, MAX(seq) m, COUNT(*) n, SUM(payload_size) b"
    " FROM events GROUP BY user_id) e ON e.user_id = u.user_id"
    " WHERE e.m IS NULL OR u.head_seq <> e.m OR e.m <> e.n OR u.stored_bytes <> e.b",
    "SELECT COUNT(*) FROM devices d LEFT JOIN (SELECT user_id, device_id, MAX(device_seq) m, COUNT(*) n"
    " FROM events GROUP BY user_id, device_id) e ON e.user_id = d.user_id AND e.device_id = d.device_id"
    " WHERE e.m IS NULL OR d.last_device_seq <> e.m OR e.m <> e.n",
    "SELECT COUNT(*) FROM streams s LEFT JOIN (SELECT user_id, stream_id, MAX(stream_seq) m,"
    " COUNT(DISTINCT stream_seq) n, COUNT(*) c FROM events GROUP BY user_id, stream_id) e"
    " ON e.user_id = s.user_id AND e.stream_id = s.stream_id WHERE e.m IS NULL OR s.head <> e.m OR e.m <> e.n"
    " OR e.n <> e.c",
]


class PrefillConsistency:
    """The cases; a dialect class supplies ``storage``, ``database`` and ``conn``."""

    storage: Storage
    database: str
    conn: Any
    assertEqual: Any

    def query(self, sql: str) -> List[Any]:
        cur = self.conn.cursor()
        cur.execute(sql)
        rows = cur.fetchall()
        self.conn.commit()
        return rows

    def test_rows_agree_with_events(self) -> None:
        """3,500 prefilled events in 1,000-event users: head, bytes, device and stream seqs match the events."""
        result = prefill(self.database, 3_500, events_per_user=1_000, payload_bytes=30, now_ms=NOW)
        self.assertEqual((result["events"], result["users"]), (3_500, 4))
        self.assertEqual(self.query("SELECT COUNT(*), COUNT(DISTINCT user_id), COUNT(DISTINCT event_id) FROM events"),
                         [(3_500, 4, 3_500)])
        self.assertEqual([self.query(sql)[0][0] for sql in MISMATCHES], [0] * len(MISMATCHES))

    def test_writer_continues_a_prefilled_user(self) -> None:
        """The writer stores the next event of a prefilled device at the next seq, and refuses a reused device_seq."""
        prefill(self.database, 10, events_per_user=10, payload_bytes=30, now_ms=NOW)
        (user, device, last), = self.query(
            "SELECT user_id, device_id, last_device_seq FROM devices ORDER BY device_id LIMIT 1")
        cur = self.conn.cursor()
        self.storage._begin(cur)
        out = self.storage._txn_commit(cur, [
            NewEvent(user, device, "00000000-0000-7000-8000-000000000001", int(last) + 1, "prefill:0", "t", "QQ", None),
            NewEvent(user, device, "00000000-0000-7000-8000-000000000002", int(last), "prefill:0", "t", "QQ", None),
        ], NOW, 2 ** 40)
        self.conn.commit()
        self.assertEqual([(o.kind, o.seq, o.stream_seq) for o in out], [("stored", 11, 4), ("conflict", None, None)])


class SQLitePrefillTests(PrefillConsistency, SynchronousTestCase):
    """The generator on SQLite."""

    def setUp(self) -> None:
        self.database = os.path.join(self.mktemp(), "pocketbridge.sqlite3")
        os.makedirs(os.path.dirname(self.database))
        self.storage = SQLiteStorage(self.database)
        self.conn = sqlite3.connect(self.database, isolation_level=None)
        self.addCleanup(self.conn.close)
        migrate_connection(self.storage, self.conn)


class PostgresPrefillTests(PrefillConsistency, SynchronousTestCase):
    """The generator on PostgreSQL."""

    def setUp(self) -> None:
        import psycopg2

        self.database = create_database(self).url  # type: ignore[arg-type]
        self.storage = PostgresStorage(self.database)
        self.conn = psycopg2.connect(self.database)
        self.addCleanup(self.conn.close)
        migrate_connection(self.storage, self.conn)


class BenchPrefillTests(TestCase):
    """``pocketbridge-bench --prefill`` against a real server."""

    timeout = 120

    async def test_bench_reports_fresh_and_prefilled(self) -> None:
        """The bench measures, loads 3,000 events into the server's file, measures again and gives both with ratios."""
        server = await start_server(self, backend="sqlite", args=RAISED_LIMITS)
        database = os.path.join(server.data_dir, "pocketbridge.sqlite3")
        argv = [
            "-m", "pocketbridge.bench.cli", "--url", server.http_url, "--json", "--storage", "sqlite",
            "--no-baselines", "--scenarios", "events,latency", "--duration", "0.5", "--warmup", "0.2",
            "--users", "2", "--window", "4", "--rate", "50", "--rate-duration", "0.5",
            "--prefill", "3000", "--prefill-database", database,
        ]
        out, err, code = await getProcessOutputAndValue(
            sys.executable, argv, env=dict(os.environ), path=server.directory, reactor=reactor)
        self.assertEqual(code, 0, "pocketbridge-bench failed:\n" + err.decode("utf-8", "replace")[-3000:])
        result: Dict[str, Any] = json.loads(out)
        self.assertEqual(result["errors"], {})
        self.assertEqual(result["prefill"]["events"], 3000)
        for key in ("events_per_s", "latency_p50_ms"):
            self.assertGreater(result[key], 0, key)
            self.assertGreater(result[key + "_prefilled"], 0, key)
            self.assertAlmostEqual(result[key + "_prefilled_ratio"], result[key + "_prefilled"] / result[key], places=2)
        with sqlite3.connect(database) as conn:
            prefilled = conn.execute("SELECT COUNT(*) FROM events WHERE type = 'bench:prefill'").fetchone()[0]
        self.assertEqual(prefilled, 3000)
