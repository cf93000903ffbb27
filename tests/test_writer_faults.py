"""
Faults on the write path, in memory (issue 9 items 12, 15, 17): the writer
publishes duplicates (an event committed but never acked may never have been
relayed), stops retrying one event per transaction while storage is down,
logs a bounded number of lines per outage, reports ``storage_ok`` for
/health and recovers by itself (a probe write when idle). Also the SDK's
backoff after sessions closed 1013 right after the handshake.
"""

from __future__ import annotations

from typing import Any, Dict, List

from twisted.internet.defer import Deferred, fail, succeed  # noqa: F401
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.client.reconnect import ReconnectingClient, RetryPolicy
from pocketbridge.server.storage import Outcome, StorageUnavailable
from pocketbridge.server.writer import EventWriter
from tests import test_client_unit as loopback
from tests.test_writer import FakeStorage, new_event, stored


class LogCapture:
    """Collects the warn-or-worse events of the writer module while installed."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: Dict[str, Any]) -> None:
        if event.get("log_namespace") == "pocketbridge.server.writer":
            self.events.append(event)


class WriterFaultTests(SynchronousTestCase):
    """The writer through a storage outage."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.storage = FakeStorage()
        self.published: List[Outcome] = []
        self.probes: List["Deferred[Any]"] = []
        self.writer = EventWriter(self.storage, self.clock, self.published.append, max_user_bytes=1000,  # type: ignore[arg-type]
                                  retry_max=5.0, log_interval=60.0, probe=self._probe)

    def _probe(self) -> "Deferred[Any]":
        d: "Deferred[Any]" = Deferred()
        self.probes.append(d)
        return d

    def fail_pending(self) -> None:
        """Fail every commit call that has not fired yet."""
        for _, _, _, d in list(self.storage.calls):
            if not d.called:
                d.errback(Failure(StorageUnavailable("commit_batch")))

    def test_duplicate_is_published_with_its_stored_row(self) -> None:
        """A duplicate (committed earlier, its ack lost) is published again so the live relay cannot miss it."""
        d = self.writer.submit(new_event(1))
        self.clock.advance(0)
        events, _, _, commit = self.storage.calls[0]
        row = stored(events[0], 7).stored
        commit.callback([Outcome("duplicate", 7, 7, row)])
        self.assertEqual(self.successResultOf(d).kind, "duplicate")
        self.assertEqual([(o.kind, o.seq) for o in self.published], [("duplicate", 7)])

    def test_outage_is_not_retried_event_by_event(self) -> None:
        """While storage is down, a failed batch of 50 is not split into 50 commits: its probe fails and the rest waits."""
        ds = [self.writer.submit(new_event(n)) for n in range(1, 51)]
        self.clock.advance(0)
        self.fail_pending()  # the batch of 50
        self.assertEqual(self.storage.batches()[-1], [1])  # the probe: first event alone
        self.fail_pending()  # storage is down
        self.failureResultOf(ds[0], StorageUnavailable)
        self.assertEqual(len(self.storage.calls), 2)
        self.clock.advance(0.3)
        self.assertEqual(self.storage.batches()[-1], list(range(2, 51)))  # the rest, as one batch, after a pause
        self.fail_pending()
        for d in ds[1:]:
            self.failureResultOf(d, StorageUnavailable)
        self.assertEqual(len(self.storage.calls), 3)

    def test_four_minute_outage_costs_few_commits_and_log_lines(self) -> None:
        """Ten events a second for 240 s of outage: at most one commit per backoff step and a handful of log lines."""
        logs = LogCapture(self)
        for _ in range(2400):
            self.writer.submit(new_event(1)).addErrback(lambda f: f.trap(StorageUnavailable))
            self.clock.advance(0.1)
            self.fail_pending()
            for probe in self.probes:
                if not probe.called:
                    probe.errback(Failure(StorageUnavailable("probe_write")))
        self.assertLess(len(self.storage.calls), 240 / 5.0 + 10)
        self.assertFalse(self.writer.storage_ok)
        # Recovery: the next commit succeeds.
        d = self.writer.submit(new_event(2))
        self.clock.advance(5.0)
        self.storage.succeed()
        self.assertTrue(self.writer.storage_ok)
        self.successResultOf(d)
        lines = [e for e in logs.events if e["log_level"].name in ("warn", "error", "critical", "info")]
        # start (2), one reminder a minute (4), back (1)
        self.assertLessEqual(len(lines), 8, [e["log_format"] for e in lines])
        self.assertIn("storage back after", lines[-1]["log_format"])

    def test_storage_ok_follows_commits_and_an_idle_probe_recovers(self) -> None:
        """storage_ok is False after a failed commit; with no traffic a probe write after the backoff makes it True again."""
        self.assertTrue(self.writer.storage_ok)
        d = self.writer.submit(new_event(1))
        self.clock.advance(0)
        self.fail_pending()
        self.failureResultOf(d, StorageUnavailable)
        self.assertFalse(self.writer.storage_ok)
        self.clock.advance(0.3)
        self.assertEqual(len(self.probes), 1)
        self.probes[0].errback(Failure(StorageUnavailable("probe_write")))
        self.assertFalse(self.writer.storage_ok)
        self.clock.advance(5.0)
        self.assertEqual(len(self.probes), 2)
        self.probes[1].callback(None)
        self.assertTrue(self.writer.storage_ok)
        self.clock.advance(60)
        self.assertEqual(len(self.probes), 2)  # no probes while healthy

    def test_one_bad_event_is_isolated_without_backoff(self) -> None:
        """When the probe commits, the failure was one event's: the rest is retried one by one, at once."""
        ds = [self.writer.submit(new_event(n)) for n in (1, 2, 3, 4)]
        self.clock.advance(0)
        self.fail_pending()
        self.storage.succeed()  # probe: event 1 alone
        self.fail_pending()  # event 2 is the bad one
        self.storage.succeed()  # 3 at once, no clock advance
        self.storage.succeed()  # 4
        self.assertEqual(self.storage.batches(), [[1, 2, 3, 4], [1], [2], [3], [4]])
        self.failureResultOf(ds[1], StorageUnavailable)
        self.assertEqual([self.successResultOf(d).seq for d in (ds[0], ds[2], ds[3])], [1, 3, 4])
        self.assertTrue(self.writer.storage_ok)


class BackoffTests(loopback.LoopbackTestCase):
    """ReconnectingClient against a server that accepts handshakes and then closes 1013 at once."""

    def test_1013_right_after_handshake_backs_off(self) -> None:
        """Sessions closed 1013 right after a successful handshake do not reset the backoff: 6 in 60 s, not ~60."""
        self.server.on_authenticated = lambda proto: proto.close_with(1013, "Storage unavailable")
        rng = __import__("random").Random(7)
        runner = ReconnectingClient(self.clock, self.make_client(), policy=RetryPolicy(rng=rng))
        d = runner.run()
        for _ in range(600):
            self.server.flush()
            self.clock.advance(0.1)
        self.assertLessEqual(len(self.server.protocols), 8)
        runner.stop()
        self.server.flush()
        self.clock.advance(10)
        self.server.flush()
        self.successResultOf(d)

    def test_a_useful_session_resets_the_backoff(self) -> None:
        """A session that stayed up past stable_after resets the backoff: the next reconnect comes within 1 s."""
        self.server.on_authenticated = lambda proto: proto.close_with(1013, "Storage unavailable")
        runner = ReconnectingClient(self.clock, self.make_client(), policy=RetryPolicy(rng=__import__("random").Random(1)))
        d = runner.run()
        for _ in range(300):  # 30 s of quick 1013s: the backoff grows to 8-16 s
            self.server.flush()
            self.clock.advance(0.1)
        self.server.on_authenticated = None
        self.server.on_message = lambda proto, msg: msg["type"] == "replay_request" and proto.send(
            {"type": "replay_response", "payload": {"events": [], "has_more": False}})
        before = len(self.server.protocols)
        for _ in range(300):  # wait for the next connect, which stays up
            self.server.flush()
            self.clock.advance(0.1)
            if len(self.server.protocols) > before:
                break
        self.server.flush()
        self.clock.advance(11)  # useful: established for more than 10 s
        self.server.flush()
        count = len(self.server.protocols)
        self.server.current.close_with(1013, "Storage unavailable")
        self.server.flush()
        self.clock.advance(1.0)
        self.server.flush()
        self.assertEqual(len(self.server.protocols), count + 1)
        runner.stop()
        self.server.flush()
        self.clock.advance(10)
        self.server.flush()
        self.successResultOf(d)


class _FailingPool:
    """A connection pool whose every transaction fails as PostgreSQL does when it is stopped."""

    def runInteraction(self, fn: Any, *args: Any) -> "Deferred[Any]":
        import psycopg2

        return fail(psycopg2.OperationalError("connection to server failed: Connection refused"))


class StorageOutageLogTests(SynchronousTestCase):
    """Storage.run during an outage."""

    def test_outage_logs_once_per_kind_of_call(self) -> None:
        """500 failing commits and 500 failing handshake reads give 2 warnings, not 1,000; each still fails StorageUnavailable."""
        from pocketbridge.server.storage import Storage

        captured: List[Dict[str, Any]] = []

        def observe(event: Dict[str, Any]) -> None:
            if event.get("log_namespace") == "pocketbridge.server.storage.base":
                captured.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        storage = Storage()
        storage.pool = _FailingPool()  # type: ignore[assignment]
        for _ in range(500):
            self.failureResultOf(storage.run("commit_batch", lambda txn: None), StorageUnavailable)
            self.failureResultOf(storage.run("get_device", lambda txn: None), StorageUnavailable)
        self.assertEqual(len(captured), 2)
