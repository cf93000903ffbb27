"""
Redis control for the cluster tests: a small blocking admin connection, the
Redis connections a node process owns, and a private ``redis-server`` a test
may kill and start again.

The machine's Redis is shared by every test (and maybe by parallel runs), so
a test never restarts it: it simulates a hiccup by killing one node's client
connections (``CLIENT KILL ID``), found by matching the node process's own
TCP sockets (``/proc/<pid>/fd`` and ``/proc/net/tcp``) with ``CLIENT LIST``.
A real outage uses ``PrivateRedis``: a ``redis-server`` on a free port that
belongs to the test alone.

Admin commands block the reactor for a moment on a local socket; that is
acceptable in tests (the harness does the same with psycopg2).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from typing import Any, Dict, List, Optional, Set
from urllib.parse import urlparse

from twisted.internet import reactor
from twisted.internet.task import deferLater

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisError(Exception):
    """Redis answered a command with an error reply."""


class RedisAdmin:
    """Blocking admin commands, one short connection per command."""

    def __init__(self, url: str) -> None:
        u = urlparse(url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 6379
        self.password = u.password
        self.db = int(u.path.strip("/")) if u.path and u.path.strip("/") else 0

    def command(self, *args: Any) -> Any:
        """Send one command; its decoded reply (bytes, int, list or None)."""
        with socket.create_connection((self.host, self.port), timeout=5) as s:
            reader = s.makefile("rb")
            if self.password:
                _send(s, "AUTH", self.password)
                _read(reader)
            if self.db:
                _send(s, "SELECT", self.db)
                _read(reader)
            _send(s, *args)
            return _read(reader)

    def ping(self) -> bool:
        """True when the server answers PING."""
        try:
            return self.command("PING") == b"PONG"
        except (OSError, RedisError):
            return False

    def client_list(self) -> List[Dict[str, str]]:
        """``CLIENT LIST`` as one dict per connection."""
        text = self.command("CLIENT", "LIST").decode("utf-8", "replace")
        clients = []
        for line in text.splitlines():
            fields = dict(part.split("=", 1) for part in line.split(" ") if "=" in part)
            if fields:
                clients.append(fields)
        return clients

    def kill_clients(self, ids: List[str]) -> int:
        """``CLIENT KILL ID`` each id; how many were killed."""
        killed = 0
        for client_id in ids:
            killed += int(self.command("CLIENT", "KILL", "ID", client_id))
        return killed

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key of the database that starts with ``prefix``; how many."""
        cursor, deleted = b"0", 0
        while True:
            cursor, keys = self.command("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
            if keys:
                deleted += int(self.command("DEL", *keys))
            if cursor == b"0":
                return deleted


def _send(s: socket.socket, *args: Any) -> None:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        data = a if isinstance(a, bytes) else str(a).encode("utf-8")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    s.sendall(b"".join(parts))


def _read(reader: Any) -> Any:
    line = reader.readline()
    if not line:
        raise OSError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RedisError(rest.decode("utf-8", "replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = reader.read(n + 2)
        return data[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read(reader) for _ in range(n)]
    raise RedisError("unexpected reply {!r}".format(line[:40]))


# --------------------------------------------------------------------------
# Which connections belong to a node


def _socket_inodes(pid: int) -> Set[str]:
    inodes = set()
    fd_dir = "/proc/{}/fd".format(pid)
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def local_ports(pid: int, remote_port: int) -> Set[int]:
    """The local TCP ports of process ``pid``'s connections to ``remote_port`` (Linux /proc)."""
    inodes = _socket_inodes(pid)
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            cols = row.split()
            local, remote, inode = cols[1], cols[2], cols[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def node_clients(admin: RedisAdmin, pid: int) -> List[Dict[str, str]]:
    """The ``CLIENT LIST`` entries of the connections that process ``pid`` holds to ``admin``'s Redis."""
    ports = local_ports(pid, admin.port)
    return [c for c in admin.client_list() if int(c.get("addr", ":0").rsplit(":", 1)[1]) in ports]


def is_pubsub(client: Dict[str, str]) -> bool:
    """True for a connection in subscriber mode (flag ``P``, or a subscription count)."""
    return "P" in client.get("flags", "") or int(client.get("sub", "0") or 0) > 0 \
        or int(client.get("psub", "0") or 0) > 0


def kill_node_connections(admin: RedisAdmin, pid: int, pubsub: Optional[bool] = None) -> int:
    """
    ``CLIENT KILL`` the connections of process ``pid``: only its pub/sub ones
    (``pubsub=True``), only the others (False) or all (None). How many died.
    """
    ids = [c["id"] for c in node_clients(admin, pid) if pubsub is None or is_pubsub(c) == pubsub]
    return admin.kill_clients(ids)


# --------------------------------------------------------------------------
# A private redis-server


def redis_server_available() -> bool:
    """Whether a ``redis-server`` binary is there to start."""
    return os.access(REDIS_SERVER, os.X_OK)


class PrivateRedis:
    """
    A ``redis-server`` of one test on a free port, without persistence.
    ``kill9`` and ``start`` again keep the port (the nodes reconnect to it).
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.directory = tempfile.mkdtemp(prefix="pb-redis-")
        self.process: Optional["subprocess.Popen[bytes]"] = None
        self.admin = RedisAdmin(self.url)

    @property
    def url(self) -> str:
        return "redis://127.0.0.1:{}/0".format(self.port)

    async def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        log = open(os.path.join(self.directory, "redis.log"), "ab")
        try:
            self.process = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self.directory],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            log.close()
        waited = 0.0
        while not self.admin.ping():
            if self.process.poll() is not None or waited > timeout:
                raise RuntimeError("redis-server on port {} did not start: {}".format(
                    self.port, self.log_text()[-2000:]))
            await deferLater(reactor, 0.02, lambda: None)
            waited += 0.02

    def kill9(self) -> None:
        """SIGKILL the server and wait for it to exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log_text(self) -> str:
        try:
            with open(os.path.join(self.directory, "redis.log"), "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        """Stop the server and remove its directory."""
        self.kill9()
        shutil.rmtree(self.directory, ignore_errors=True)
