"""
The delivery hub: routes committed events and notices to this node's sockets.

The bus (``LocalBus`` in one process, ``RedisBus`` in a cluster) is only a
wake-up; storage is the truth. Per user the hub remembers the highest seq it routed; a
notification above that + 1 makes it read the missing range from storage
first, so every socket sees the user's events contiguously in ``seq`` order
(ARCHITECTURE.md, the event path step 4).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Set

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from pocketbridge.server import metrics

from pocketbridge.protocol import wire
from pocketbridge.protocol.events import StoredEvent, relay_payload
from pocketbridge.server.fanout.bus import Bus, BusReceiver, Control
from pocketbridge.server.fanout.localbus import LocalBus
from pocketbridge.server.storage import Storage

log = Logger()


class LiveSink(Protocol):
    """What the hub needs from a session."""

    user_id: str
    device_id: str

    def deliver_live(self, event: StoredEvent, frame: bytes) -> None: ...

    def send_notice(self, frame: bytes) -> None: ...

    def close_for(self, code: int, reason: str, notice: Optional[bytes]) -> None: ...


class _UserRoute:
    __slots__ = ("sinks", "head", "chain", "busy")

    def __init__(self) -> None:
        self.sinks: Set[LiveSink] = set()
        self.head: Optional[int] = None
        self.chain: "Deferred[None]" = succeed(None)
        self.busy = 0  # storage reads queued on ``chain``


class DeliveryHub:
    """
    Per-node routing of events and notices to local sessions.

    The hub and its bus use each other: the hub subscribes through the bus,
    the bus delivers into the hub. So the hub is given how to make its bus
    (``LocalBus``, or a ``RedisBus`` bound to its connection) and makes it
    with itself as the receiver: neither is patched after construction.
    """

    def __init__(self, storage: Storage, bus: Callable[[BusReceiver], Bus] = LocalBus, read_page: int = 256) -> None:
        self.storage = storage
        self.read_page = read_page  # most seqs read from storage in one statement
        self.users: Dict[str, _UserRoute] = {}
        self.gap_failures = 0  # storage reads failed since the last one that worked
        self.bus: Bus = bus(self)

    # ----------------------------------------------------------- sessions

    def attach(self, sink: LiveSink) -> "Deferred[bool]":
        """
        Start routing the user's events to ``sink`` (subscribes the node on first use).

        Fires once the bus listens for the user (Redis confirmed the
        SUBSCRIBE, or the bus is down and will re-read storage when it is
        back): a head read done after that misses nothing (§7.3).
        """
        route = self.users.get(sink.user_id)
        if route is None:
            route = self.users[sink.user_id] = _UserRoute()
        route.sinks.add(sink)
        return self.bus.subscribe(sink.user_id)

    def detach(self, sink: LiveSink) -> None:
        """Stop routing to ``sink``."""
        route = self.users.get(sink.user_id)
        if route is None or sink not in route.sinks:
            return
        route.sinks.discard(sink)
        if not route.sinks:
            del self.users[sink.user_id]
            self.bus.unsubscribe(sink.user_id)

    def known_head(self, user_id: str, head: int) -> None:
        """A session read ``head`` from storage; start gap tracking there if unknown."""
        route = self.users.get(user_id)
        if route is not None and route.head is None:
            route.head = head

    def forget_user(self, user_id: str) -> None:
        """
        The account was deleted: drop the user's routing state at once (its
        sockets are closing), so a re-created account starts from seq 1 here.
        """
        route = self.users.pop(user_id, None)
        if route is not None:
            self.bus.unsubscribe(user_id)

    def sinks(self, user_id: str) -> List[LiveSink]:
        """This node's sessions of the user."""
        route = self.users.get(user_id)
        return list(route.sinks) if route else []

    # ----------------------------------------------------------- events

    def on_event(self, user_id: str, seq: int, event: Optional[StoredEvent], committed_at: float = 0.0) -> None:
        """A bus notification: event ``seq`` of the user was committed (event None: read it)."""
        route = self.users.get(user_id)
        if route is None:
            return
        if route.head is not None and seq <= route.head:
            return
        if route.head is not None and seq == route.head + 1 and event is not None and not route.busy:
            route.head = seq
            self._route(route, event, committed_at)
            return
        # A gap, an event to read, or a read already in progress: go through storage in order.
        route.busy += 1
        route.chain.addCallback(lambda _: self._fill(user_id, route, seq, event, committed_at))
        route.chain.addErrback(self._fill_failed, user_id)
        route.chain.addBoth(self._done, route)

    @staticmethod
    def _done(_: Any, route: _UserRoute) -> None:
        route.busy -= 1

    def _fill(self, user_id: str, route: _UserRoute, seq: int, event: Optional[StoredEvent], committed_at: float) -> Any:
        if route.head is not None and seq <= route.head:
            return None
        start = route.head if route.head is not None else seq - 1
        if event is not None and seq == start + 1:
            route.head = seq
            self._route(route, event, committed_at)
            return None
        metrics.BUS_GAP_READS.inc()
        return self._read_pages(user_id, route, start, seq, committed_at)

    def _read_pages(self, user_id: str, route: _UserRoute, after: int, upto: int, committed_at: float) -> "Deferred[None]":
        """Route after < seq ≤ upto from storage, ``read_page`` seqs per read, in order."""

        async def pages() -> None:
            low = after
            while low < upto and self.users.get(user_id) is route:
                high = min(upto, low + self.read_page)
                rows = await self.storage.read_range(user_id, low, high)
                for row in rows:
                    if route.head is None or row.seq > route.head:
                        route.head = row.seq
                        self._route(route, row, committed_at)
                low = high
            self._read_ok()

        return Deferred.fromCoroutine(pages())

    def resync_user(self, user_id: str) -> None:
        """Route from storage whatever the user committed beyond what this node has routed."""
        route = self.users.get(user_id)
        if route is None:
            return

        async def catch_up() -> None:
            head = await self.storage.head(user_id)
            if route.head is None or head <= route.head:
                return
            await self._read_pages(user_id, route, route.head, head, 0.0)

        route.busy += 1
        route.chain.addCallback(lambda _: Deferred.fromCoroutine(catch_up()))
        route.chain.addErrback(self._fill_failed, user_id)
        route.chain.addBoth(self._done, route)

    def resync_all(self) -> None:
        """Catch every local user up from storage (after a bus outage)."""
        for user_id in list(self.users):
            self.resync_user(user_id)

    def _fill_failed(self, failure: Any, user_id: str) -> None:
        # Sessions re-read from storage on reconnect; keep the chain alive. One
        # line per run of failures (an outage), not one per failed read.
        self.gap_failures += 1
        if self.gap_failures == 1:
            log.warn("gap read failed: {error} (further failures are counted until a read succeeds)",
                     error=failure.getErrorMessage())

    def _read_ok(self) -> None:
        if self.gap_failures:
            log.info("gap reads work again after {n} failed", n=self.gap_failures)
            self.gap_failures = 0

    def _route(self, route: _UserRoute, event: StoredEvent, committed_at: float) -> None:
        frame = wire.encode("event", relay_payload(event))
        for sink in list(route.sinks):
            sink.deliver_live(event, frame)
        if committed_at:
            metrics.DELIVERY_SECONDS.observe(max(0.0, time.monotonic() - committed_at))

    # ----------------------------------------------------------- notices

    def notify_user(self, user_id: str, msg_type: str, payload: Dict[str, Any], exclude_device: Optional[str] = None) -> None:
        """Send a notice to this node's sockets of the user, except one device's."""
        frame = wire.encode(msg_type, payload)
        for sink in self.sinks(user_id):
            if sink.device_id != exclude_device:
                sink.send_notice(frame)

    def close_device(self, user_id: str, device_id: Optional[str], code: int, reason: str, notice: Optional[bytes]) -> int:
        """Close this node's sockets of one device (or of every device when None)."""
        n = 0
        for sink in self.sinks(user_id):
            if device_id is None or sink.device_id == device_id:
                sink.close_for(code, reason, notice)
                n += 1
        return n

    # ----------------------------------------------------------- control

    def on_control(self, message: Control) -> None:
        """
        Apply a control message on this node (the bus delivers every node's,
        this one's included): revoke a device, close a deleted account,
        relay a notice, or re-read every user after a bus outage.
        """
        kind = message.get("kind")
        if kind == "resync":
            self.resync_all()
            return
        user = message.get("user_id")
        if not isinstance(user, str):
            return
        if kind == "revoke":
            device = message.get("device_id")
            notice = wire.encode("device_revoked", {
                "type": "device_revoked", "device_id": device, "reason": message.get("reason", "revoked"),
                "timestamp": message.get("timestamp"),
            })
            self.close_device(user, device, 4003, "Device revoked", notice)
        elif kind == "delete_user":
            self.close_device(user, None, 4003, "Account deleted", None)
            self.forget_user(user)
        elif kind == "notice":
            self.notify_user(user, message["type"], message["payload"], exclude_device=message.get("exclude_device"))
