"""
The background jobs against real storage: TTL deletion, retention, and two
nodes running the same job at once on one PostgreSQL database.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any, List

from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.trial.unittest import TestCase

from pocketbridge.server.config import Settings
from pocketbridge.protocol.events import NewEvent
from pocketbridge.server.cluster.jobs import Jobs
from pocketbridge.server.cluster.presence import LocalPresence
from pocketbridge.server.storage.postgres import PostgresStorage
from pocketbridge.server.storage.sqlite import SQLiteStorage
from tests.services import create_database, require_postgres

DAY_MS = 86_400_000


class _Node:
    """The parts of a Node the jobs use."""

    def __init__(self, storage: Any, now_ms: int) -> None:
        self.storage = storage
        self.settings = Settings().replace(event_retention_days=30.0)
        self.clock = reactor
        self.presence = LocalPresence()
        self._now = now_ms
        self.offline: List[Any] = []

    def now_ms(self) -> int:
        return self._now

    def announce_presence(self, *args: Any) -> None:
        self.offline.append(args)


def _event(user: str, device: str, dseq: int, ttl: Any = None, size: int = 8) -> NewEvent:
    return NewEvent(user, device, str(uuid.uuid4()), dseq, "s:main", "t", "A" * size, ttl)


class JobCases:
    """Cases run on each storage backend."""

    storage: Any

    async def _user(self, now: int) -> str:
        user = os.urandom(32).hex()
        await self.storage.register_device(user, "00000000-0000-4000-8000-000000000001", None, "cli", now)
        return user

    async def test_expired_events_are_deleted_after_grace(self) -> None:
        """Events whose ttl passed more than 5 minutes ago are deleted; fresh ones stay, stored bytes shrink."""
        now = 1_800_000_000_000
        user = await self._user(now)
        dev = "00000000-0000-4000-8000-000000000001"
        await self.storage.commit_batch([
            _event(user, dev, 1, ttl=now - 10 * 60_000, size=100),
            _event(user, dev, 2, ttl=now - 60_000, size=100),
            _event(user, dev, 3, ttl=None, size=100),
        ], now - 20 * 60_000, 2**40)
        jobs = Jobs(_Node(self.storage, now), batch=1)
        removed = await jobs.event_ttl()
        self.assertEqual(removed, 1)
        rows = await self.storage.read_range(user, 0, 10)
        self.assertEqual([r.device_seq for r in rows], [2, 3])
        stored = await self.storage.run("t", lambda txn: (
            self.storage._execute(txn, "SELECT stored_bytes FROM users WHERE user_id = ?", (user,)),
            txn.fetchone()[0])[1])
        self.assertEqual(int(stored), 200)

    async def test_retention_deletes_old_events_and_raises_purged_below(self) -> None:
        """Events older than the retention window are deleted in batches and purged_below_seq moves past them."""
        now = 1_800_000_000_000
        user = await self._user(now)
        dev = "00000000-0000-4000-8000-000000000001"
        await self.storage.commit_batch([_event(user, dev, i) for i in range(1, 6)], now - 40 * DAY_MS, 2**40)
        await self.storage.commit_batch([_event(user, dev, 6)], now - DAY_MS, 2**40)
        jobs = Jobs(_Node(self.storage, now), batch=2)
        self.assertEqual(await jobs.retention(), 5)
        rows = await self.storage.read_range(user, 0, 10)
        self.assertEqual([r.seq for r in rows], [6])
        purged = await self.storage.run("t", lambda txn: (
            self.storage._execute(txn, "SELECT purged_below_seq FROM users WHERE user_id = ?", (user,)),
            txn.fetchone()[0])[1])
        self.assertEqual(int(purged), 6)


class JobsSQLite(JobCases, TestCase):
    """The jobs on SQLite."""

    async def setUp(self) -> None:
        path = os.path.join(tempfile.mkdtemp(), "db.sqlite3")
        self.storage = SQLiteStorage(path)
        await self.storage.start()
        self.addCleanup(self.storage.close)


class JobsPostgres(JobCases, TestCase):
    """The jobs on PostgreSQL, plus two nodes running them at once."""

    async def setUp(self) -> None:
        require_postgres(self)
        self.db = create_database(self)
        self.storage = PostgresStorage(self.db.url)
        await self.storage.start()
        self.addCleanup(self.storage.close)

    async def test_two_nodes_delete_each_expired_row_once(self) -> None:
        """Two nodes running the TTL job at the same moment remove every expired row exactly once between them."""
        now = 1_800_000_000_000
        user = await self._user(now)
        dev = "00000000-0000-4000-8000-000000000001"
        await self.storage.commit_batch(
            [_event(user, dev, i, ttl=now - 3_600_000) for i in range(1, 301)], now - 7_200_000, 2**40)
        other = PostgresStorage(self.db.url)
        await other.start()
        self.addCleanup(other.close)
        from pocketbridge.server import metrics

        counter = metrics.JOB_ROWS.labels(job="event_ttl")
        before = counter._value.get()
        a = Jobs(_Node(self.storage, now), batch=50)
        b = Jobs(_Node(other, now), batch=50)
        results = await DeferredList([a.run_once(), b.run_once()], fireOnOneErrback=True)
        self.assertTrue(all(ok for ok, _ in results))
        rows = await self.storage.read_range(user, 0, 1000)
        self.assertEqual(rows, [])
        # Both "nodes" run in this process: between them they counted each row once.
        self.assertEqual(counter._value.get() - before, 300)
