"""
The abuse suite's harness: a real ``twistd`` with honest traffic running
alongside an attack, and measurements of what a user would notice.

    server = await start_abuse_server(self, args=[...], nofile=1024)
    async with HonestTraffic(server) as honest:
        result = await run_attack(server, "ping-flood", "--version", "1", "--seconds", "5")
    honest.assert_unharmed(self, rss_growth_mb=64, max_fds=honest.fds_start + 32)

``HonestTraffic`` runs one user with a v2 sender (``rate`` events/s), a v2
receiver and a v1 receiver in this process. It records each event's ack
latency and its delivery latency at each receiver, every event id each
receiver got off the wire (to find losses and duplicates), polls
``/health`` every ``health_interval`` s recording its response time, and
samples the server's RSS and open file descriptors from ``/proc``. Leaving
the ``async with`` stops sending and waits up to ``cooldown`` s for every
ack and delivery; ``report()`` then sums it up.

Attacks run in a separate process (``python tests/test_abuse_wire.py
<attack> ...``, see ``run_attack``) so that an attacker spinning on its
socket never delays the honest clients' reactor: latencies measured here
are the server's. ``honest.probe_connect()`` measures how long a new
device takes to connect; ``assert_unharmed`` checks those too.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from pocketbridge.client import Client, Identity
from pocketbridge.client._util import uuid7
from tests.harness import ServerProcess, create_database

STREAM = "clipboard:main"
TYPE = "clipboard:text"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIB = 1024 * 1024


def sleep(seconds: float) -> "Deferred[None]":
    """A Deferred that fires after ``seconds`` of real time."""
    return deferLater(reactor, seconds, lambda: None)


# ---------------------------------------------------------------- the server


class LimitedServer(ServerProcess):
    """A ``ServerProcess`` whose twistd starts with RLIMIT_NOFILE set to ``nofile`` (soft and hard)."""

    nofile: Optional[int] = None

    def argv(self) -> List[str]:
        argv = super().argv()
        if self.nofile:
            # argv = [python, "-c", code, ...]: lower both limits before twistd runs.
            argv[2] = "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({0}, {0})); {1}".format(
                self.nofile, argv[2])
        return argv


async def start_abuse_server(testcase: TestCase, args: Iterable[str] = (), *, nofile: Optional[int] = None) -> LimitedServer:
    """A healthy server on the test's backend (SQLite or PostgreSQL), stopped and removed after the test."""
    backend = getattr(testcase, "backend", "sqlite")
    url = create_database(testcase).url if backend == "postgresql" else None
    server = LimitedServer(database_url=url, args=list(args))
    server.nofile = nofile
    testcase.addCleanup(server.cleanup)
    await server.start()
    return server


def rss_mb(pid: int) -> float:
    """The process's resident set size in MiB (0 once it is gone)."""
    try:
        with open("/proc/{}/status".format(pid)) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def open_fds(pid: int) -> int:
    """How many file descriptors the process holds (0 once it is gone)."""
    try:
        return len(os.listdir("/proc/{}/fd".format(pid)))
    except OSError:
        return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used, in seconds."""
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


async def run_attack(server: ServerProcess, attack: str, *args: str, timeout: float = 60.0) -> Dict[str, Any]:
    """
    Run ``tests/test_abuse_wire.py <attack> <host> <port> args...`` in its own
    process; its JSON report (the last stdout line). Fails on a crash.
    """
    argv = [os.path.join(HERE, "test_abuse_wire.py"), attack, "127.0.0.1", str(server.port)] + list(args)
    env = {k: v for k, v in os.environ.items()}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    d = getProcessOutputAndValue(sys.executable, argv, env=env, path=ROOT)
    d.addTimeout(timeout, reactor)
    out, err, code = await d
    lines = out.decode("utf-8", "replace").strip().splitlines()
    if code != 0 or not lines:
        raise AssertionError("attack {} failed (exit {}):\n{}\n{}".format(
            attack, code, out.decode("utf-8", "replace")[-2000:], err.decode("utf-8", "replace")[-4000:]))
    return dict(json.loads(lines[-1]))


# ---------------------------------------------------------------- honest traffic


class HonestTraffic:
    """
    One honest user alongside an attack: a v2 sender at ``rate`` events/s
    with ``payload_bytes`` of payload each, a v2 and a v1 receiver, /health
    polls and RSS/fd samples of ``server``. See the module docstring.
    """

    def __init__(self, server: ServerProcess, rate: float = 20.0, payload_bytes: int = 48,
                 health_interval: float = 0.25, sample_interval: float = 0.25, cooldown: float = 10.0) -> None:
        self.server = server
        self.rate = rate
        self.payload_bytes = payload_bytes
        self.health_interval = health_interval
        self.sample_interval = sample_interval
        self.cooldown = cooldown
        self.identity = Identity.generate()
        self.sent: Dict[str, float] = {}  # event_id -> send time
        self.acked: Dict[str, float] = {}  # event_id -> ack latency (s)
        self.send_errors: List[str] = []
        self.received: Dict[str, List[str]] = {"v2": [], "v1": []}  # event ids off the wire, repeats included
        self.delivery: Dict[str, Dict[str, float]] = {"v2": {}, "v1": {}}  # first arrival latency
        self.health: List[float] = []  # response times; inf for a failure
        self.health_errors: List[str] = []
        self.probes: List[float] = []  # seconds a new device took to connect
        self.probe_errors: List[str] = []
        self.rss: List[float] = []
        self.fds: List[int] = []
        self.clients: Dict[str, Client] = {}
        self.closes: Dict[str, Any] = {}
        self._loops: List[LoopingCall] = []
        self.marks: Dict[str, Any] = {}
        self._health_pending = 0
        self._stopping = False
        self.rss_start = 0.0
        self.fds_start = 0

    # ---- set-up and tear-down

    def _client(self, name: str, version: int) -> Client:
        client = Client(reactor, self.server.ws_url, self.identity, protocol_version=version, handshake_timeout=10,
                        keep_history=False, device_name="honest-" + name)
        self.clients[name] = client
        return client

    async def __aenter__(self) -> "HonestTraffic":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.finish()

    def mark(self, name: str) -> None:
        """Remember the current sample position under ``name`` (e.g. "attack", "after")."""
        self.marks[name] = (len(self.rss), time.monotonic())

    async def start(self) -> None:
        """Connect the three devices, take the baseline samples and start the loops."""
        self.sender = self._client("sender", 2)
        for name, version in (("v2", 2), ("v1", 1)):
            receiver = self._client(name, version)
            await receiver.connect()
            self._record_wire(name, receiver)
        await self.sender.connect()
        await self.clients["v2"].wait_caught_up(10)
        for name, client in self.clients.items():
            assert client.raw is not None
            client.raw.closed.addCallback(self._closed, name)
        pid = self.server.pid
        assert pid is not None
        self.rss_start, self.fds_start = rss_mb(pid), open_fds(pid)
        for interval, fn in ((1.0 / self.rate, self._send_one), (self.health_interval, self._poll_health),
                             (self.sample_interval, self._sample)):
            loop = LoopingCall(fn)
            loop.clock = reactor
            loop.start(interval, now=True)
            self._loops.append(loop)

    def _record_wire(self, name: str, client: Client) -> None:
        """Wrap the client's receiver so that every event off the wire is recorded, repeats included."""
        raw = client.raw
        assert raw is not None
        dispatch = raw._receiver
        assert dispatch is not None

        def receive(message: Any) -> None:
            if isinstance(message, dict):
                payload = message.get("payload")
                events: List[Any] = []
                if message.get("type") == "event":
                    events = [payload]
                elif message.get("type") == "replay_response" and isinstance(payload, dict):
                    events = payload.get("events") or []
                now = time.monotonic()
                for event in events:
                    event_id = event.get("event_id") if isinstance(event, dict) else None
                    if event_id in self.sent:
                        self.received[name].append(event_id)
                        self.delivery[name].setdefault(event_id, now - self.sent[event_id])
            dispatch(message)

        raw._receiver = receive

    def _closed(self, info: Any, name: str) -> Any:
        if not self._stopping:
            self.closes[name] = info
        return info

    def _send_one(self) -> None:
        payload = base64.b64encode(os.urandom(self.payload_bytes)).decode("ascii")
        event_id = uuid7(reactor)
        started = self.sent[event_id] = time.monotonic()
        d = self.sender.send_event_nowait(STREAM, TYPE, payload, event_id=event_id, timeout=30)
        d.addCallback(lambda _: self.acked.__setitem__(event_id, time.monotonic() - started))
        d.addErrback(lambda f: self.send_errors.append(f.getErrorMessage()))

    async def _poll_health(self) -> None:
        if self._health_pending >= 4:  # never more than 4 polls in flight
            self.health.append(float("inf"))
            self.health_errors.append("4 polls still pending")
            return
        self._health_pending += 1
        started = time.monotonic()
        try:
            code, _ = await self.server.http_get("/health", timeout=5.0)
            elapsed = time.monotonic() - started
            if code != 200:
                self.health_errors.append("HTTP {}".format(code))
            self.health.append(elapsed)
        except Exception as e:
            self.health.append(float("inf"))
            self.health_errors.append("{}: {}".format(type(e).__name__, e))
        finally:
            self._health_pending -= 1

    def _sample(self) -> None:
        pid = self.server.pid
        if pid is not None:
            self.rss.append(rss_mb(pid))
            self.fds.append(open_fds(pid))

    async def probe_connect(self, timeout: float = 5.0) -> float:
        """Connect a new v2 device of the user and close it: seconds to ``session_established`` (inf on failure)."""
        client = Client(reactor, self.server.ws_url, self.identity, protocol_version=2, handshake_timeout=timeout,
                        keep_history=False, device_name="honest-probe")
        started = time.monotonic()
        try:
            await client.connect()
            elapsed = time.monotonic() - started
            await client.close()
        except Exception as e:
            self.probe_errors.append("{}: {}".format(type(e).__name__, e))
            elapsed = float("inf")
            if client.raw is not None:
                client.raw.abort()
        self.probes.append(elapsed)
        return elapsed

    def stop_sending(self) -> None:
        """Stop the sender loop (receivers, polls and samples go on)."""
        if self._loops and self._loops[0].running:
            self._loops[0].stop()

    async def finish(self) -> None:
        """Stop sending, wait up to ``cooldown`` s for every ack and delivery, then stop everything."""
        self.stop_sending()
        deadline = time.monotonic() + self.cooldown
        while time.monotonic() < deadline and not self._settled():
            await sleep(0.1)
        await sleep(0.3)  # a late duplicate would show here
        self._stopping = True
        for loop in self._loops:
            if loop.running:
                loop.stop()
        closing = [c.close() for c in self.clients.values() if c.raw is not None and c.raw.close_info is None]
        if closing:
            await gatherResults(closing, consumeErrors=True).addErrback(lambda _: None)

    def _settled(self) -> bool:
        return len(self.acked) >= len(self.sent) > 0 and all(
            set(self.received[n]) >= set(self.acked) for n in self.received)

    # ---- results

    def report(self) -> Dict[str, Any]:
        """The figures of the run (latencies in ms, memory in MiB)."""
        acked = set(self.acked)
        out: Dict[str, Any] = {
            "sent": len(self.sent),
            "acked": len(acked),
            "send_errors": sorted(set(self.send_errors))[:3],
            "ack_max_ms": round(1000 * max(self.acked.values(), default=0.0)),
            "health_polls": len(self.health),
            "health_max_ms": _ms(max(self.health, default=0.0)),
            "health_errors": sorted(set(self.health_errors))[:3],
            "probe_max_ms": _ms(max(self.probes, default=0.0)),
            "probe_errors": sorted(set(self.probe_errors))[:3],
            "rss_start_mb": round(self.rss_start, 1),
            "rss_max_mb": round(max(self.rss, default=0.0), 1),
            "rss_growth_mb": round(max(self.rss, default=self.rss_start) - self.rss_start, 1),
            "fds_start": self.fds_start,
            "fds_max": max(self.fds, default=0),
            "closed": {k: list(v) for k, v in self.closes.items()},
        }
        for name, ids in self.received.items():
            got = set(ids)
            out[name] = {
                "received": len(got),
                "missing": len(acked - got),
                "duplicates": len(ids) - len(got),
                "delivery_max_ms": _ms(max(self.delivery[name].values(), default=0.0)),
            }
        return out

    def assert_unharmed(self, testcase: TestCase, *, rss_growth_mb: float, max_fds: int, max_latency: float = 1.0,
                        receivers: Sequence[str] = ("v2", "v1"), latency_receivers: Optional[Sequence[str]] = None) -> None:
        """
        Fail ``testcase`` unless: every event sent was acked and reached each of
        ``receivers`` exactly once, ack, delivery (at ``latency_receivers``,
        default all), /health and new connections (``probe_connect``) stayed
        under ``max_latency`` s, no honest socket
        was closed, RSS grew less than ``rss_growth_mb`` and fds stayed under ``max_fds``.
        """
        r = self.report()
        problems = []
        if r["send_errors"] or r["acked"] < r["sent"] or r["sent"] == 0:
            problems.append("{acked} of {sent} events acked ({send_errors})".format(**r))
        if r["closed"]:
            problems.append("honest sockets closed: {}".format(r["closed"]))
        if r["ack_max_ms"] > 1000 * max_latency:
            problems.append("ack latency up to {} ms".format(r["ack_max_ms"]))
        for name in receivers:
            if r[name]["missing"] or r[name]["duplicates"]:
                problems.append("{} receiver: {missing} missing, {duplicates} duplicated".format(name, **r[name]))
        for name in latency_receivers if latency_receivers is not None else receivers:
            if r[name]["delivery_max_ms"] > 1000 * max_latency:
                problems.append("{} delivery latency up to {} ms".format(name, r[name]["delivery_max_ms"]))
        if r["health_max_ms"] > 1000 * max_latency or r["health_errors"]:
            problems.append("/health up to {} ms ({})".format(r["health_max_ms"], r["health_errors"]))
        if r["probe_max_ms"] > 1000 * max_latency or r["probe_errors"]:
            problems.append("new connections took up to {} ms ({})".format(r["probe_max_ms"], r["probe_errors"]))
        if r["rss_growth_mb"] >= rss_growth_mb:
            problems.append("RSS grew {} MiB (bound {})".format(r["rss_growth_mb"], rss_growth_mb))
        if r["fds_max"] >= max_fds:
            problems.append("{} fds open (bound {})".format(r["fds_max"], max_fds))
        if problems:
            testcase.fail("honest traffic harmed: {}\nfigures: {}".format("; ".join(problems), json.dumps(r)))


def _ms(seconds: float) -> float:
    """Milliseconds, rounded; a failed poll stays infinite (printed as Infinity)."""
    return seconds * 1000 if seconds == float("inf") else round(1000 * seconds)
