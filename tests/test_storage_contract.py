"""
The storage contract (PROTOCOL.md §4.4, §6 steps 3–5, §7.2, §7.3), run
against SQLite (a temporary file) and PostgreSQL (a throwaway database).

The same cases run on both dialects: ``StorageContract`` holds them and the
two concrete classes only say how to make a storage. Storage methods run in
adbapi threads, so these are ``twisted.trial.unittest.TestCase`` (async).
"""

from __future__ import annotations

import atexit
import os
from typing import Any, List, Optional

import orjson
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pocketbridge.server.config import resolve
from pocketbridge.protocol.events import NewEvent, Verdict, check_event, relay_payload
from pocketbridge.server.storage import Outcome, Storage, StorageUnavailable

from pocketbridge.server.storage import migrations  # noqa: E402
from pocketbridge.server.storage.postgres import PostgresStorage  # noqa: E402
from pocketbridge.server.storage.sqlite import SQLiteStorage  # noqa: E402
from pocketbridge.server.storage.sync import migrate_now  # noqa: E402
from tests.harness import PostgresDatabase, create_database, require_postgres  # noqa: E402

NOW = 1_700_000_000_000
USER_A = "d04ab232742bb4ab3a1368bd4615e4e6d0224ab71a016baf8520a332c9778737"
USER_B = "a09aa5f47a6759802ff955f8dc2d2a14a5c99d23be97f864127ff9383455a4f0"
DEV_1 = "0b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b"
DEV_2 = "11111111-2222-4333-8444-555555555555"
BIG_QUOTA = 2**31


class CountingCursor:
    """A driver cursor that records each statement it runs (one per row for executemany)."""

    def __init__(self, cursor: Any, statements: List[str]) -> None:
        self._cursor = cursor
        self.statements = statements

    def execute(self, sql: Any, *args: Any) -> Any:
        self.statements.append(sql.decode() if isinstance(sql, bytes) else sql)
        return self._cursor.execute(sql, *args)

    def executemany(self, sql: Any, rows: Any) -> Any:
        rows = list(rows)
        self.statements.extend([sql] * len(rows))
        return self._cursor.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


def ev(
    n: int,
    user: str = USER_A,
    device: str = DEV_1,
    stream: str = "clipboard:main",
    payload: str = "QUJD",
    ttl: Optional[int] = None,
    event_id: Optional[str] = None,
    etype: str = "clipboard:text",
) -> NewEvent:
    """Event number ``n``: event_id derived from n (unless given) and device_seq n."""
    return NewEvent(
        user_id=user,
        device_id=device,
        event_id=event_id or "00000000-0000-7000-8000-{:012d}".format(n),
        device_seq=n,
        stream_id=stream,
        type=etype,
        encrypted_payload=payload,
        ttl=ttl,
    )


class StorageContract:
    """The cases; mixed into a TestCase with ``make_storage``."""

    storage: Storage
    version: int

    # Provided by TestCase.
    addCleanup: Any
    assertEqual: Any
    assertTrue: Any
    assertFalse: Any
    assertIsNone: Any
    assertIsNotNone: Any
    assertIn: Any
    assertLessEqual: Any
    assertGreaterEqual: Any
    assertFailure: Any
    assertRaises: Any

    def make_storage(self) -> Storage:
        raise NotImplementedError

    def reopen(self) -> Storage:
        """A second storage on the same database."""
        raise NotImplementedError

    def settings(self) -> Any:
        """Settings that point migrate_now at the same database."""
        raise NotImplementedError

    async def setUp(self) -> None:  # type: ignore[override]
        self.storage = self.make_storage()
        self.addCleanup(self.storage.close)
        self.version = await self.storage.start()
        await self.empty()

    async def empty(self) -> None:
        """Make the (migrated) database empty of data; a fresh database already is."""

    # ---------------------------------------------------------- helpers

    async def register(self, user: str = USER_A, device: str = DEV_1, now: int = NOW) -> Any:
        return await self.storage.register_device(user, device, "Laptop", "desktop", now)

    async def commit(self, events: List[NewEvent], now: int = NOW, quota: int = BIG_QUOTA) -> List[Outcome]:
        return await self.storage.commit_batch(events, now, quota)

    async def sql(self, statement: str, params: tuple = ()) -> Any:
        """Run one statement in a storage transaction; fires with fetchall() for a SELECT."""
        storage = self.storage

        def txn_fn(txn: Any) -> Any:
            txn.execute(storage._sql(statement), params)
            return txn.fetchall() if statement.lstrip().upper().startswith("SELECT") else None

        return await storage.run("test", txn_fn)

    # ---------------------------------------------------------- migrations

    async def test_migrations_apply(self) -> None:
        """start() applies every migration and records it; an unknown user then has head 0."""
        files = migrations.available(self.storage.dialect)
        self.assertEqual(self.version, len(files))
        self.assertGreaterEqual(self.version, 1)
        rows = await self.sql("SELECT version FROM schema_version ORDER BY version")
        self.assertEqual([int(r[0]) for r in rows], list(range(1, len(files) + 1)))
        self.assertEqual(await self.storage.head(USER_A), 0)

    async def test_migrate_again_is_a_no_op(self) -> None:
        """Migrating an up-to-date database changes nothing and keeps the data."""
        await self.register()
        await self.commit([ev(1)])
        self.assertEqual(await self.storage.migrate(), self.version)
        self.assertEqual(await self.storage.head(USER_A), 1)

    async def test_newer_schema_refused(self) -> None:
        """A database migrated by a newer server is refused at start and by migrate_now."""
        await self.sql(
            "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
            (self.version + 1, "999_future.sql", NOW),
        )
        await self.assertFailure(self.storage.migrate(), StorageUnavailable, migrations.SchemaTooNew)
        self.assertRaises(migrations.SchemaTooNew, migrate_now, self.settings())

    # ---------------------------------------------------------- devices

    async def test_register_creates_once(self) -> None:
        """The first registration creates the device (created=True); the second finds it unchanged (created=False, nothing written)."""
        device, created = await self.storage.register_device(USER_A, DEV_1, "Laptop", "desktop", NOW)
        self.assertTrue(created)
        self.assertEqual(
            (device.user_id, device.device_id, device.name, device.type, device.created_at, device.last_device_seq,
             device.delivered_seq, device.revoked_at),
            (USER_A, DEV_1, "Laptop", "desktop", NOW, 0, 0, None),
        )
        again, created = await self.storage.register_device(USER_A, DEV_1, "Renamed", "mobile", NOW + 5)
        self.assertFalse(created)
        self.assertEqual((again.name, again.type, again.created_at), ("Laptop", "desktop", NOW))
        stored = await self.storage.get_device(USER_A, DEV_1)
        # last_seen is "now" from presence while online; storage gets it when the last socket closes.
        self.assertEqual(stored.last_seen, NOW)

    async def test_same_device_id_other_user_is_another_device(self) -> None:
        """The same device_id under another user_id is a new device of that user."""
        await self.register(USER_A, DEV_1)
        device, created = await self.storage.register_device(USER_B, DEV_1, None, "unknown", NOW)
        self.assertTrue(created)
        self.assertEqual((device.user_id, device.name), (USER_B, None))
        self.assertEqual((await self.storage.get_device(USER_A, DEV_1)).name, "Laptop")

    async def test_concurrent_registration_creates_once(self) -> None:
        """Of several simultaneous first registrations of one device, exactly one reports created."""
        results = await gatherResults(
            [self.storage.register_device(USER_A, DEV_1, "Laptop", "desktop", NOW) for _ in range(4)]
        )
        self.assertEqual(sorted(created for _, created in results), [False, False, False, True])

    async def test_revoked_device_not_recreated(self) -> None:
        """Registering a revoked device returns it revoked, created=False, last_seen untouched."""
        await self.register()
        await self.sql("UPDATE devices SET revoked_at = ? WHERE user_id = ? AND device_id = ?", (NOW + 1, USER_A, DEV_1))
        device, created = await self.storage.register_device(USER_A, DEV_1, "Laptop", "desktop", NOW + 10)
        self.assertFalse(created)
        self.assertEqual((device.revoked_at, device.last_seen), (NOW + 1, NOW))

    async def test_get_unknown_device(self) -> None:
        """get_device of an unknown device is None."""
        self.assertIsNone(await self.storage.get_device(USER_A, DEV_2))

    # ---------------------------------------------------------- commit: sequences

    async def test_per_user_seq_without_gaps(self) -> None:
        """Each user's events get seq 1, 2, 3 … in commit order, across batches."""
        await self.register(USER_A)
        await self.register(USER_B)
        first = await self.commit([ev(1), ev(2), ev(1, user=USER_B)])
        second = await self.commit([ev(3), ev(2, user=USER_B)])
        self.assertEqual([(o.kind, o.seq) for o in first], [("stored", 1), ("stored", 2), ("stored", 1)])
        self.assertEqual([(o.kind, o.seq) for o in second], [("stored", 3), ("stored", 2)])
        self.assertEqual((await self.storage.head(USER_A), await self.storage.head(USER_B)), (3, 2))

    async def test_stream_seq_per_user_and_stream(self) -> None:
        """stream_seq counts per (user, stream_id); another user's same stream_id starts at 1."""
        await self.register(USER_A)
        await self.register(USER_B)
        out = await self.commit([ev(1, stream="s1"), ev(2, stream="s2"), ev(3, stream="s1")])
        self.assertEqual([o.stream_seq for o in out], [1, 1, 2])
        out = await self.commit([ev(4, stream="s1"), ev(1, user=USER_B, stream="s1")])
        self.assertEqual([o.stream_seq for o in out], [3, 1])

    async def test_stored_row_round_trips(self) -> None:
        """A stored event reads back with every field, created_at = commit time and its ttl."""
        await self.register()
        out = await self.commit([ev(7, ttl=NOW + 10_000, payload="QUJDRA==")], now=NOW + 3)
        rows = await self.storage.read_range(USER_A, 0, 10)
        self.assertEqual(rows, [out[0].stored])
        row = rows[0]
        self.assertEqual(
            (row.user_id, row.seq, row.device_id, row.device_seq, row.stream_seq, row.encrypted_payload, row.ttl,
             row.created_at),
            (USER_A, 1, DEV_1, 7, 1, "QUJDRA==", NOW + 10_000, NOW + 3),
        )

    async def test_last_device_seq_is_max(self) -> None:
        """last_device_seq is the highest device_seq stored, even when a lower one arrives later."""
        await self.register()
        await self.commit([ev(5)])
        await self.commit([ev(3)])
        self.assertEqual((await self.storage.get_device(USER_A, DEV_1)).last_device_seq, 5)

    async def test_unknown_user(self) -> None:
        """Events of a user with no row are not stored (no_user) and allocate nothing."""
        out = await self.commit([ev(1, user=USER_B)])
        self.assertEqual(out[0].kind, "no_user")
        self.assertEqual(await self.storage.head(USER_B), 0)

    async def test_concurrent_commits_get_distinct_seqs(self) -> None:
        """Commits running at once for one user (two writers or nodes) get distinct, gapless seqs."""
        await self.register()
        batches = [[ev(10 * b + i, stream="s") for i in range(1, 4)] for b in range(4)]
        results = await gatherResults([self.storage.commit_batch(batch, NOW, BIG_QUOTA) for batch in batches])
        seqs = sorted(o.seq for out in results for o in out)
        stream_seqs = sorted(o.stream_seq for out in results for o in out)
        self.assertEqual((seqs, stream_seqs), (list(range(1, 13)), list(range(1, 13))))
        self.assertEqual(await self.storage.head(USER_A), 12)

    async def test_data_survives_reopen(self) -> None:
        """Committed events and devices are there after the storage is closed and opened again."""
        await self.register()
        await self.commit([ev(1), ev(2)])
        self.storage.close()
        reopened = self.reopen()
        self.addCleanup(reopened.close)
        await reopened.start()
        self.assertEqual(await reopened.head(USER_A), 2)
        self.assertIsNotNone(await reopened.get_device(USER_A, DEV_1))

    async def test_any_accepted_ttl_is_storable(self) -> None:
        """An event check_event accepts with ttl 2^63 (a JSON integer) is stored, not a storage failure."""
        await self.register()
        fields = orjson.loads(
            b'{"event_id":"00000000-0000-7000-8000-000000000001","device_id":"' + DEV_1.encode()
            + b'","device_seq":1,"stream_id":"s","type":"t","encrypted_payload":"QUJD","ttl":9223372036854775808}'
        )
        checked = check_event(fields, USER_A, DEV_1, 1024, NOW)
        if checked.verdict is not Verdict.ACCEPT:
            return  # refused up front: also fine
        assert checked.event is not None
        out = await self.commit([checked.event])
        self.assertEqual(out[0].kind, "stored")

    # ---------------------------------------------------------- commit: idempotency

    async def test_duplicate_acked_with_stored_seq(self) -> None:
        """The same event again is a duplicate carrying the original seq and stream_seq; nothing new is stored."""
        await self.register()
        await self.commit([ev(1), ev(2, stream="other")])
        out = await self.commit([ev(2, stream="other")])
        self.assertEqual((out[0].kind, out[0].seq, out[0].stream_seq), ("duplicate", 2, 1))
        self.assertEqual(await self.storage.head(USER_A), 2)
        self.assertEqual(len(await self.storage.read_range(USER_A, 0, 100)), 2)

    async def test_duplicate_within_one_batch(self) -> None:
        """An event repeated in the same batch is stored once; the copy is a duplicate with its seq."""
        await self.register()
        out = await self.commit([ev(1), ev(1)])
        self.assertEqual([(o.kind, o.seq) for o in out], [("stored", 1), ("duplicate", 1)])
        self.assertEqual(await self.storage.head(USER_A), 1)

    async def test_same_event_id_other_device_seq_conflicts(self) -> None:
        """The same event_id under another device_seq is a conflict and is not stored."""
        await self.register()
        await self.commit([ev(1, event_id="aaaaaaaa-0000-7000-8000-000000000001")])
        out = await self.commit([ev(2, event_id="aaaaaaaa-0000-7000-8000-000000000001")])
        self.assertEqual(out[0].kind, "conflict")
        self.assertEqual(await self.storage.head(USER_A), 1)

    async def test_same_event_id_other_device_conflicts(self) -> None:
        """The same event_id from another device of the user is a conflict."""
        await self.register(USER_A, DEV_1)
        await self.register(USER_A, DEV_2)
        await self.commit([ev(1, device=DEV_1)])
        out = await self.commit([ev(1, device=DEV_2)])
        self.assertEqual(out[0].kind, "conflict")

    async def test_same_device_seq_other_event_id_conflicts(self) -> None:
        """The same (device_id, device_seq) with another event_id is a conflict, also within one batch."""
        await self.register()
        await self.commit([ev(1)])
        out = await self.commit([ev(1, event_id="bbbbbbbb-0000-7000-8000-000000000001")])
        self.assertEqual(out[0].kind, "conflict")
        out = await self.commit([ev(2), ev(2, event_id="bbbbbbbb-0000-7000-8000-000000000002")])
        self.assertEqual([o.kind for o in out], ["stored", "conflict"])
        self.assertEqual(await self.storage.head(USER_A), 2)

    async def test_event_id_unique_per_user_only(self) -> None:
        """Two users may use the same event_id and device_seq; both are stored."""
        await self.register(USER_A)
        await self.register(USER_B)
        out = await self.commit([ev(1), ev(1, user=USER_B)])
        self.assertEqual([o.kind for o in out], ["stored", "stored"])

    async def test_conflicts_do_not_break_the_batch(self) -> None:
        """A conflicting event in a batch leaves its neighbours stored with gapless seqs."""
        await self.register()
        await self.commit([ev(1)])
        out = await self.commit([ev(2), ev(1, event_id="cccccccc-0000-7000-8000-000000000001"), ev(3)])
        self.assertEqual([(o.kind, o.seq) for o in out], [("stored", 2), ("conflict", None), ("stored", 3)])

    async def test_statements_per_batch(self) -> None:
        """
        A batch of several users, devices and streams costs a fixed number of
        statements: lock the counters, one lookup, then (PostgreSQL) one write
        of events, counters, streams and devices; SQLite's writes run per row.
        The batch still commits everything and a second one sees the first.
        """
        await self.register(USER_A, DEV_1)
        await self.register(USER_A, DEV_2)
        await self.register(USER_B, DEV_1)
        await self.commit([ev(1, user=USER_B)])
        batch = [ev(1), ev(2, device=DEV_2, stream="other"), ev(3), ev(2, user=USER_B), ev(3, user=USER_B)]
        counted: List[str] = []

        def txn_commit(txn: Any) -> List[Outcome]:
            txn.cursor = CountingCursor(txn.cursor, counted)
            return self.storage._txn_commit(txn, batch, NOW, BIG_QUOTA)

        out = await self.storage.run("counted commit", txn_commit)
        self.assertEqual([(o.kind, o.seq, o.stream_seq) for o in out],
                         [("stored", 1, 1), ("stored", 2, 1), ("stored", 3, 2), ("stored", 2, 2), ("stored", 3, 3)])
        if self.storage.dialect == "postgresql":
            self.assertEqual([c.split()[0] for c in counted], ["SELECT", "WITH", "WITH"])
        else:
            # lock, lookup, then one statement per event, user, stream and device.
            self.assertEqual(len(counted), 2 + 5 + 2 + 3 + 3)
        self.assertEqual(await self.storage.head(USER_A), 3)
        self.assertEqual(await self.storage.head(USER_B), 3)
        device = await self.storage.get_device(USER_A, DEV_2)
        assert device is not None
        self.assertEqual(device.last_device_seq, 2)
        out = await self.commit([ev(2, device=DEV_2, stream="other"), ev(4, stream="other")])
        self.assertEqual([(o.kind, o.seq, o.stream_seq) for o in out], [("duplicate", 2, 1), ("stored", 4, 2)])

    # ---------------------------------------------------------- commit: quota

    async def test_quota(self) -> None:
        """Events that would pass max_user_bytes are refused (quota); smaller ones that fit still go in."""
        await self.register()
        out = await self.commit([ev(1, payload="A" * 8), ev(2, payload="A" * 4), ev(3, payload="A" * 2)], quota=10)
        self.assertEqual([(o.kind, o.seq) for o in out], [("stored", 1), ("quota", None), ("stored", 2)])
        out = await self.commit([ev(4, payload="A" * 4)], quota=10)
        self.assertEqual(out[0].kind, "quota")
        self.assertEqual(await self.storage.head(USER_A), 2)

    async def test_quota_per_user(self) -> None:
        """One user's stored bytes do not count against another user's quota."""
        await self.register(USER_A)
        await self.register(USER_B)
        await self.commit([ev(1, payload="A" * 8)], quota=8)
        out = await self.commit([ev(1, user=USER_B, payload="A" * 8)], quota=8)
        self.assertEqual(out[0].kind, "stored")

    async def test_duplicate_does_not_count_toward_quota(self) -> None:
        """Re-sending a stored event when the user is at quota is a duplicate, not quota."""
        await self.register()
        await self.commit([ev(1, payload="A" * 8)], quota=8)
        out = await self.commit([ev(1, payload="A" * 8)], quota=8)
        self.assertEqual(out[0].kind, "duplicate")

    # ---------------------------------------------------------- reading

    async def fill(self) -> None:
        """USER_A: seqs 1..6; DEV_2 wrote 1, 2, 4, 5, 6 and DEV_1 (the reader) wrote 3."""
        await self.register(USER_A, DEV_1)
        await self.register(USER_A, DEV_2)
        await self.commit([ev(1, device=DEV_2), ev(2, device=DEV_2), ev(3, device=DEV_1)])
        await self.commit([ev(4, device=DEV_2), ev(5, device=DEV_2), ev(6, device=DEV_2)])

    async def page(self, after: int, upto: int = 6, limit: int = 100, max_bytes: int = 2**24, now: int = NOW) -> Any:
        events, more = await self.storage.read_page(USER_A, after, upto, DEV_1, limit, max_bytes, now)
        return [e.seq for e in events], more

    async def test_read_page_limit(self) -> None:
        """Pages of limit 2 walk the other device's events in seq order, skipping the reader's own."""
        await self.fill()
        self.assertEqual(await self.page(0, limit=2), ([1, 2], True))
        self.assertEqual(await self.page(2, limit=2), ([4, 5], True))
        self.assertEqual(await self.page(5, limit=2), ([6], False))
        self.assertEqual(await self.page(6, limit=2), ([], False))

    async def test_read_page_last_full_page_has_no_more(self) -> None:
        """A page that ends exactly at the last backlog event says no more."""
        await self.fill()
        self.assertEqual(await self.page(2, limit=3), ([4, 5, 6], False))

    async def test_read_page_stops_at_head(self) -> None:
        """Events committed after H (seq > upto) are not in the page and do not make has_more true."""
        await self.fill()
        self.assertEqual(await self.page(0, upto=4), ([1, 2, 4], False))

    async def test_read_page_skips_expired(self) -> None:
        """Events with ttl ≤ now are never read; ttl > now are; count_backlog agrees."""
        await self.register(USER_A, DEV_1)
        await self.register(USER_A, DEV_2)
        await self.commit([ev(1, device=DEV_2, ttl=NOW), ev(2, device=DEV_2, ttl=NOW + 1), ev(3, device=DEV_2)])
        self.assertEqual(await self.page(0, upto=3), ([2, 3], False))
        self.assertEqual(await self.page(0, upto=3, now=NOW + 1), ([3], False))
        self.assertEqual(await self.storage.count_backlog(USER_A, 0, 3, DEV_1, NOW), 2)

    async def test_read_page_byte_cap(self) -> None:
        """A page stops before the byte cap with has_more, and its serialized events fit the cap."""
        await self.register(USER_A, DEV_1)
        await self.register(USER_A, DEV_2)
        await self.commit([ev(n, device=DEV_2, payload="A" * 1000) for n in range(1, 6)])
        events, more = await self.storage.read_page(USER_A, 0, 5, DEV_1, 100, 3000, NOW)
        self.assertTrue(more)
        self.assertIn(len(events), (1, 2))
        self.assertLessEqual(len(orjson.dumps([relay_payload(e) for e in events])), 3000)

    async def test_read_page_at_least_one_event(self) -> None:
        """An event larger than the byte cap is still sent alone, with has_more when others follow."""
        await self.register(USER_A, DEV_1)
        await self.register(USER_A, DEV_2)
        await self.commit([ev(n, device=DEV_2, payload="A" * 1000) for n in range(1, 3)])
        self.assertEqual(await self.page(0, upto=2, max_bytes=10), ([1], True))
        self.assertEqual(await self.page(1, upto=2, max_bytes=10), ([2], False))

    async def test_read_page_byte_cap_with_long_ids(self) -> None:
        """With maximal stream_id (256) and type (64), the serialized page still fits the byte cap."""
        await self.register(USER_A, DEV_1)
        await self.register(USER_A, DEV_2)
        await self.commit(
            [ev(n, device=DEV_2, stream="s" * 256, etype="t" * 64, payload="QUJD") for n in range(1, 21)]
        )
        events, more = await self.storage.read_page(USER_A, 0, 20, DEV_1, 100, 4000, NOW)
        self.assertTrue(more)
        self.assertLessEqual(len(orjson.dumps([relay_payload(e) for e in events])), 4000)

    async def test_read_range_includes_everything(self) -> None:
        """read_range (gap filling) returns every event in the range, own device and expired included."""
        await self.register(USER_A, DEV_1)
        await self.commit([ev(1, ttl=NOW - 1), ev(2), ev(3)])
        self.assertEqual([e.seq for e in await self.storage.read_range(USER_A, 0, 2)], [1, 2])

    # ---------------------------------------------------------- cursors

    async def test_update_cursors_never_lowers(self) -> None:
        """delivered_seq rises to the given value and is never lowered by a smaller one."""
        await self.register(USER_A, DEV_1)
        await self.register(USER_A, DEV_2)
        await self.storage.update_cursors({(USER_A, DEV_1): 5, (USER_A, DEV_2): 2}, NOW + 1)
        await self.storage.update_cursors({(USER_A, DEV_1): 3, (USER_A, DEV_2): 4}, NOW + 2)
        one = await self.storage.get_device(USER_A, DEV_1)
        two = await self.storage.get_device(USER_A, DEV_2)
        self.assertEqual((one.delivered_seq, two.delivered_seq), (5, 4))

    async def test_update_cursors_sets_last_seen(self) -> None:
        """last_seen is the given close time for a marked device (its cursor untouched), else the flush time."""
        await self.register(USER_A, DEV_1)
        await self.register(USER_A, DEV_2)
        await self.storage.update_cursors({(USER_A, DEV_1): 5}, NOW + 1)
        await self.storage.update_cursors({(USER_A, DEV_2): 4}, NOW + 9, {(USER_A, DEV_1): NOW + 7})
        one = await self.storage.get_device(USER_A, DEV_1)
        two = await self.storage.get_device(USER_A, DEV_2)
        self.assertEqual((one.delivered_seq, one.last_seen), (5, NOW + 7))
        self.assertEqual((two.delivered_seq, two.last_seen), (4, NOW + 9))

    async def test_update_cursor_unknown_device(self) -> None:
        """A cursor for a device with no row creates nothing and does not fail."""
        await self.storage.update_cursors({(USER_A, DEV_2): 5}, NOW)
        self.assertIsNone(await self.storage.get_device(USER_A, DEV_2))

    async def test_give_up_after_three_connections(self) -> None:
        """The third connection in a row ending with the same event unacknowledged moves the cursor past it."""
        await self.register()
        results = [await self.storage.record_unacked(USER_A, DEV_1, 4, 5, NOW + i) for i in range(3)]
        self.assertEqual(results, [False, False, True])
        self.assertEqual((await self.storage.get_device(USER_A, DEV_1)).delivered_seq, 5)


class SchemaPackageTests(SynchronousTestCase):
    """The migrations ship where the storage looks for them."""

    def test_migrations_found_from_the_tree_trial_runs(self) -> None:
        """Both dialects' numbered migrations are found whether pocketbridge is imported from a wheel or the checkout."""
        for dialect in ("sqlite", "postgresql"):
            files = migrations.available(dialect)
            self.assertGreaterEqual(len(files), 1)
            self.assertEqual([v for v, _, _ in files], list(range(1, len(files) + 1)))
            self.assertIn("CREATE TABLE events", files[0][2])


class SQLiteStorageTests(StorageContract, TestCase):
    """The storage contract on SQLite."""

    def make_storage(self) -> Storage:
        self.data_dir = self.mktemp()
        return SQLiteStorage(os.path.join(self.data_dir, "pocketbridge.sqlite3"))

    def settings(self) -> Any:
        return resolve({"data_dir": self.data_dir}, {})

    def reopen(self) -> Storage:
        return SQLiteStorage(os.path.join(self.data_dir, "pocketbridge.sqlite3"))


_shared_database: Optional[PostgresDatabase] = None


def shared_database() -> PostgresDatabase:
    """One database for this process's PostgreSQL cases, dropped at exit (CREATE DATABASE costs ~0.5 s)."""
    global _shared_database
    if _shared_database is None:
        _shared_database = PostgresDatabase()
        atexit.register(_shared_database.drop)
    return _shared_database


class PostgresStorageTests(StorageContract, TestCase):
    """The storage contract on PostgreSQL."""

    # Cases that need a database nobody migrated before (or that they alter).
    fresh_database = ("test_migrations_apply", "test_newer_schema_refused")

    def make_storage(self) -> Storage:
        require_postgres(self)  # skips (or fails under CI) without PostgreSQL
        if self._testMethodName in self.fresh_database:
            self.db = create_database(self)
            self.shared = False
        else:
            self.db = shared_database()
            self.shared = True
        return PostgresStorage(self.db.url, pool_size=4)

    async def empty(self) -> None:
        """Truncate every table but schema_version of the shared database."""
        if not self.shared:
            return
        rows = await self.sql(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'schema_version'"
        )
        await self.sql("TRUNCATE " + ", ".join(r[0] for r in rows))

    def settings(self) -> Any:
        return resolve({"database": self.db.url}, {})

    def reopen(self) -> Storage:
        return PostgresStorage(self.db.url, pool_size=4)
