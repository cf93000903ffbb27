"""
Effects after commit (``Txn.call_after``) and the typed answers of the
stores, in memory: a SQLite ``:memory:`` connection behind a pool that runs
each transaction at once, in the test's thread.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.logger import LogLevel, Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.server.storage import (
    DeviceChange, Mailbox, MailboxReply, Outcome, OutcomeKind, PairingStored, StorageUnavailable, Txn,
)
from pocketbridge.server.storage import base as storage_base
from pocketbridge.server.storage import migrations
from pocketbridge.server.storage.sqlite import SQLiteStorage


class MemoryPool:
    """
    ``runInteraction`` on one SQLite connection, at once: COMMIT after the
    function returns, ROLLBACK if it raises. ``fail_commit`` makes the COMMIT
    fail (the disk is full); ``retry_once`` runs the function a second time
    after a first attempt that raised (what ``QuietPool`` does when the pooled
    connection was dead); ``hold`` keeps the function until ``release``.
    """

    def __init__(self) -> None:
        self.conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        self.conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
        self.fail_commit = False
        self.retry_once = False
        self.hold = False
        self.held: List[Tuple[Callable[[Any], Any], "Deferred[Any]"]] = []

    def runInteraction(self, fn: Callable[[Any], Any]) -> "Deferred[Any]":
        if self.hold:
            d: "Deferred[Any]" = Deferred()
            self.held.append((fn, d))
            return d
        try:
            return succeed(self._attempt(fn))
        except BaseException:
            return fail(Failure())

    def release(self) -> None:
        """Run the held transactions now (their callers may have gone)."""
        held, self.held = self.held, []
        for fn, d in held:
            d.callback(self._attempt(fn))

    def _attempt(self, fn: Callable[[Any], Any]) -> Any:
        try:
            result = fn(self.conn.cursor())
            if self.fail_commit:
                raise sqlite3.OperationalError("database or disk is full")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            if not self.retry_once:
                raise
            self.retry_once = False
            result = fn(self.conn.cursor())
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")
        return result

    def rows(self) -> List[str]:
        return [r[0] for r in self.conn.execute("SELECT k FROM t ORDER BY k")]


class EffectsAfterCommitTests(SynchronousTestCase):
    """``Txn.call_after`` through ``Storage.run``."""

    def setUp(self) -> None:
        self.events: List[Dict[str, Any]] = []
        self.patch(storage_base, "log", Logger(observer=self.events.append))
        self.storage = SQLiteStorage(":memory:")
        self.pool = MemoryPool()
        self.storage.pool = self.pool  # type: ignore[assignment]
        self.seen: List[Tuple[str, bool]] = []

    def effect(self, name: str) -> None:
        """Record ``name`` and whether a transaction was still open when the effect ran."""
        self.seen.append((name, self.pool.conn.in_transaction))

    def writes(self, key: str, then_raise: Optional[BaseException] = None) -> Callable[[Txn], str]:
        """A transaction function: insert ``key``, register an effect, maybe raise."""
        def txn_fn(txn: Txn) -> str:
            txn.execute("INSERT INTO t (k) VALUES (?)", (key,))
            txn.call_after(self.effect, "stored " + key)
            if then_raise is not None:
                raise then_raise
            return key

        return txn_fn

    def test_effects_run_after_commit_before_the_caller(self) -> None:
        """Registered effects run once, in order, after COMMIT and before the caller's callback sees the result."""
        def txn_fn(txn: Txn) -> str:
            txn.call_after(self.effect, "first")
            txn.execute("INSERT INTO t (k) VALUES ('a')")
            txn.call_after(self.effect, "second")
            return "done"

        d = self.storage.run("probe", txn_fn)
        d.addCallback(lambda result: self.seen.append(("caller got " + result, False)))
        self.successResultOf(d)
        self.assertEqual(self.seen, [("first", False), ("second", False), ("caller got done", False)])
        self.assertEqual(self.pool.rows(), ["a"])

    def test_no_effect_on_rollback(self) -> None:
        """A transaction that raises rolls back: its write is gone, its effects never run, the error passes on."""
        self.failureResultOf(self.storage.run("probe", self.writes("a", ZeroDivisionError())), ZeroDivisionError)
        self.assertEqual((self.seen, self.pool.rows()), ([], []))

    def test_no_effect_when_commit_fails(self) -> None:
        """A COMMIT that fails (an outage) runs no effect; the caller gets StorageUnavailable."""
        self.pool.fail_commit = True
        self.failureResultOf(self.storage.run("probe", self.writes("a")), StorageUnavailable)
        self.assertEqual((self.seen, self.pool.rows()), ([], []))

    def test_retried_attempt_drops_its_effects(self) -> None:
        """When the pool retries a transaction, only the attempt that committed runs its effects."""
        self.pool.retry_once = True
        calls: List[int] = []

        def txn_fn(txn: Txn) -> int:
            calls.append(1)
            txn.call_after(self.effect, "attempt {}".format(len(calls)))
            if len(calls) == 1:
                raise sqlite3.OperationalError("server closed the connection")
            return len(calls)

        self.assertEqual(self.successResultOf(self.storage.run("probe", txn_fn)), 2)
        self.assertEqual(self.seen, [("attempt 2", False)])

    def test_failing_effect_is_logged_and_the_rest_run(self) -> None:
        """An effect that raises is logged as a bug; the committed call still succeeds and later effects run."""
        def txn_fn(txn: Txn) -> str:
            txn.call_after(lambda: 1 // 0)
            txn.call_after(self.effect, "after the broken one")
            return "ok"

        self.assertEqual(self.successResultOf(self.storage.run("probe", txn_fn)), "ok")
        self.assertEqual(self.seen, [("after the broken one", False)])
        self.assertEqual([e["log_level"] for e in self.events], [LogLevel.critical])
        self.assertIsInstance(self.events[0]["log_failure"].value, ZeroDivisionError)

    def test_cancelled_caller_still_gets_effects_of_a_commit(self) -> None:
        """A caller that gave up (CancelledError) does not stop the effects of a transaction that then commits."""
        self.pool.hold = True
        d = self.storage.run("probe", self.writes("a"))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.seen, [])
        self.pool.release()
        self.assertEqual((self.seen, self.pool.rows()), ([("stored a", False)], ["a"]))
        self.assertEqual(self.events, [])


class MigrationLogTests(SynchronousTestCase):
    """The migrator says "applied" only for what committed."""

    def setUp(self) -> None:
        self.events: List[Dict[str, Any]] = []
        self.patch(storage_base, "log", Logger(observer=self.events.append))
        self.storage = SQLiteStorage(":memory:")
        self.storage.pool = MemoryPool()  # type: ignore[assignment]

    def applied(self) -> List[str]:
        return [e["name"] for e in self.events if e.get("log_format") == "applied migration {name}"]

    def test_applied_lines_after_commit(self) -> None:
        """A fresh database gets one "applied migration" line per file, in order."""
        version = self.successResultOf(self.storage.migrate())
        self.assertEqual(self.applied(), [name for _, name, _ in migrations.available("sqlite")][:version])

    def test_no_applied_line_when_a_later_file_fails(self) -> None:
        """Two good files and a broken third share one rolled-back transaction: no "applied" line at all."""
        files = [(1, "001_a.sql", "CREATE TABLE a (x INTEGER);"), (2, "002_b.sql", "CREATE TABLE b (x INTEGER);"),
                 (3, "003_c.sql", "CREATE TABLE a (x INTEGER);")]
        self.patch(migrations, "available", lambda dialect: files)
        self.failureResultOf(self.storage.migrate(), sqlite3.OperationalError)
        self.assertEqual(self.applied(), [])


class LockedBatchTests(SynchronousTestCase):
    """The jobs' public batch methods."""

    def test_lock_held_elsewhere_fires_none_and_deletes_nothing(self) -> None:
        """When another node holds the job's lock the batch fires None without running its statements."""
        class Busy(SQLiteStorage):
            def _try_job_lock(self, txn: Txn, job: str) -> bool:
                self.asked = job
                return False

        storage = Busy(":memory:")
        pool = MemoryPool()
        storage.pool = pool  # type: ignore[assignment]
        # No events table here: running the deletion would fail the call.
        for call, lock in ((lambda: storage.delete_expired_events(1, 10), "event_ttl"),
                           (lambda: storage.apply_retention(1, 10), "retention"),
                           (lambda: storage.delete_expired_pairing(1, 10), "pairing_expiry"),
                           (lambda: storage.delete_expired_mailboxes(1, 10), "mailbox_expiry")):
            self.assertIsNone(self.successResultOf(call()))
            self.assertEqual(storage.asked, lock)


class TypedAnswerTests(SynchronousTestCase):
    """Outcomes are enums that still read, compare and label as their text."""

    def test_outcome_kind_from_text(self) -> None:
        """An Outcome made from a kind's text holds the enum member; unknown text is refused."""
        self.assertIs(Outcome("stored", 1, 1).kind, OutcomeKind.STORED)
        self.assertRaises(ValueError, Outcome, "stord")

    def test_text_in_logs_metrics_and_comparisons(self) -> None:
        """str(), format() and == give the old strings, so log lines, metric labels and callers are unchanged."""
        for member, text in ((OutcomeKind.NO_USER, "no_user"), (DeviceChange.NAME_TAKEN, "conflict"),
                             (PairingStored.STORED, "stored"), (Mailbox.TAKEN_OTHER, "taken_other")):
            self.assertEqual((str(member), "{}".format(member), member == text), (text, text, True))

    def test_mailbox_reply_indexes_like_the_old_tuples(self) -> None:
        """reply[0] is the status and reply[1], reply[2] the value and owner, as the routes read them."""
        reply = MailboxReply(Mailbox.OK, "msg", "user")
        self.assertEqual((reply[0], reply[1], reply[2]), ("ok", "msg", "user"))
        self.assertTrue(MailboxReply(Mailbox.WAIT)[0] == "wait")
