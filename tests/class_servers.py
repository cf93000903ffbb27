"""
One server for the tests of a class that do not need a fresh one.

Starting ``twistd pocketbridge`` costs about a second of CPU (mostly
imports), and most integration tests only need *a* healthy server: they
make their own identities and devices, so what another test left behind is
invisible to them. Those tests ask for ``class_server`` instead of
``start_server``::

    server = await class_server(self)                         # SQLite or the mixin's backend
    server = await class_server(self, args=["--legacy-clients"])

The first test of a class that asks for a configuration (backend, args,
env, redis) starts the server; the next tests of that class asking for the
same configuration get the same process. Trial has no class fixtures, so a
server lives until the worker process has moved on to ``KEEP`` other
configurations (trial runs a class's tests one after another, so the old
ones are done) and at the latest until the process exits. A server that
died is replaced.

A test may not stop, restart or reconfigure a class server, nor assert on
state shared by every client of the node (totals, per-IP budgets, "nothing
was logged"): such a test uses ``start_server``. Pairing codes are shared
too: tests on one class server pick theirs with ``unique_code()``.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
from collections import OrderedDict
from typing import Hashable, Iterable, List, Mapping, Optional, Set, Tuple

from twisted.trial.unittest import TestCase

from tests.harness import STOP_TIMEOUT, ServerProcess, _delete_redis_keys, release_port
from tests.services import PostgresDatabase, redis_url, require_postgres, require_redis

__all__ = ["KEEP", "class_server", "unique_code"]

KEEP = 3  # configurations kept alive per process; a class rarely uses more than two


class _ClassServer:
    """A shared server and what it owns: its database and its Redis key prefix."""

    def __init__(self, server: ServerProcess, database: Optional[PostgresDatabase], redis_prefix: Optional[str]) -> None:
        self.server = server
        self.database = database
        self.redis_prefix = redis_prefix

    async def close(self) -> None:
        """Stop the process, then drop what it owned."""
        try:
            await self.server.cleanup()
        finally:
            self._drop_owned()

    def close_now(self) -> None:
        """``close`` without a reactor, for the end of the process."""
        process = self.server.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        release_port(self.server.port)
        shutil.rmtree(self.server.directory, ignore_errors=True)
        self._drop_owned()

    def _drop_owned(self) -> None:
        try:
            if self.database is not None:
                self.database.drop()
        finally:
            if self.redis_prefix is not None:
                _delete_redis_keys(self.redis_prefix)


_servers: "OrderedDict[Hashable, _ClassServer]" = OrderedDict()


def _key(testcase: TestCase, backend: str, args: List[str], env: Mapping[str, str], redis: bool) -> Hashable:
    cls = type(testcase)
    return (cls.__module__, cls.__qualname__, backend, tuple(args), tuple(sorted(env.items())), redis)


async def class_server(
    testcase: TestCase,
    backend: Optional[str] = None,
    args: Iterable[str] = (),
    env: Optional[Mapping[str, str]] = None,
    *,
    redis: bool = False,
) -> ServerProcess:
    """
    A healthy server shared with the other tests of ``testcase``'s class that
    ask for the same configuration (see the module docstring). Arguments as
    ``start_server``'s; PostgreSQL gets a fresh database per server.
    """
    backend = backend or getattr(testcase, "backend", "sqlite")
    if backend not in ("sqlite", "postgresql"):
        raise ValueError("backend must be 'sqlite' or 'postgresql', not {!r}".format(backend))
    if backend == "postgresql":
        require_postgres(testcase)
    if redis:
        require_redis(testcase)
    args, env = list(args), dict(env or {})
    key = _key(testcase, backend, args, env, redis)
    shared = _servers.get(key)
    if shared is not None and shared.server.running:
        _servers.move_to_end(key)
        return shared.server
    if shared is not None:  # it died: a test killed it or it crashed; start another
        del _servers[key]
        await shared.close()
    while len(_servers) >= KEEP:
        _, oldest = _servers.popitem(last=False)
        await oldest.close()
    shared = _start_config(backend, args, env, redis)
    try:
        await shared.server.start()
    except BaseException:
        await shared.close()
        raise
    _servers[key] = shared
    return shared.server


def _start_config(backend: str, args: List[str], env: Mapping[str, str], redis: bool) -> _ClassServer:
    extra: List[str] = []
    prefix = None
    if redis:
        extra += ["--redis", redis_url()]
        if not any(a.startswith("--redis-prefix") for a in args):
            prefix = "pbtest:{}:".format(os.urandom(6).hex())
            extra += ["--redis-prefix", prefix]
    database = PostgresDatabase() if backend == "postgresql" else None
    server = ServerProcess(database_url=database.url if database else None, args=extra + args, env=env)
    return _ClassServer(server, database, prefix)


_issued_codes: Set[str] = set()


def unique_code() -> str:
    """
    Six random digits no earlier call in this process returned. Tests that
    share a class server share its pairing namespace: a code one test
    stored is still live when the next test runs, so each test must pick a
    code (or a deliberately wrong one) no other test picked.
    """
    while True:
        code = "{:06d}".format(secrets.randbelow(1_000_000))
        if code not in _issued_codes:
            _issued_codes.add(code)
            return code


def running_class_servers() -> Tuple[ServerProcess, ...]:
    """The class servers alive in this process (for the harness's own tests)."""
    return tuple(s.server for s in _servers.values())


@atexit.register
def _close_all() -> None:
    while _servers:
        _, shared = _servers.popitem(last=False)
        try:
            shared.close_now()
        except Exception:  # best effort at exit: the next one must still be stopped
            pass
