"""
The writer and the cursor flush lock device rows in one order on PostgreSQL
(issue 9, item 19): a batch's ``last_device_seq`` update and the flush's
``delivered_seq`` update of the same devices, run at the same time over and
over, never deadlock.

Storage-level, against a throwaway database whose ``deadlock_timeout`` is
lowered so that a deadlock, if the lock orders differ, is detected in
milliseconds rather than a second. The devices are registered in reverse key
order so that a statement that locks rows in physical order and one that
locks them in key order meet head on. Uses adbapi's thread pool, so this is
an async ``TestCase``.
"""

from __future__ import annotations

import time
from typing import Dict, List, Tuple

from twisted.internet.defer import DeferredList
from twisted.trial.unittest import TestCase

from pocketbridge.protocol.events import NewEvent
from pocketbridge.server.storage import Storage, StorageUnavailable
from pocketbridge.server.storage.postgres import PostgresStorage
from tests.harness import create_database

NOW = 1_700_000_000_000
USER = "d04ab232742bb4ab3a1368bd4615e4e6d0224ab71a016baf8520a332c9778737"
DEVICES = ["{:08x}-2222-4333-8444-555555555555".format(i) for i in range(40)]
ROUNDS = 150


class LockOrderTests(TestCase):
    """Concurrent writer batches and cursor flushes over the same devices."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.db = create_database(self)
        self.db._execute("ALTER DATABASE {} SET deadlock_timeout = '20ms'".format(self.db.name))
        self.storage: Storage = PostgresStorage(self.db.url, pool_size=4)
        self.addCleanup(self.storage.close)
        await self.storage.start()
        for device in reversed(DEVICES):  # physical order = reverse key order
            await self.storage.register_device(USER, device, None, "desktop", NOW)

    def batch(self, n: int) -> List[NewEvent]:
        """Event n of every device, in one batch (one multi-row devices update)."""
        return [NewEvent(USER, d, "{:08x}-{:04x}-7000-8000-000000000000".format(i, n), n, "s", "t", "QUJD", None)
                for i, d in enumerate(DEVICES)]

    async def test_writer_and_cursor_flush_do_not_deadlock(self) -> None:
        """150 rounds of a 40-device batch beside two 40-device cursor flushes: every transaction succeeds."""
        failures: List[str] = []
        started = time.monotonic()
        for n in range(1, ROUNDS + 1):
            cursors: Dict[Tuple[str, str], int] = {(USER, d): n for d in DEVICES}
            results = await DeferredList([
                self.storage.update_cursors(cursors, NOW + n),
                self.storage.commit_batch(self.batch(n), NOW + n, 2 ** 40),
                self.storage.update_cursors({k: v + 1 for k, v in cursors.items()}, NOW + n),
            ], consumeErrors=True)
            for ok, value in results:
                if not ok:
                    failures.append("round {}: {}".format(n, value.value if value.check(StorageUnavailable)
                                                          else value.getTraceback()))
            if failures:
                break
        self.assertEqual(failures, [])
        head = await self.storage.head(USER)
        self.assertEqual(head, ROUNDS * len(DEVICES))
        device = await self.storage.get_device(USER, DEVICES[0])
        assert device is not None
        self.assertEqual((device.last_device_seq, device.delivered_seq), (ROUNDS, ROUNDS + 1))
        self.assertLess(time.monotonic() - started, 60)
