"""
Every statement of the event path and of catch-up uses an index (issue 9,
item 18), on both dialects, on a table that is not nearly empty.

Each case migrates a fresh database, loads 50,000 events across thousands
of users with the bench's bulk generator (``pocketbridge.bench.prefill``),
then runs the storage's own transaction functions (register, get device,
head, commit a batch with new events and duplicates, the cursor flush, the
unacked-blocker record, touch, count, read a page, read a range) through a
cursor that EXPLAINs each statement before running it: the exact SQL the
code sends, with its parameters. A full scan of ``events``, ``devices``,
``streams`` or ``users`` fails the case. Plans are checked in both
statistics states: never analyzed (SQLite as the server leaves it;
PostgreSQL right after a load, or with autovacuum off), then analyzed (what
autovacuum does; a manual ANALYZE on SQLite).

Synchronous: the transaction functions get a plain DB-API cursor, no reactor.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from typing import Any, Iterator, List, Sequence, Tuple

from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.bench.prefill import prefill_postgres, prefill_sqlite
from pocketbridge.protocol.events import NewEvent
from pocketbridge.server.storage import Storage
from pocketbridge.server.storage.postgres import PostgresStorage
from pocketbridge.server.storage.sqlite import SQLiteStorage
from pocketbridge.server.storage.sync import migrate_connection
from tests.harness import create_database

NOW = 1_700_000_000_000
TABLES = ("events", "devices", "streams", "users")
# Names the event path gives its VALUES lists (scanning those is the point).
KEY_LISTS = ("eid", "dseq", "k", "v", "l")
NEW_DEVICE = "99999999-2222-4333-8444-555555555555"


class PlanCursor:
    """A DB-API cursor that records the plan of every statement, then runs it."""

    def __init__(self, cursor: Any, explain: Any) -> None:
        self._cursor = cursor
        self._explain = explain
        self.plans: List[Tuple[str, List[str]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    def _record(self, sql: Any, params: Any) -> None:
        text = sql.decode("utf-8") if isinstance(sql, bytes) else sql
        head = text.lstrip().split(None, 1)[0].upper()
        if head in ("SELECT", "WITH", "INSERT", "UPDATE", "DELETE"):
            self.plans.append((text, self._explain(self._cursor, sql, params)))

    def execute(self, sql: Any, params: Any = None) -> Any:
        self._record(sql, params)
        return self._cursor.execute(sql, params) if params is not None else self._cursor.execute(sql)

    def executemany(self, sql: str, rows: Sequence[Any]) -> Any:
        rows = list(rows)
        if rows:
            self._record(sql, rows[0])
        return self._cursor.executemany(sql, rows)


def sqlite_explain(cur: Any, sql: str, params: Any) -> List[str]:
    """EXPLAIN QUERY PLAN, one string per plan line."""
    cur.execute("EXPLAIN QUERY PLAN " + sql, params or ())
    return [str(row[3]) for row in cur.fetchall()]


def sqlite_full_scans(plan: List[str]) -> List[str]:
    """Plan lines that read a whole table or index (anything but a VALUES list)."""
    bad = []
    for line in plan:
        m = re.match(r"SCAN (\S+)", line)
        if m and m.group(1) not in KEY_LISTS and not re.match(r"SCAN (\d+ )?CONSTANT ROWS?", line):
            bad.append(line)
    return bad


def postgres_explain(cur: Any, sql: Any, params: Any) -> List[str]:
    """The plan nodes as JSON strings (one per node)."""
    prefix = "EXPLAIN (FORMAT JSON) "
    if isinstance(sql, bytes):
        cur.execute(prefix.encode() + sql)
    else:
        cur.execute(prefix + sql, params)
    raw = cur.fetchone()[0]
    plan = raw if isinstance(raw, list) else json.loads(raw)

    def walk(node: Any) -> Iterator[Any]:
        yield node
        for child in node.get("Plans", ()):
            yield from walk(child)

    return [json.dumps({k: v for k, v in n.items() if k != "Plans"}) for n in walk(plan[0]["Plan"])]


def postgres_full_scans(plan: List[str]) -> List[str]:
    """Sequential scans of our tables, and index scans with no index condition (a full index walk)."""
    bad = []
    for text in plan:
        node = json.loads(text)
        if node.get("Relation Name") not in TABLES:
            continue
        kind = node["Node Type"]
        if kind == "Seq Scan" or (kind in ("Index Scan", "Index Only Scan") and "Index Cond" not in node):
            bad.append("{} on {}".format(kind, node["Relation Name"]))
    return bad


class PlanChecks:
    """The cases; a dialect class supplies ``connect``, ``storage``, ``explain``, ``full_scans`` and ``analyze``."""

    storage: Storage
    conn: Any
    assertEqual: Any
    assertTrue: Any
    fail: Any

    def prefill(self, conn: Any) -> None:
        raise NotImplementedError

    def analyze(self) -> None:
        raise NotImplementedError

    def explain(self, cur: Any, sql: Any, params: Any) -> List[str]:
        raise NotImplementedError

    def full_scans(self, plan: List[str]) -> List[str]:
        raise NotImplementedError

    def cursor(self) -> Any:
        return self.conn.cursor()

    def load(self) -> None:
        """Thousands of small users (many devices and streams rows) and two users with long backlogs."""
        self.prefill_rows(40_000, 10)
        self.prefill_rows(10_000, 5_000)

    def prefill_rows(self, count: int, per_user: int) -> None:
        raise NotImplementedError

    def big_users(self, cur: Any, n: int) -> List[Tuple[str, str, int, str]]:
        """(user, device, last_device_seq, other device) of ``n`` users with the longest histories."""
        cur.execute(self.storage._sql("SELECT user_id FROM users ORDER BY head_seq DESC, user_id LIMIT ?"), (n,))
        out = []
        for (user,) in cur.fetchall():
            cur.execute(self.storage._sql("SELECT device_id, last_device_seq FROM devices WHERE user_id = ?"
                                          " ORDER BY device_id"), (user,))
            devices = cur.fetchall()
            out.append((user, devices[0][0], int(devices[0][1]), devices[1][0]))
        return out

    def exercise(self) -> List[Tuple[str, List[str]]]:
        """Run every event-path and catch-up transaction function once; the plans of what they sent."""
        s = self.storage
        raw = self.cursor()
        users = self.big_users(raw, 2)
        cur = PlanCursor(raw, self.explain)
        s._begin(cur)
        try:
            (user, device, last, other) = users[0]
            s._txn_register(cur, user, device, "x", "desktop", NOW)  # returning device: reads only
            s._txn_register(cur, user, NEW_DEVICE, "x", "desktop", NOW)  # a new device: MAX(device_seq) lookup
            s._txn_get_device(cur, user, device)
            s._txn_head(cur, user)
            s._txn_user_state(cur, user)
            batch = []
            for u, d, seq, _ in users:
                batch += [NewEvent(u, d, "00000000-0000-7000-8000-{:012d}".format(seq + i), seq + i,
                                   "prefill:{}".format(i % 6), "t", "QUJD", None) for i in range(1, 9)]
            # A re-sent event: found by both lookups.
            cur.execute(s._sql("SELECT event_id, device_seq FROM events WHERE user_id = ? AND device_id = ?"
                               " AND device_seq = ?"), (user, device, last))
            eid, dseq = cur.fetchone()
            batch.append(NewEvent(user, device, eid, int(dseq), "prefill:0", "t", "QUJD", None))
            outcomes = s._txn_commit(cur, batch, NOW, 2 ** 40)
            self.assertEqual([o.kind for o in outcomes], ["stored"] * (len(batch) - 1) + ["duplicate"])
            s._txn_update_cursors(cur, sorted([(10, NOW, u, d) for u, d, _, _ in users]
                                              + [(11, NOW, u, o) for u, _, _, o in users], key=lambda r: (r[2], r[3])))
            s._txn_unacked(cur, user, other, 10, 11, NOW)
            s._txn_touch(cur, user, device, NOW)
            s._txn_count(cur, user, 100, 4_000, other, NOW)
            events, more = s._txn_read_page(cur, user, 100, 4_000, other, 1000, 1 << 20, NOW)
            self.assertTrue(more and len(events) == 1000)
            s._txn_read_page(cur, user, 0, 5_000, None, 50, 1 << 20, NOW, payload_only=True)
            self.assertEqual(len(s._txn_read_range(cur, user, 2_000, 2_500)), 500)
        finally:
            self.conn.rollback()
        return cur.plans

    def check(self) -> None:
        plans = self.exercise()
        self.assertTrue(len(plans) >= 15, "too few statements recorded: {}".format(len(plans)))
        scans = [(sql[:160], bad) for sql, plan in plans for bad in [self.full_scans(plan)] if bad]
        if scans:
            self.fail("full scans on the event path:\n" + "\n".join("{}\n    -> {}".format(s, b) for s, b in scans))

    def test_event_path_uses_indexes(self) -> None:
        """On 50,000 events no event-path or catch-up statement scans a table, with or without statistics."""
        self.production_stats()
        self.check()
        self.other_stats()
        self.check()

    def production_stats(self) -> None:
        """The first state checked: never analyzed."""
        raise NotImplementedError

    def other_stats(self) -> None:
        """The second: analyzed."""
        raise NotImplementedError


class SQLitePlanTests(PlanChecks, SynchronousTestCase):
    """The plans on SQLite."""

    def setUp(self) -> None:
        path = os.path.join(self.mktemp(), "pocketbridge.sqlite3")
        os.makedirs(os.path.dirname(path))
        self.storage = SQLiteStorage(path)
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(self.conn.close)
        migrate_connection(self.storage, self.conn)
        self.load()

    def prefill_rows(self, count: int, per_user: int) -> None:
        prefill_sqlite(self.conn, count, per_user, 64, NOW)

    def explain(self, cur: Any, sql: Any, params: Any) -> List[str]:
        return sqlite_explain(cur, sql, params)

    def full_scans(self, plan: List[str]) -> List[str]:
        return sqlite_full_scans(plan)

    def production_stats(self) -> None:
        pass  # the server never runs ANALYZE on SQLite

    def other_stats(self) -> None:
        self.conn.execute("ANALYZE")  # what a manual ANALYZE would leave


class PostgresPlanTests(PlanChecks, SynchronousTestCase):
    """The plans on PostgreSQL."""

    def setUp(self) -> None:
        import psycopg2

        db = create_database(self)  # type: ignore[arg-type]
        self.storage = PostgresStorage(db.url)
        self.conn = psycopg2.connect(db.url)
        self.addCleanup(self.conn.close)
        migrate_connection(self.storage, self.conn)
        self.load()

    def prefill_rows(self, count: int, per_user: int) -> None:
        prefill_postgres(self.conn, count, per_user, 64, NOW, analyze=False)

    def explain(self, cur: Any, sql: Any, params: Any) -> List[str]:
        return postgres_explain(cur, sql, params)

    def full_scans(self, plan: List[str]) -> List[str]:
        return postgres_full_scans(plan)

    def production_stats(self) -> None:
        pass  # never analyzed yet: a table that just grew (or autovacuum off)

    def other_stats(self) -> None:
        # What autovacuum's analyze does after a load like this one.
        self.conn.autocommit = True
        self.conn.cursor().execute("ANALYZE users, devices, streams, events")
        self.conn.autocommit = False
