"""
What a failed storage call becomes (issue 9 item 10), in memory.

``Storage.run`` turns only operational and connection errors into
StorageUnavailable; a programming error is logged as a bug with its
traceback and passed on as itself; a cancelled call (the client went away)
is passed on as CancelledError and logs nothing. And a REST request whose
client goes away while it waits is neither a 503 nor a logged bug.

The storage tests use a real SQLite file in a temporary directory behind a
synchronous stand-in for adbapi's pool; the REST test drives a real Klein
app through ``Site`` on a ``StringTransport``.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from typing import Any, Callable, Dict, List

import psycopg2
from twisted.enterprise import adbapi
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from pocketbridge.server import metrics
from pocketbridge.server.api import http as api_http
from pocketbridge.server.api.http import Api, LimitedRequest
from pocketbridge.server.config import resolve
from pocketbridge.server.cluster.limits import LocalLimits
from pocketbridge.server.storage import StorageUnavailable
from pocketbridge.server.storage import base as storage_base
from pocketbridge.server.storage.sqlite import SQLiteStorage


class SyncPool:
    """``runInteraction`` on one real SQLite connection, at once; or never, while ``hang`` is set."""

    def __init__(self, target: str, uri: bool = False) -> None:
        self.conn = sqlite3.connect(target, isolation_level=None, uri=uri, check_same_thread=False)
        self.hang = False

    def runInteraction(self, fn: Callable[[Any], Any]) -> "Deferred[Any]":
        if self.hang:
            return Deferred()
        cur = self.conn.cursor()
        try:
            result = fn(cur)
        except BaseException:
            failure = Failure()
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            return fail(failure)
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")
        return succeed(result)

    def close(self) -> None:
        self.conn.close()


class StorageRunTests(SynchronousTestCase):
    """Storage.run's error mapping on a migrated SQLite database."""

    def setUp(self) -> None:
        self.events: List[Dict[str, Any]] = []
        self.patch(storage_base, "log", Logger(observer=self.events.append))
        directory = tempfile.mkdtemp()
        self.path = os.path.join(directory, "db.sqlite3")
        self.storage = SQLiteStorage(self.path)
        self.storage.pool = SyncPool(self.path)  # type: ignore[assignment]
        self.addCleanup(lambda: self.storage.pool.close())  # type: ignore[union-attr]
        self.successResultOf(self.storage.migrate())
        self.events.clear()

    def levels(self) -> List[Any]:
        """The level of every log event since setUp."""
        return [e["log_level"] for e in self.events]

    def raising(self, error: BaseException) -> "Deferred[Any]":
        """A storage call whose transaction raises ``error``."""
        def txn(cur: Any) -> None:
            raise error

        return self.storage.run("probe", txn)

    def test_read_only_database_is_unavailable(self) -> None:
        """A write to a database the server cannot write (SQLITE_READONLY) is StorageUnavailable, logged once as a warning."""
        self.storage.pool = SyncPool("file:" + self.path + "?mode=ro", uri=True)  # type: ignore[assignment]
        self.failureResultOf(self.storage.store_pairing("k" * 64, "u" * 64, "v1", b"x", 1, 2), StorageUnavailable)
        self.assertEqual(self.levels(), [LogLevel.warn])

    def test_connection_errors_are_unavailable(self) -> None:
        """psycopg2 OperationalError/InterfaceError and adbapi's ConnectionLost are StorageUnavailable."""
        for error in (psycopg2.OperationalError("server closed the connection unexpectedly"),
                      psycopg2.InterfaceError("connection already closed"), adbapi.ConnectionLost()):
            self.failureResultOf(self.raising(error), StorageUnavailable)
        self.assertEqual(self.levels(), [LogLevel.warn] * 3)

    def test_bugs_are_logged_and_passed_on(self) -> None:
        """A missing table, a constraint violation, a driver programming error and a Python error keep their type and are logged at critical with the traceback."""
        def no_table(cur: Any) -> None:
            cur.execute("SELECT * FROM no_such_table")

        def duplicate(cur: Any) -> None:
            cur.execute("INSERT INTO replay_cache (sig, expires_at) VALUES ('a', 1)")
            cur.execute("INSERT INTO replay_cache (sig, expires_at) VALUES ('a', 1)")

        self.failureResultOf(self.storage.run("probe", no_table), sqlite3.OperationalError)
        self.failureResultOf(self.storage.run("probe", duplicate), sqlite3.IntegrityError)
        self.failureResultOf(self.raising(psycopg2.ProgrammingError("syntax error")), psycopg2.ProgrammingError)
        self.failureResultOf(self.raising(ZeroDivisionError()), ZeroDivisionError)
        self.assertEqual(self.levels(), [LogLevel.critical] * 4)
        self.assertTrue(all(e.get("log_failure") is not None for e in self.events))

    def test_cancelled_call_is_quiet(self) -> None:
        """A call cancelled while it waits fails with CancelledError and logs nothing."""
        self.storage.pool.hang = True  # type: ignore[union-attr]
        d = self.storage.get_device("u" * 64, "d")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.events, [])


class _Node:
    """What Api needs of a node."""

    def __init__(self) -> None:
        self.settings = resolve({}, {})
        self.clock = Clock()
        self.limits = LocalLimits(self.clock.seconds)
        self.trusted_proxies: Any = ()


class _NoAuth:
    async def authenticate(self, request: Any, mode: str) -> None:
        return None


class AbandonedRequestTests(SynchronousTestCase):
    """A REST request whose client goes away while it waits on storage."""

    def test_client_gone_is_not_a_failure(self) -> None:
        """The storage call is cancelled; no 503 or 500 is counted and nothing is logged as a bug or a storage failure."""
        from klein import Klein

        events: List[Dict[str, Any]] = []
        self.patch(api_http, "log", Logger(observer=events.append))
        self.patch(storage_base, "log", Logger(observer=events.append))
        storage = SQLiteStorage(os.path.join(tempfile.mkdtemp(), "db.sqlite3"))
        storage.pool = pool = SyncPool(storage.path)  # type: ignore[assignment]
        self.addCleanup(pool.close)
        pool.hang = True  # the database is slow: the call is still running when the client leaves
        pending: List["Deferred[Any]"] = []

        async def waits_on_storage(request: Any, caller: Any) -> Any:
            d = storage.get_device("u" * 64, "d")
            pending.append(d)
            return 200, await d

        app = Klein()
        api = Api(app, _Node(), _NoAuth())
        api.route("/api/slow", ["GET"], auth="none")(waits_on_storage)
        site = Site(app.resource(), requestFactory=LimitedRequest, reactor=Clock())  # no timer in the global reactor
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        channel.makeConnection(transport)

        def count(status: str) -> float:
            return metrics.HTTP_REQUESTS.labels(route="/api/slow", status=status)._value.get()  # type: ignore[no-any-return]

        before = {s: count(s) for s in ("499", "500", "503")}
        channel.dataReceived(b"GET /api/slow HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(len(pending), 1)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(pending[0].called, "the handler was not cancelled")
        self.assertEqual({s: count(s) - before[s] for s in before}, {"499": 1, "500": 0, "503": 0})
        self.assertEqual([e for e in events if e["log_level"] > LogLevel.debug], [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_cancel_inside_the_server_is_a_bug(self) -> None:
        """A CancelledError while the client is still there is answered 500 JSON and logged as a bug."""
        from klein import Klein

        events: List[Dict[str, Any]] = []
        self.patch(api_http, "log", Logger(observer=events.append))

        async def cancels(request: Any, caller: Any) -> Any:
            raise CancelledError()

        app = Klein()
        Api(app, _Node(), _NoAuth()).route("/api/cancels", ["GET"], auth="none")(cancels)
        channel = Site(app.resource(), requestFactory=LimitedRequest, reactor=Clock()).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /api/cancels HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 500 "), transport.value()[:80])
        self.assertIn(b'"code":"INTERNAL"', transport.value())
        self.assertEqual([e["log_level"] for e in events if e["log_level"] > LogLevel.debug], [LogLevel.critical])
