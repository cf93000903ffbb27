"""
Helpers for integration tests: a real ``twistd pocketbridge`` process, a real
PostgreSQL database, real Redis, real sockets.

Unit tests do not need this module; they use ``SynchronousTestCase`` with
fakes (STYLE.md 14). Use it when a test must prove something about the
server as users run it.

Starting a server
-----------------
Inside an (async) test method of a ``twisted.trial.unittest.TestCase``::

    server = await start_server(self)                       # SQLite
    server = await start_server(self, backend="postgresql")  # fresh database
    server = await start_server(self, redis=True, args=["--legacy-clients"])

``start_server`` creates what the server needs, waits until
``GET /health`` answers 200 and registers cleanups on the test: stop the
process, drop the database, remove the temporary directory. The returned
``ServerProcess`` has ``port``, ``http_url``, ``ws_url``, ``log_path``,
``log_text()``, ``stop()``, ``kill9()``, ``restart()`` and ``http_get()``.

Two nodes sharing one database (a cluster)::

    db = create_database(self)
    a = await start_server(self, backend="postgresql", database_url=db.url, redis=True)
    b = await start_server(self, backend="postgresql", database_url=db.url, redis=True)

A configuration error::

    server = make_server(self, args=["--max-message-bytes=abc"])
    result = await server.start_expect_failure()
    # result.code, result.stdout, result.stderr, result.log

Running one test class against both storage backends
----------------------------------------------------
Write the tests in a plain class (not a ``TestCase``, so trial does not
collect it on its own) that reads ``self.backend``, then combine it with a
backend mixin and ``TestCase``::

    class SyncTests:
        async def test_roundtrip(self) -> None:
            server = await start_server(self, backend=self.backend)
            ...

    class SyncTestsSQLite(SyncTests, SQLiteMixin, TestCase):
        "SyncTests on SQLite."

    class SyncTestsPostgres(SyncTests, PostgresMixin, TestCase):
        "SyncTests on PostgreSQL."

``start_server(self)`` without ``backend`` uses the mixin's ``backend``
(SQLite when there is none). ``PostgresMixin.setUp`` calls
``require_postgres``; a shared class that defines ``setUp`` must call
``super().setUp()``.

Sharing one server among a class's tests
----------------------------------------
A test that only needs *a* healthy server (its own identities, no restart,
no assertion on node-wide totals or per-IP budgets) may take
``await class_server(self, ...)`` from ``tests.class_servers`` instead: one
process per class and configuration, which saves a twistd start per test.

Parallel runs
-------------
``scripts/run-tests`` runs the suite with ``trial -j``. Everything a test
creates is unique to it: ``free_port`` reserves ports across processes (a
lock file per port, below the ephemeral range), directories come from
``mkdtemp``, databases and Redis prefixes have random names.

Services that are not there
---------------------------
``require_postgres`` and ``require_redis`` (from ``tests.services``, also
importable from here) skip the test with a reason that names the service,
except when ``CI=true``: then they fail it, because CI must never pass by
skipping the tests that need those services. ``PB_TEST_POSTGRES_URL`` and
``PB_TEST_REDIS_URL`` point the tests at other servers.

``PB_TEST_KEEP_TMP=1`` keeps each server's directory (data, logs) after the
test and prints where it is.

The server is found through the installed package (a strict editable
install or a wheel): the process runs with a temporary directory as its
working directory, so nothing is imported from the checkout by accident.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import unittest
from typing import IO, Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Set, Tuple, Union

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests import forkserver
from tests.services import (  # re-exported: tests import everything from here
    PostgresDatabase,
    ServiceUnavailable,
    create_database,
    in_ci,
    postgres_available,
    postgres_base_url,
    redis_available,
    redis_url,
    require_postgres,
    require_redis,
)

__all__ = [
    "ExitResult",
    "PostgresDatabase",
    "PostgresMixin",
    "ServerProcess",
    "ServerStartError",
    "ServiceUnavailable",
    "SQLiteMixin",
    "create_database",
    "free_port",
    "in_ci",
    "make_server",
    "postgres_available",
    "postgres_base_url",
    "redis_available",
    "redis_url",
    "release_port",
    "require_postgres",
    "require_redis",
    "start_server",
]

START_TIMEOUT = 20.0  # seconds until /health must answer 200
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
POLL_INTERVAL = 0.05  # seconds between polls of /health and of the process

# Configuration the server reads from its environment. A developer's shell
# may have some of these set; the server under test must not inherit them.
_SERVER_ENV_NAMES = frozenset(
    {
        "DATABASE_URL",
        "REDIS_URL",
        "PORT",
        "LOG_LEVEL",
        "ADMIN_API_KEY",
        "SERVER_PUBLIC_KEY_HEX",
        "SERVER_PRIVATE_KEY_HEX",
    }
)

# Runs twistd in the child with a readable argv[0] (it appears in usage errors).
_TWISTD_MAIN = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


def twistd_command() -> List[str]:
    """The argv prefix that runs twistd with this interpreter."""
    return [sys.executable, "-c", _TWISTD_MAIN]


# Ports are reserved across processes (trial -j workers, other test runs on
# the machine) with one lock file per port: bind(0) would hand out a port that
# another worker can be given too before the server binds it, and that an
# outgoing connection can take as its local port in the meantime.
_PORT_LOCK_DIR = os.path.join(tempfile.gettempdir(), "pocketbridge-test-ports")
_held_ports: Dict[int, IO[bytes]] = {}


def _reservable_ports() -> range:
    """Ports below the kernel's ephemeral range, which outgoing connections never take."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    return range(max(10000, ephemeral_low - 12000), ephemeral_low)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's listenTCP does
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that is free and reserved for this process.

    The reservation (an exclusive ``flock`` on a file named after the port)
    lasts until ``release_port`` or the end of the process, so no other
    trial worker or test run picks the same port meanwhile. Falls back to
    ``bind(0)`` when there is no room below the ephemeral range.
    """
    ports = _reservable_ports()
    rng = random.SystemRandom()
    for _ in range(500 if len(ports) >= 1000 else 0):
        port = rng.choice(ports)
        if port in _held_ports:
            continue
        try:
            os.makedirs(_PORT_LOCK_DIR, mode=0o1777, exist_ok=True)
            lock = open(os.path.join(_PORT_LOCK_DIR, str(port)), "ab")
        except OSError:  # another user's lock directory or file: do without
            break
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by another process
            lock.close()
            continue
        if _bindable(port):
            _held_ports[port] = lock
            return port
        lock.close()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def release_port(port: int) -> None:
    """End this process's reservation of ``port`` (from ``free_port``); a no-op for others."""
    lock = _held_ports.pop(port, None)
    if lock is not None:
        lock.close()


_plugin_checked: Optional[str] = None  # None: not checked; "": fine; else the error


def check_plugin() -> None:
    """
    Raise ``RuntimeError`` with advice if ``twistd pocketbridge --help`` fails.

    Runs once per test run, from a directory outside the checkout, so it
    proves the installed package provides the plugin.
    """
    global _plugin_checked
    if _plugin_checked is None:
        workdir = tempfile.mkdtemp(prefix="pb-plugin-check-")
        try:
            proc = subprocess.run(
                twistd_command() + ["pocketbridge", "--help"],
                cwd=workdir,
                env=_server_environ({}),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=60,
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        output = proc.stdout.decode("utf-8", "replace")
        if proc.returncode == 0 and "pocketbridge" in output.lower():
            _plugin_checked = ""
        else:
            _plugin_checked = (
                "`twistd pocketbridge --help` failed (exit {}), so no server can start.\n"
                "If twistd does not list the pocketbridge plugin, install the package so"
                " that it does:\n"
                "    pip install --config-settings editable_mode=strict -e '.[test]'\n"
                "(a default editable install hides twisted/plugins from twistd). If the"
                " output below is a traceback from pocketbridge, the server fails to"
                " import.\nOutput:\n{}".format(proc.returncode, _tail(output, 40))
            )
    if _plugin_checked:
        raise RuntimeError(_plugin_checked)


def _server_environ(extra: Mapping[str, str]) -> Dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _SERVER_ENV_NAMES and not (k.startswith("PB_") and not k.startswith("PB_TEST_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _read(path: str, start: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


class ExitResult(NamedTuple):
    """How a server process ended: exit code (negative: killed by that signal) and its output."""

    code: int
    stdout: str
    stderr: str
    log: str

    @property
    def output(self) -> str:
        """stdout, stderr and the log file together."""
        return "\n".join(p for p in (self.stdout, self.stderr, self.log) if p)


class ServerStartError(Exception):
    """The server did not become healthy; the message carries its output."""


_live: Set["ServerProcess"] = set()


async def wait_until(testcase: TestCase, check: Callable[[], Any], what: str, timeout: float,
                     interval: float = 0.05) -> Any:
    """Poll ``check`` (sync or async) until it returns something true; fail ``testcase`` after ``timeout`` s."""
    import time

    from twisted.internet.defer import Deferred

    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if isinstance(result, Deferred) or hasattr(result, "__await__"):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            testcase.fail("timed out after {:.1f} s waiting for {}".format(timeout, what))
        await deferLater(reactor, interval, lambda: None)


@atexit.register
def _kill_leftovers() -> None:
    # A trial run interrupted by ^C must not leave servers behind.
    for server in list(_live):
        if server.process is not None and server.process.poll() is None:
            server.process.kill()


class ServerProcess:
    """
    One ``twistd -n pocketbridge`` child process, with its own directory.

    The directory holds ``data/`` (the ``--data-dir``), ``server.log`` (the
    twistd log), ``stdout`` and ``stderr``. Port, data directory and
    database stay the same across ``restart()``.
    """

    def __init__(
        self,
        database_url: Optional[str] = None,
        args: Iterable[str] = (),
        env: Optional[Mapping[str, str]] = None,
        port: Optional[int] = None,
        directory: Optional[str] = None,
    ) -> None:
        self.directory = directory or tempfile.mkdtemp(prefix="pb-server-")
        self.data_dir = os.path.join(self.directory, "data")
        self.database_url = database_url
        self.args = list(args)
        self.env = dict(env or {})
        self._port = port or free_port()
        self._owns_port = port is None  # reserved here: released by cleanup()
        self.process: Optional[Union[subprocess.Popen[bytes], forkserver.ForkedProcess]] = None
        self._files: List[IO[bytes]] = []
        self._reaped_current = True  # no process, or its exit has been recorded
        self.exit_codes: List[int] = []

    # ---- addresses and output

    @property
    def port(self) -> int:
        """The TCP port the server listens on (127.0.0.1 only)."""
        return self._port

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:<port>`` (no trailing slash)."""
        return "http://127.0.0.1:{}".format(self._port)

    @property
    def ws_url(self) -> str:
        """The WebSocket endpoint, ``ws://127.0.0.1:<port>/ws``."""
        return "ws://127.0.0.1:{}/ws".format(self._port)

    @property
    def log_path(self) -> str:
        """The twistd log file (twistd rotates it to ``server.log.N`` past 1 MB)."""
        return os.path.join(self.directory, "server.log")

    @property
    def stdout_path(self) -> str:
        return os.path.join(self.directory, "stdout")

    @property
    def stderr_path(self) -> str:
        return os.path.join(self.directory, "stderr")

    def log_text(self) -> str:
        """Everything the server logged so far, across restarts and rotations."""
        rotated = []
        for name in os.listdir(self.directory):
            prefix = "server.log."
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                rotated.append((int(name[len(prefix):]), name))
        parts = [_read(os.path.join(self.directory, n)) for _, n in sorted(rotated, reverse=True)]
        parts.append(_read(self.log_path))
        return "".join(parts)

    def stderr_text(self) -> str:
        """What the process wrote to stderr, across restarts."""
        return _read(self.stderr_path)

    def stdout_text(self) -> str:
        """What the process wrote to stdout, across restarts."""
        return _read(self.stdout_path)

    @property
    def running(self) -> bool:
        """Whether the child process is alive."""
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process is not None else None

    def argv(self) -> List[str]:
        """The full command line of the server."""
        argv = twistd_command() + [
            "-n",
            "--pidfile=",
            "--logfile=" + self.log_path,
            "pocketbridge",
            "--listen",
            "tcp:{}:interface=127.0.0.1".format(self._port),
            "--data-dir",
            self.data_dir,
        ]
        if self.database_url:
            argv += ["--database", self.database_url]
        return argv + self.args

    # ---- life cycle

    def _spawn(self) -> None:
        if self.running:
            raise RuntimeError("server already running (pid {})".format(self.pid))
        check_plugin()
        self._close_files()
        argv = self.argv()
        prefix = twistd_command()
        if forkserver.enabled() and argv[: len(prefix)] == prefix:
            # The same twistd run, forked from a helper that has done the imports
            # (tests/forkserver.py); a subclass that wraps the command is exec'd.
            self.process = forkserver.ForkedProcess(
                argv[len(prefix):],
                cwd=self.directory,
                env=_server_environ(self.env),
                stdout=self.stdout_path,
                stderr=self.stderr_path,
            )
        else:
            stdout = open(self.stdout_path, "ab")
            stderr = open(self.stderr_path, "ab")
            self._files = [stdout, stderr]
            self.process = subprocess.Popen(
                argv,
                cwd=self.directory,
                env=_server_environ(self.env),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,  # ^C in the terminal reaches trial, not the server
            )
        self._reaped_current = False
        _live.add(self)

    def _close_files(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def _reaped(self) -> int:
        assert self.process is not None
        code = self.process.returncode
        self._reaped_current = True
        self.exit_codes.append(code)
        self._close_files()
        _live.discard(self)
        return code

    async def _wait_exit(self, timeout: float) -> Optional[int]:
        """Poll until the process exits; its exit code, or None after ``timeout`` seconds."""
        assert self.process is not None
        waited = 0.0
        while self.process.poll() is None:
            if waited >= timeout:
                return None
            await deferLater(reactor, POLL_INTERVAL, lambda: None)
            waited += POLL_INTERVAL
        return self._reaped()

    async def http_get(self, path: str, timeout: float = 5.0) -> Tuple[int, bytes]:
        """``GET path`` on the server over a fresh connection: (status, body)."""
        import treq

        response = await treq.get(self.http_url + path, persistent=False, timeout=timeout)
        body = await treq.content(response)
        return response.code, body

    async def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the process and wait until ``GET /health`` answers 200."""
        log_mark = _size(self.log_path)
        err_mark = _size(self.stderr_path)
        out_mark = _size(self.stdout_path)
        self._spawn()
        assert self.process is not None
        waited = 0.0
        last = "no answer yet"
        while True:
            if self.process.poll() is not None:
                code = self._reaped()
                raise ServerStartError(
                    "server exited with code {} before /health answered 200".format(code)
                    + self._output_since(out_mark, err_mark, log_mark)
                )
            try:
                status, body = await self.http_get("/health", timeout=2.0)
            except Exception as e:
                last = "{}: {}".format(type(e).__name__, e)
            else:
                if status == 200:
                    return
                last = "HTTP {}: {!r}".format(status, body[:200])
            if waited >= timeout:
                self.process.kill()
                await self._wait_exit(STOP_TIMEOUT)
                raise ServerStartError(
                    "server did not answer GET /health with 200 within {:.0f} s (last: {})".format(timeout, last)
                    + self._output_since(out_mark, err_mark, log_mark)
                )
            await deferLater(reactor, POLL_INTERVAL, lambda: None)
            waited += POLL_INTERVAL

    def _output_since(self, out_mark: int, err_mark: int, log_mark: int) -> str:
        text = "\ncommand: {}".format(" ".join(self.argv()))
        for label, path, mark in (
            ("stdout", self.stdout_path, out_mark),
            ("stderr", self.stderr_path, err_mark),
            ("log", self.log_path, log_mark),
        ):
            part = _read(path, mark)
            if part.strip():
                text += "\n--- {} (tail) ---\n{}".format(label, _tail(part))
        return text

    async def start_expect_failure(self, timeout: float = START_TIMEOUT) -> ExitResult:
        """
        Start the process and wait for it to exit on its own.

        For configuration errors. Fails if the process is still running after
        ``timeout`` seconds (it is killed then).
        """
        marks = (_size(self.stdout_path), _size(self.stderr_path), _size(self.log_path))
        self._spawn()
        code = await self._wait_exit(timeout)
        if code is None:
            await self.kill9()
            raise AssertionError(
                "server still running after {:.0f} s; expected it to refuse to start".format(timeout)
                + self._output_since(*marks)
            )
        return ExitResult(
            code,
            _read(self.stdout_path, marks[0]),
            _read(self.stderr_path, marks[1]),
            _read(self.log_path, marks[2]),
        )

    async def stop(self, timeout: float = STOP_TIMEOUT) -> Optional[int]:
        """
        SIGTERM, wait for exit, SIGKILL after ``timeout`` seconds.

        Returns the exit code (None if not running). twistd re-raises SIGTERM
        after a clean shutdown, so a clean stop returns ``-15``; ``-9`` means
        the SIGKILL fallback was needed.
        """
        if self.process is None or self._reaped_current:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = await self._wait_exit(timeout)
        if code is None:
            self.process.kill()
            code = await self._wait_exit(timeout)
        return code

    async def kill9(self) -> Optional[int]:
        """SIGKILL (no graceful shutdown) and wait for exit. The exit code (None if not running)."""
        if self.process is None or self._reaped_current:
            return None
        if self.process.poll() is None:
            self.process.kill()
        return await self._wait_exit(STOP_TIMEOUT)

    async def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Stop (if running) and start again: same port, data directory and database."""
        await self.stop()
        await self.start(timeout)

    async def cleanup(self) -> None:
        """Stop the process and, unless ``PB_TEST_KEEP_TMP=1``, remove its directory."""
        try:
            await self.stop()
        finally:
            self._close_files()
            if self._owns_port and not self.running:
                release_port(self._port)
            if os.environ.get("PB_TEST_KEEP_TMP"):
                print("kept server directory {}".format(self.directory), file=sys.stderr)
            else:
                shutil.rmtree(self.directory, ignore_errors=True)

    def __repr__(self) -> str:
        return "<ServerProcess port={} pid={} dir={}>".format(self._port, self.pid, self.directory)


def make_server(
    testcase: TestCase,
    backend: Optional[str] = None,
    args: Iterable[str] = (),
    env: Optional[Mapping[str, str]] = None,
    *,
    database_url: Optional[str] = None,
    redis: bool = False,
) -> ServerProcess:
    """
    A configured, not yet started ``ServerProcess`` with cleanups registered.

    ``backend`` is ``"sqlite"`` or ``"postgresql"`` (default: the test's
    ``backend`` attribute, else SQLite). For PostgreSQL a fresh database is
    created unless ``database_url`` names one (to share it between nodes).
    ``redis=True`` adds ``--redis`` with the test Redis.
    """
    backend = backend or getattr(testcase, "backend", "sqlite")
    if backend not in ("sqlite", "postgresql"):
        raise ValueError("backend must be 'sqlite' or 'postgresql', not {!r}".format(backend))
    extra: List[str] = []
    if redis:
        require_redis(testcase)
        extra += ["--redis", redis_url()]
        if not any(str(a).startswith("--redis-prefix") for a in args):
            extra += ["--redis-prefix", _redis_prefix(testcase)]
    if backend == "postgresql":
        if database_url is None:
            database_url = create_database(testcase).url
        else:
            require_postgres(testcase)
    elif database_url is not None:
        raise ValueError("database_url given with backend='sqlite'")
    server = ServerProcess(database_url=database_url, args=extra + list(args), env=env)
    testcase.addCleanup(server.cleanup)
    return server


def _redis_prefix(testcase: TestCase) -> str:
    """One Redis key prefix per test, shared by its nodes; its keys are deleted afterwards."""
    prefix = getattr(testcase, "_pb_redis_prefix", None)
    if prefix is None:
        prefix = "pbtest:{}:".format(os.urandom(6).hex())
        testcase._pb_redis_prefix = prefix  # type: ignore[attr-defined]
        testcase.addCleanup(_delete_redis_keys, prefix)
    return prefix


def _delete_redis_keys(prefix: str) -> None:
    """Best effort: drop a test's keys (most expire on their own anyway)."""
    cli = shutil.which("redis-cli")
    if cli is None:
        return
    url = redis_url()
    try:
        keys = subprocess.run([cli, "-u", url, "--scan", "--pattern", prefix + "*"], capture_output=True,
                              text=True, timeout=10).stdout.split()
        if keys:
            subprocess.run([cli, "-u", url, "DEL", *keys], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        pass


async def drop_connection(get_conn: Callable[[], Any]) -> None:
    """
    Test cleanup: abort the connection ``get_conn()`` returns (a RawConnection,
    or None) if it is still open, and wait up to 5 s until it is gone.
    """
    conn = get_conn()
    if conn is None or conn.close_info is not None:
        return
    d = conn.closed
    conn.abort()
    d.addTimeout(5, reactor)
    try:
        await d
    except Exception:
        pass


async def start_server(
    testcase: TestCase,
    backend: Optional[str] = None,
    args: Iterable[str] = (),
    env: Optional[Mapping[str, str]] = None,
    *,
    database_url: Optional[str] = None,
    redis: bool = False,
) -> ServerProcess:
    """``make_server`` and ``start()``: a healthy server, cleaned up after the test."""
    server = make_server(testcase, backend, args, env, database_url=database_url, redis=redis)
    await server.start()
    return server


# --------------------------------------------------------------------------
# Backend mixins


class SQLiteMixin:
    """Mixed into a ``TestCase``: ``start_server(self)`` uses SQLite."""

    backend = "sqlite"


class PostgresMixin:
    """Mixed into a ``TestCase``: ``start_server(self)`` uses a fresh PostgreSQL database."""

    backend = "postgresql"

    def setUp(self) -> object:
        assert isinstance(self, unittest.TestCase)
        require_postgres(self)
        return super().setUp()  # type: ignore[misc]
