"""
Fault injection for tests/test_faults.py (all loopback, all owned by the test):

- ``CommitCutter``: a TCP proxy in front of PostgreSQL that, once armed, lets
  the COMMIT of the next transaction that inserted events reach the database
  and then drops the connection before the reply: the transaction is
  committed, the server sees a failure (a connection reset mid-COMMIT).
- ``PrivatePostgres``: a PostgreSQL cluster of one test (``initdb`` in a temp
  directory, its own port) that the test stops and starts; the shared server
  at 5432 is never touched.
- ``TmpfsServer``: a server process whose data directory is a small tmpfs
  in its own mount namespace (``unshare -rm``), so a test can fill the disk
  (through ``/proc/<pid>/root``) and free it again.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import unittest
from typing import Any, List, Optional

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from tests.harness import ServerProcess, free_port


# --------------------------------------------------------------------- proxy


class _Upstream(Protocol):
    def __init__(self, downstream: "_Downstream") -> None:
        self.downstream = downstream

    def dataReceived(self, data: bytes) -> None:
        self.downstream.from_database(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.downstream.transport.loseConnection()


class _Downstream(Protocol):
    """One connection of the server under test, relayed to PostgreSQL."""

    factory: "CommitCutter"

    def connectionMade(self) -> None:
        self.upstream: Optional[_Upstream] = None
        self.buffer: List[bytes] = []
        self.inserted = False
        self.cut_on_reply = False
        self.transport.pauseProducing()
        d = connectProtocol(TCP4ClientEndpoint(reactor, self.factory.db_host, self.factory.db_port), _Upstream(self))
        d.addCallbacks(self._connected, lambda f: self.transport.loseConnection())

    def _connected(self, upstream: _Upstream) -> None:
        self.upstream = upstream
        for chunk in self.buffer:
            upstream.transport.write(chunk)
        self.buffer = []
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        cutter = self.factory
        if cutter.armed:
            if b"INSERT INTO events" in data:
                self.inserted = True
            elif self.inserted and b"COMMIT" in data:
                cutter.armed = False
                self.cut_on_reply = True
        if self.upstream is None:
            self.buffer.append(data)
        else:
            self.upstream.transport.write(data)

    def from_database(self, data: bytes) -> None:
        if self.cut_on_reply:
            # The database committed; its answer never reaches the server.
            self.factory.cuts += 1
            self.transport.abortConnection()
            if self.upstream is not None:
                self.upstream.transport.abortConnection()
            return
        self.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


class CommitCutter(Factory):
    """The proxy; ``arm()`` cuts the next COMMIT of a transaction that inserted events."""

    protocol = _Downstream

    def __init__(self, db_host: str, db_port: int) -> None:
        self.db_host = db_host
        self.db_port = db_port
        self.armed = False
        self.cuts = 0
        self.port: Any = None

    async def start(self) -> int:
        """Listen on a free loopback port; returns it."""
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self)
        return int(self.port.getHost().port)

    def arm(self) -> None:
        self.armed = True

    async def stop(self) -> None:
        if self.port is not None:
            await self.port.stopListening()


# --------------------------------------------------------------------- PostgreSQL


def _pg_bin(name: str) -> Optional[str]:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/" + name))
    return found[-1] if found else shutil.which(name)


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on a free port (run as the ``postgres`` user when we are root)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="pb-pg-")
        self.data = os.path.join(self.directory, "data")
        self.as_user: List[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.directory, "postgres")
        self.initialised = False

    @property
    def base_url(self) -> str:
        return "postgresql://postgres@127.0.0.1:{}/postgres".format(self.port)

    def _run(self, *argv: str) -> None:
        subprocess.run(self.as_user + list(argv), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=60)

    def start(self) -> None:
        """initdb (first time) and start; blocks until it accepts connections (``pg_ctl -w``)."""
        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise unittest.SkipTest("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        if not self.initialised:
            self._run(initdb, "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")
            self.initialised = True
        self._run(pg_ctl, "-D", self.data, "-w", "-t", "30", "-l", os.path.join(self.directory, "log"),
                  "-o", "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off".format(self.port, self.directory),
                  "start")

    def stop(self) -> None:
        """Fast shutdown (active connections are cut)."""
        pg_ctl = _pg_bin("pg_ctl")
        assert pg_ctl is not None
        self._run(pg_ctl, "-D", self.data, "-w", "-t", "30", "-m", "fast", "stop")

    def cleanup(self) -> None:
        pg_ctl = _pg_bin("pg_ctl")
        if pg_ctl is not None and os.path.exists(os.path.join(self.data, "postmaster.pid")):
            subprocess.run(self.as_user + [pg_ctl, "-D", self.data, "-m", "immediate", "stop"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(self.directory, ignore_errors=True)


# --------------------------------------------------------------------- a small disk


class TmpfsServer(ServerProcess):
    """
    A server whose ``--data-dir`` is a tmpfs of ``size`` in a private mount
    namespace. ``fill()`` takes every free byte (a file in the server's view
    of the directory), ``free()`` removes it.
    """

    def __init__(self, size: str = "16m", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = size
        os.makedirs(self.data_dir, exist_ok=True)

    def argv(self) -> List[str]:
        inner = super().argv()
        script = 'mount -t tmpfs -o size={} tmpfs "$0" && exec "$@"'.format(self.size)
        return ["unshare", "-rm", "sh", "-c", script, self.data_dir] + inner

    @property
    def filler(self) -> str:
        assert self.pid is not None
        return "/proc/{}/root{}".format(self.pid, os.path.join(self.data_dir, "filler"))

    def fill(self) -> int:
        """Write zeros until the tmpfs is full; the bytes written."""
        written = 0
        block = b"\0" * 65536
        with open(self.filler, "wb", buffering=0) as f:
            try:
                while True:
                    written += f.write(block)
            except OSError:
                pass
            try:
                while True:
                    written += f.write(b"\0" * 512)
            except OSError:
                pass
        return written

    def free(self) -> None:
        os.unlink(self.filler)


def tmpfs_available() -> bool:
    """Whether ``unshare -rm`` can mount a tmpfs here."""
    if shutil.which("unshare") is None:
        return False
    probe = tempfile.mkdtemp(prefix="pb-tmpfs-")
    try:
        r = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0"', probe],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
        return r.returncode == 0
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def sleep(seconds: float) -> Any:
    """A Deferred that fires after ``seconds`` of real time."""
    return deferLater(reactor, seconds, lambda: None)
