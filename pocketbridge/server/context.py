"""
The per-node context every session and REST route shares: settings, storage,
writer, hub, limits, presence and the delivery-cursor book. Built once in
``tap.py`` from objects already wired (the hub holds its bus); it holds
handles, it builds nothing that needs another handle later.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Set, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
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
    Batches ``delivered_seq`` writes: at most every ``interval`` seconds, on
    disconnect and at shutdown, always as GREATEST(stored, new) in SQL.
    """

    def __init__(self, storage: Storage, clock: IReactorTime, interval: float, now_ms: Callable[[], int]) -> None:
        self.storage = storage
        self.clock = clock
        self.now_ms = now_ms
        self.dirty: Dict[Tuple[str, str], int] = {}
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

    def update(self, user_id: str, device_id: str, seq: int) -> None:
        """Remember that the device has everything up to ``seq``."""
        key = (user_id, device_id)
        if seq > self.dirty.get(key, -1):
            self.dirty[key] = seq

    def flush(self) -> "Deferred[None]":
        """Write the pending cursors now."""
        if not self.dirty:
            return succeed(None)
        batch, self.dirty = self.dirty, {}
        metrics.CURSOR_WRITES.inc(len(batch))
        d = self.storage.update_cursors(batch, self.now_ms())

        def failed(f: Any) -> None:
            log.warn("cursor write failed, will retry: {error}", error=f.getErrorMessage())
            for key, seq in batch.items():
                if seq > self.dirty.get(key, -1):
                    self.dirty[key] = seq

        d.addErrback(failed)
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
