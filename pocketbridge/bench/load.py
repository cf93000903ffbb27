"""
Load-generation pieces built on the client SDK (``pocketbridge.client``).

- ``stamped_payload`` / ``sent_at``: an ``encrypted_payload`` (valid base64)
  that carries the send time, so a receiver in any process of this machine
  can compute send → receive latency (``time.monotonic_ns`` is system-wide on
  Linux).
- ``connect_all``: handshake many clients with bounded concurrency.
- ``WindowSender``: a closed loop keeping ``window`` events in flight per
  client (throughput). ``RateSender``: an open loop at a fixed total rate
  (latency at a given load).
- ``Sink``: counts received events and their latency while recording.

Reactor thread only; the reactor is always passed in.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit, urlunsplit

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import LoopingCall

from pocketbridge.bench.throttle import Throttle, of_exception
from pocketbridge.client import Client, Identity

STREAM = "bench:main"
TYPE = "bench:event"
_HEADER = 9  # bytes: 8 of monotonic ns + 1 spare, a multiple of 3 so its base64 stands alone
_HEADER_CHARS = _HEADER // 3 * 4


def ws_url(url: str) -> str:
    """The WebSocket endpoint for a server URL: ``http://h:p`` → ``ws://h:p/ws`` (ws/wss kept)."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError("not an http(s):// or ws(s):// URL: {!r}".format(url))
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def http_url(url: str) -> str:
    """The HTTP base of a server URL (``ws://h:p/ws`` → ``http://h:p``)."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "", "", ""))


class PayloadMaker:
    """Builds stamped payloads of ``size`` bytes before base64 (at least the 9-byte stamp)."""

    def __init__(self, size: int) -> None:
        filler = bytes(range(256)) * (max(0, size - _HEADER) // 256 + 1)
        filler = filler[: max(0, size - _HEADER) // 3 * 3]
        self._tail = base64.b64encode(filler).decode("ascii")

    def __call__(self) -> str:
        """A payload stamped with ``time.monotonic_ns()`` now."""
        head = time.monotonic_ns().to_bytes(8, "big") + b"\0"
        return base64.b64encode(head).decode("ascii") + self._tail

    @property
    def chars(self) -> int:
        """Length of each payload in characters."""
        return _HEADER_CHARS + len(self._tail)


def sent_at(payload: str) -> Optional[int]:
    """The ``monotonic_ns`` stamp of a payload from ``PayloadMaker``, or None."""
    try:
        return int.from_bytes(base64.b64decode(payload[:_HEADER_CHARS])[:8], "big")
    except (ValueError, TypeError):
        return None


class Sink:
    """Counts events (and their send → receive latency) while ``recording``."""

    def __init__(self) -> None:
        self.recording = False
        self.received = 0  # every event, recording or not
        self.count = 0
        self.latencies: List[float] = []

    def on_event(self, event: Dict[str, Any]) -> None:
        """``Client(on_event=...)`` callback."""
        self.received += 1
        if not self.recording:
            return
        stamp = sent_at(event.get("encrypted_payload") or "")
        self.count += 1
        if stamp is not None:
            self.latencies.append((time.monotonic_ns() - stamp) / 1e9)


def new_client(reactor: Any, url: str, identity: Identity, sink: Optional[Sink] = None,
               device_id: Optional[str] = None, protocol_version: int = 1) -> Client:
    """A client (v1 unless told) that keeps no history (events go to ``sink``) and acks what it receives."""
    return Client(
        reactor, url, identity, device_id=device_id or str(uuid.uuid4()), device_name="bench", device_type="cli",
        auto_ack=True, keep_history=False, on_event=sink.on_event if sink is not None else None,
        protocol_version=protocol_version,
    )


async def connect_all(clients: Sequence[Client], concurrency: int, throttled: Optional[List[Throttle]] = None,
                      ) -> Tuple[List[Client], List[str], List[float]]:
    """
    Connect every client, ``concurrency`` handshakes at a time.

    Returns (connected clients, one error string per failure, the duration
    of each successful connect in seconds). With a ``throttled`` list, the
    first refusal that is a server limit (``throttle.of_exception``) is
    appended to it and no further client starts: a throttled figure would
    measure the limit.
    """
    pending = iter(list(clients))
    ok: List[Client] = []
    errors: List[str] = []
    durations: List[float] = []

    async def worker() -> None:
        for client in pending:
            if throttled:
                return
            t0 = time.monotonic()
            try:
                await client.connect()
            except Exception as e:  # counted and reported, never fatal to the run
                errors.append("{}: {}".format(type(e).__name__, e))
                limit = of_exception(e) if throttled is not None else None
                if limit is not None and throttled is not None and not throttled:
                    throttled.append(limit)
            else:
                durations.append(time.monotonic() - t0)
                ok.append(client)

    workers = [Deferred.fromCoroutine(worker()) for _ in range(max(1, min(concurrency, len(clients))))]
    if workers:
        await gatherResults(workers, consumeErrors=True)
    return ok, errors, durations


async def close_all(reactor: Any, clients: Sequence[Client], timeout: float = 10.0) -> None:
    """Close every client and wait (at most ``timeout`` s) until the server has answered the closes."""
    waits = []
    for client in clients:
        d = client.close()
        d.addTimeout(timeout, reactor)
        d.addErrback(lambda f: None)
        waits.append(d)
    if waits:
        await gatherResults(waits, consumeErrors=True)


class _Sender:
    """Shared bookkeeping of the two senders: acks, their latency, failures."""

    def __init__(self, make_payload: PayloadMaker) -> None:
        self.make_payload = make_payload
        self.recording = False
        self.sent = 0
        self.acked = 0  # while recording
        self.ack_latencies: List[float] = []
        self.failures = 0
        self.in_flight = 0
        self._idle: List["Deferred[None]"] = []

    def _send(self, client: Client) -> None:
        self.sent += 1
        self.in_flight += 1
        d = client.send_event_nowait(STREAM, TYPE, self.make_payload())
        d.addCallbacks(self._acked, self._failed, callbackArgs=(client, time.monotonic_ns()), errbackArgs=(client,))

    def _acked(self, ack: Dict[str, Any], client: Client, sent_ns: int) -> None:
        self.in_flight -= 1
        if self.recording:
            self.acked += 1
            self.ack_latencies.append((time.monotonic_ns() - sent_ns) / 1e9)
            if ack.get("dropped"):
                self.failures += 1
        self._after(client)

    def _failed(self, failure: Any, client: Client) -> None:
        self.in_flight -= 1
        self.failures += 1
        self._after(client, failed=True)

    def _after(self, client: Client, failed: bool = False) -> None:
        if self.in_flight == 0:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def drained(self) -> "Deferred[None]":
        """Fires once no event is waiting for its ack."""
        if self.in_flight == 0:
            return succeed(None)
        d: "Deferred[None]" = Deferred()
        self._idle.append(d)
        return d


class WindowSender(_Sender):
    """Keeps ``window`` unacked events in flight on each client until ``stop``."""

    def __init__(self, clients: Sequence[Client], window: int, make_payload: PayloadMaker,
                 limit: Optional[int] = None) -> None:
        super().__init__(make_payload)
        self.clients = list(clients)
        self.window = window
        self.limit = limit  # total events to send, None = until stopped
        self.running = False

    def start(self) -> None:
        """Fill every client's window."""
        self.running = True
        for client in self.clients:
            for _ in range(self.window):
                if self.limit is not None and self.sent >= self.limit:
                    return
                self._send(client)

    def stop(self) -> "Deferred[None]":
        """Stop sending; fires once every sent event is acked (or failed)."""
        self.running = False
        return self.drained()

    def _after(self, client: Client, failed: bool = False) -> None:
        if self.running and not failed and (self.limit is None or self.sent < self.limit):
            self._send(client)
        super()._after(client, failed)


class RateSender(_Sender):
    """Sends ``rate`` events/s in total, round-robin over the clients, from a ``tick`` timer."""

    def __init__(self, reactor: Any, clients: Sequence[Client], rate: float, make_payload: PayloadMaker,
                 tick: float = 0.002) -> None:
        super().__init__(make_payload)
        self.reactor = reactor
        self.clients = list(clients)
        self.rate = rate
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._tick_s = tick
        self._t0 = 0.0
        self._due_sent = 0
        self.late_ticks = 0  # ticks that had to send more than one tick's worth (the client fell behind)

    def start(self) -> None:
        """Start the timer."""
        self._t0 = self.reactor.seconds()
        self._loop.start(self._tick_s, now=True)

    def _tick(self) -> None:
        due = int((self.reactor.seconds() - self._t0) * self.rate) - self._due_sent
        if due > max(2, 3 * self.rate * self._tick_s):
            self.late_ticks += 1
        n = len(self.clients)
        for _ in range(max(0, due)):
            self._send(self.clients[self._due_sent % n])
            self._due_sent += 1

    def stop(self) -> "Deferred[None]":
        """Stop the timer; fires once every sent event is acked (or failed)."""
        if self._loop.running:
            self._loop.stop()
        return self.drained()


def identities(n: int) -> List[Identity]:
    """``n`` fresh user identities."""
    return [Identity.generate() for _ in range(n)]


def sleep(reactor: Any, seconds: float) -> "Deferred[None]":
    """A Deferred that fires after ``seconds``."""
    d: "Deferred[None]" = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
