"""
The external services of integration tests: PostgreSQL and Redis.

``require_postgres`` / ``require_redis`` skip a test whose service is down,
with a reason naming the service, except under ``CI=true``, where they raise
``ServiceUnavailable`` so that CI never passes by skipping. ``PostgresDatabase``
is a throwaway database; ``create_database`` ties one to a test's cleanup.

``PB_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``)
is the maintenance database used to create and drop test databases;
``PB_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) is the Redis the
tests use. ``tests.harness`` re-exports everything here.
"""

from __future__ import annotations

import os
import secrets
import socket
import unittest
from typing import Dict, Optional, Sequence, Tuple
from urllib.parse import urlparse, urlunparse

from twisted.trial.unittest import TestCase

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def in_ci() -> bool:
    """True when running under CI (``CI=true``), where skips of service tests are errors."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def postgres_base_url() -> str:
    """URL of the maintenance database used to create and drop test databases."""
    return os.environ.get("PB_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL


def redis_url() -> str:
    """The Redis URL handed to servers started with ``redis=True``."""
    return os.environ.get("PB_TEST_REDIS_URL") or DEFAULT_REDIS_URL


_availability: Dict[str, Tuple[bool, str]] = {}


def _check_postgres() -> Tuple[bool, str]:
    url = postgres_base_url()
    try:
        import psycopg2
    except ImportError as e:
        return False, "PostgreSQL tests need psycopg2 ({})".format(e)
    try:
        conn = psycopg2.connect(url, connect_timeout=3)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return False, "PostgreSQL is not reachable at {} ({}); set PB_TEST_POSTGRES_URL".format(url, first)
    conn.close()
    return True, ""


def _check_redis() -> Tuple[bool, str]:
    url = redis_url()
    u = urlparse(url)
    host, port = u.hostname or "127.0.0.1", u.port or 6379
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
    except OSError as e:
        return False, "Redis is not reachable at {} ({}); set PB_TEST_REDIS_URL".format(url, e)
    if not reply.startswith(b"+PONG"):
        return False, "Redis at {} did not answer PING with PONG (got {!r})".format(url, reply[:40])
    return True, ""


def postgres_available() -> bool:
    """Whether the test PostgreSQL server accepts connections (checked once per run)."""
    if "postgres" not in _availability:
        _availability["postgres"] = _check_postgres()
    return _availability["postgres"][0]


def redis_available() -> bool:
    """Whether the test Redis server answers PING (checked once per run)."""
    if "redis" not in _availability:
        _availability["redis"] = _check_redis()
    return _availability["redis"][0]


class ServiceUnavailable(Exception):
    """A service the test needs is down while ``CI=true`` forbids skipping."""


def _require(testcase: unittest.TestCase, available: bool, reason: str) -> None:
    if available:
        return
    if in_ci():
        raise ServiceUnavailable(reason + " -- CI=true, so this is an error, not a skip")
    raise unittest.SkipTest(reason)


def require_postgres(testcase: unittest.TestCase) -> None:
    """Skip ``testcase`` if PostgreSQL is down; fail it instead under CI."""
    available = postgres_available()
    _require(testcase, available, _availability["postgres"][1])


def require_redis(testcase: unittest.TestCase) -> None:
    """Skip ``testcase`` if Redis is down; fail it instead under CI."""
    available = redis_available()
    _require(testcase, available, _availability["redis"][1])


class PostgresDatabase:
    """
    A fresh, empty database ``pb_test_<hex>`` on the test PostgreSQL server.

    Creating and dropping block the calling thread briefly (a local server);
    that is acceptable in tests.
    """

    def __init__(self, base_url: Optional[str] = None) -> None:
        self.base_url = base_url or postgres_base_url()
        self.name = "pb_test_" + secrets.token_hex(6)
        u = urlparse(self.base_url)
        self.url = urlunparse(u._replace(path="/" + self.name))
        self.dropped = False
        self._execute("CREATE DATABASE {}".format(self.name))

    def _execute(self, sql: str, params: Sequence[object] = ()) -> None:
        import psycopg2

        conn = psycopg2.connect(self.base_url, connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql, params)
        finally:
            conn.close()

    def drop(self) -> None:
        """End every session on the database, then drop it. Safe to call twice."""
        if self.dropped:
            return
        self._execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (self.name,),
        )
        self._execute("DROP DATABASE IF EXISTS {}".format(self.name))
        self.dropped = True

    def __repr__(self) -> str:
        return "<PostgresDatabase {}>".format(self.url)


def create_database(testcase: TestCase) -> PostgresDatabase:
    """A fresh PostgreSQL database, dropped when ``testcase`` ends."""
    require_postgres(testcase)
    db = PostgresDatabase()
    testcase.addCleanup(db.drop)
    return db
