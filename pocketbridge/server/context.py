"""
The per-node context every session and REST route shares: settings, storage,
writer, hub, limits, presence and the delivery-cursor book. Built once in
``tap.py`` from objects already wired (the hub holds its bus); it holds
handles, it builds nothing that needs another handle later.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from nacl.signing import SigningKey

from pocketbridge.server import metrics

from pocketbridge.server.config import Settings, trusted_proxy_set
from pocketbridge.server.fanout.bus import Control
from pocketbridge.server.fanout.hub import DeliveryHub
from pocketbridge.server.cluster.limits import Limits, LocalLimits
from pocketbridge.server.cluster.presence import LocalPresence, Presence
from pocketbridge.server.buckets import BucketMap
from pocketbridge.server.storage import Storage
from pocketbridge.server.writer import EventWriter

if TYPE_CHECKING:
    from pocketbridge.server.gateway.adapter import GatewayProtocol

log = Logger()


class CursorBook:
    """
    Batches the writes a connection's life leaves behind: ``delivered_seq``
    (as GREATEST(stored, new) in SQL) and ``last_seen`` of devices whose last
    socket closed. Written every ``interval`` seconds, at shutdown, and
    ``close_delay`` after a socket ends, in one transaction for every socket
    that ended meanwhile: a close costs no transaction of its own, yet a
    clean disconnect's cursor is durable within ``close_delay`` (PROTOCOL.md
    §7.2). A crash loses at most one interval of cursor moves of open
    sockets (docs/operations.md, "What a crash can make stale"); events are
    never at stake.
    """

    #: Seconds from a socket's end to the batched write of its cursor and last_seen.
    close_delay = 0.2

    def __init__(self, storage: Storage, clock: IReactorTime, interval: float, now_ms: Callable[[], int]) -> None:
        self.storage = storage
        self.clock = clock
        self.now_ms = now_ms
        self.dirty: Dict[Tuple[str, str], int] = {}
        #: last_seen to write: when the device's last socket closed (ms).
        self.seen: Dict[Tuple[str, str], int] = {}
        #: Cursor batches handed to storage and not yet committed (a reconnect reads through them).
        self.writing: List[Dict[Tuple[str, str], int]] = []
        self.soon: Optional[IDelayedCall] = None  # the write after a socket ended
        self.waiters: List["Deferred[None]"] = []  # fire once the next write is done
        self.loop = LoopingCall(self.flush)
        self.loop.clock = clock
        self.interval = interval

    def start(self) -> None:
        """Begin periodic flushing."""
        self.loop.start(self.interval, now=False).addErrback(lambda f: log.failure("cursor loop", f))

    def stop(self) -> "Deferred[None]":
        """Stop the loop and write what is pending."""
        if self.loop.running:
            self.loop.stop()
        return self.flush()

    def closed(self) -> None:
        """A socket ended: write within ``close_delay``, with every socket that ends meanwhile."""
        if self.soon is None or not self.soon.active():
            self.soon = self.clock.callLater(self.close_delay, self.flush)

    def update(self, user_id: str, device_id: str, seq: int) -> None:
        """Remember that the device has everything up to ``seq``."""
        key = (user_id, device_id)
        if seq > self.dirty.get(key, -1):
            self.dirty[key] = seq

    def went_offline(self, user_id: str, device_id: str, at_ms: int) -> "Deferred[None]":
        """
        The device's last socket closed at ``at_ms``: its ``last_seen`` goes
        into the write after the close. Fires once that write is done (or
        failed: it is then retried), so the offline notice can follow it.
        """
        key = (user_id, device_id)
        if at_ms > self.seen.get(key, -1):
            self.seen[key] = at_ms
        self.closed()
        done: "Deferred[None]" = Deferred()
        self.waiters.append(done)
        return done

    def pending(self, user_id: str, device_id: str) -> int:
        """
        The highest cursor of the device this node holds but storage may not
        have yet (0: none), so a socket that reconnects to this node within
        the flush interval starts where the last one ended.
        """
        key = (user_id, device_id)
        seq = self.dirty.get(key, 0)
        for batch in self.writing:
            seq = max(seq, batch.get(key, 0))
        return seq

    def flush(self) -> "Deferred[None]":
        """Write the pending cursors and last_seen times now, in one storage transaction."""
        if self.soon is not None and self.soon.active():
            self.soon.cancel()
        self.soon = None
        waiters, self.waiters = self.waiters, []
        if not self.dirty and not self.seen:
            for w in waiters:
                w.callback(None)
            return succeed(None)
        batch, self.dirty = self.dirty, {}
        seen, self.seen = self.seen, {}
        self.writing.append(batch)
        metrics.CURSOR_WRITES.inc(len(batch))
        d = self.storage.update_cursors(batch, self.now_ms(), seen)

        def written(result: None) -> None:
            self.writing.remove(batch)

        def failed(f: Any) -> None:
            self.writing.remove(batch)
            log.warn("cursor write failed, will retry: {error}", error=f.getErrorMessage())
            for key, seq in batch.items():
                if seq > self.dirty.get(key, -1):
                    self.dirty[key] = seq
            for key, at in seen.items():
                if at > self.seen.get(key, -1):
                    self.seen[key] = at

        def release(result: None) -> None:
            for w in waiters:
                w.callback(None)

        d.addCallbacks(written, failed)
        d.addCallback(release)
        return d


class Node:
    """
    Everything a gateway connection or a REST route needs from its node.

    ``presence`` and ``limits`` default to the in-process kinds (embedded
    shape); ``tap.py`` passes the Redis-backed ones in a cluster.
    """

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        writer: EventWriter,
        hub: DeliveryHub,
        clock: IReactorTime,
        server_key: SigningKey,
        node_id: str,
        rng: Optional[random.Random] = None,
        presence: Optional[Presence] = None,
        limits: Optional[Limits] = None,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.writer = writer
        self.hub = hub
        self.clock = clock
        self.server_key = server_key
        self.node_id = node_id
        self.rng: random.Random = rng or random.SystemRandom()
        self.cursors = CursorBook(storage, clock, settings.cursor_flush_interval, self.now_ms)
        self.presence: Presence = presence if presence is not None else LocalPresence()
        now = clock.seconds
        s = settings
        self.device_events: BucketMap[Tuple[str, str]] = BucketMap(s.events_per_device_rate, s.events_per_device_burst, now)
        self.user_events: BucketMap[str] = BucketMap(s.events_per_user_rate, s.events_per_user_burst, now)
        self.user_bytes: BucketMap[str] = BucketMap(s.bytes_per_user_rate, s.bytes_per_user_burst, now)
        # Limits every node shares (Redis in a cluster): connections and handshake
        # failures per IP, the REST budget, pairing failures, the replay cache.
        self.limits: Limits = limits if limits is not None else LocalLimits(now)
        self.trusted_proxies = trusted_proxy_set(settings)
        self.connections: Set["GatewayProtocol"] = set()  # open sockets, authenticated or not
        self.draining = False
        self.started_at = clock.seconds()

    def now_ms(self) -> int:
        """Wall-clock milliseconds from the injected clock."""
        return int(self.clock.seconds() * 1000)

    def sweep(self) -> None:
        """Drop idle rate-limit state (called periodically)."""
        self.device_events.sweep()
        self.user_events.sweep()
        self.user_bytes.sweep()
        self.limits.sweep()

    def announce_presence(
        self, user_id: str, device_id: str, name: Optional[str], dtype: str, online: bool, now: int
    ) -> None:
        """Tell the user's other devices that a device came online or went offline (§10)."""
        self.notify(user_id, "device_status_changed", {
            "type": "device_status_changed", "user_id": user_id, "device_id": device_id,
            "device_name": name, "device_type": dtype, "is_online": online, "timestamp": now,
        }, exclude_device=device_id)

    def broadcast(self, message: Control) -> None:
        """
        Send a control message to every node, this one included (the hub
        applies it, see ``DeliveryHub.on_control``). In the embedded shape the
        bus is in-process; the Redis bus carries it on its control channel.
        """
        self.hub.bus.publish_control(message)

    def notify(self, user_id: str, msg_type: str, payload: Dict[str, Any], exclude_device: Optional[str] = None) -> None:
        """A notice to every socket of the user on every node."""
        self.broadcast({"kind": "notice", "user_id": user_id, "type": msg_type, "payload": payload,
                        "exclude_device": exclude_device})
