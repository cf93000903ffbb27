"""
Tests of the integration harness itself, against the real server process.

If these fail, every integration test built on ``tests.harness`` is suspect.
"""

from __future__ import annotations

import os
import signal
import unittest

from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests import harness, services
from tests.harness import (
    PostgresDatabase,
    PostgresMixin,
    ServerStartError,
    ServiceUnavailable,
    SQLiteMixin,
    create_database,
    make_server,
    require_postgres,
    require_redis,
    start_server,
)


class ServerLifecycleTests:
    """Start, health, crash and restart of a real server; run once per backend."""

    backend: str

    async def test_starts_and_answers_health(self) -> None:
        """A started server answers GET /health with 200 on its own port."""
        server = await start_server(self)
        status, _ = await server.http_get("/health")
        self.assertEqual(status, 200)  # type: ignore[attr-defined]

    async def test_kill9_then_restart(self) -> None:
        """After SIGKILL the port is closed; restart() brings the server back on the same port and data."""
        server = await start_server(self)
        port, data_dir = server.port, server.data_dir
        code = await server.kill9()
        self.assertEqual(code, -9)  # type: ignore[attr-defined]
        with self.assertRaises(ConnectionRefusedError):  # type: ignore[attr-defined]
            await server.http_get("/health", timeout=2.0)
        await server.restart()
        self.assertEqual((server.port, server.data_dir), (port, data_dir))  # type: ignore[attr-defined]
        status, _ = await server.http_get("/health")
        self.assertEqual(status, 200)  # type: ignore[attr-defined]

    async def test_sigterm_stops_cleanly(self) -> None:
        """SIGTERM shuts the reactor down and the process exits before the SIGKILL deadline."""
        server = await start_server(self)
        code = await server.stop()
        # twistd re-raises the signal that stopped it once shutdown is done, so a
        # clean stop shows as -SIGTERM; SIGKILL (the harness's fallback) is -9.
        self.assertIn(code, (0, -signal.SIGTERM), server.log_text()[-3000:])  # type: ignore[attr-defined]
        self.assertIn("Main loop terminated", server.log_text())  # type: ignore[attr-defined]
        self.assertFalse(server.running)  # type: ignore[attr-defined]

    async def test_starts_with_redis(self) -> None:
        """A server given --redis (the cluster bus) starts and reports healthy."""
        server = await start_server(self, redis=True)
        status, _ = await server.http_get("/health")
        self.assertEqual(status, 200)  # type: ignore[attr-defined]


class ServerLifecycleTestsSQLite(ServerLifecycleTests, SQLiteMixin, TestCase):
    """ServerLifecycleTests on the embedded SQLite storage."""


class ServerLifecycleTestsPostgres(ServerLifecycleTests, PostgresMixin, TestCase):
    """ServerLifecycleTests on PostgreSQL."""


class TwoNodeTests(TestCase):
    """The cluster shape: several server processes on one database and one Redis."""

    def setUp(self) -> None:
        require_postgres(self)
        require_redis(self)

    async def test_two_nodes_share_one_database(self) -> None:
        """Two nodes given the same database URL and Redis both start (migrations once) and report healthy."""
        db = create_database(self)
        a = await start_server(self, backend="postgresql", database_url=db.url, redis=True)
        b = await start_server(self, backend="postgresql", database_url=db.url, redis=True)
        self.assertNotEqual(a.port, b.port)
        for node in (a, b):
            status, body = await node.http_get("/health")
            self.assertEqual(status, 200, body)


class ConfigurationErrorTests(TestCase):
    """A bad setting stops twistd with a one-line message, not a traceback."""

    def assertOneLineError(self, result: harness.ExitResult, name: str) -> None:
        self.assertNotEqual(result.code, 0, result.output)
        self.assertNotIn("Traceback", result.stderr, result.output)
        self.assertNotIn("Traceback", result.stdout, result.output)
        last = [line for line in result.output.splitlines() if line.strip()][-1]
        self.assertIn(name, last, result.output)

    async def test_bad_option(self) -> None:
        """--max-message-bytes=abc exits non-zero; the last line names the option; no traceback."""
        server = make_server(self, args=["--max-message-bytes=abc"])
        result = await server.start_expect_failure()
        self.assertOneLineError(result, "max-message-bytes")

    async def test_bad_environment_variable(self) -> None:
        """PB_MAX_MESSAGE_BYTES=abc exits non-zero; the last line names the variable; no traceback."""
        server = make_server(self, env={"PB_MAX_MESSAGE_BYTES": "abc"})
        result = await server.start_expect_failure()
        self.assertOneLineError(result, "PB_MAX_MESSAGE_BYTES")

    async def test_start_reports_failure_with_output(self) -> None:
        """start() on a server that cannot start raises ServerStartError carrying the server's message."""
        server = make_server(self, args=["--max-message-bytes=abc"])
        with self.assertRaises(ServerStartError) as caught:
            await server.start()
        self.assertIn("max-message-bytes", str(caught.exception))


class PostgresDatabaseTests(TestCase):
    """The throwaway PostgreSQL databases the integration tests use."""

    def setUp(self) -> None:
        require_postgres(self)

    def _exists(self, name: str) -> bool:
        import psycopg2

        conn = psycopg2.connect(services.postgres_base_url())
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                return cur.fetchone() is not None
        finally:
            conn.close()

    def test_create_and_drop(self) -> None:
        """A PostgresDatabase exists and accepts connections at .url until drop() removes it."""
        import psycopg2

        db = PostgresDatabase()
        self.addCleanup(db.drop)
        self.assertTrue(db.name.startswith("pb_test_"))
        self.assertTrue(self._exists(db.name))
        held = psycopg2.connect(db.url)  # drop() must end sessions like this one
        self.addCleanup(lambda: held.closed or held.close())
        db.drop()
        self.assertFalse(self._exists(db.name))


class ServiceRequirementTests(SynchronousTestCase):
    """require_postgres / require_redis: skip locally, fail under CI."""

    def _down(self, key: str) -> None:
        self.patch(services, "_availability", {key: (False, "{} is down for this test".format(key))})

    def _ci(self, value: str) -> None:
        old = os.environ.get("CI")
        os.environ["CI"] = value
        self.addCleanup(lambda: os.environ.__setitem__("CI", old) if old is not None else os.environ.pop("CI"))

    def test_skip_outside_ci(self) -> None:
        """Without CI=true an unreachable PostgreSQL skips the test with a reason naming it."""
        self._down("postgres")
        self._ci("")
        with self.assertRaises(unittest.SkipTest) as caught:
            require_postgres(self)
        self.assertIn("postgres", str(caught.exception))

    def test_error_under_ci(self) -> None:
        """With CI=true an unreachable Redis is an error, never a skip."""
        self._down("redis")
        self._ci("true")
        with self.assertRaises(ServiceUnavailable) as caught:
            require_redis(self)
        self.assertNotIsInstance(caught.exception, unittest.SkipTest)
        self.assertIn("redis", str(caught.exception))
