"""
The Redis bus of the cluster shape (ARCHITECTURE.md "Cluster concerns").

One subscriber connection and one publisher connection per node. A node
subscribes to ``<prefix>u:<user_id>`` while it holds a socket of that user and
always to ``<prefix>control``. Redis is a doorbell: a notification carries the
event when its payload is ≤ 64 KiB, otherwise only its seq, and storage stays
the truth. After the subscriber reconnects, the node resubscribes and catches
every local user up from storage (messages may have been missed meanwhile).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Deque, Dict, Optional, Set, Tuple
from urllib.parse import urlparse

import orjson
import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from . import metrics
from .events import StoredEvent

log = Logger()
INLINE_PAYLOAD_MAX = 64 * 1024
PENDING_MAX = 10000


def parse_redis_url(url: str) -> Tuple[str, int, Optional[int], Optional[str]]:
    """(host, port, db, password) of a ``redis://`` URL."""
    u = urlparse(url)
    db = None
    if u.path and u.path.strip("/"):
        db = int(u.path.strip("/"))
    return u.hostname or "127.0.0.1", u.port or 6379, db, u.password


def encode_event(event: StoredEvent) -> bytes:
    """The bus notification for a committed event."""
    if len(event.encrypted_payload) > INLINE_PAYLOAD_MAX:
        return orjson.dumps({"s": event.seq})
    return orjson.dumps({"s": event.seq, "e": [
        event.event_id, event.device_id, event.device_seq, event.stream_id, event.stream_seq, event.type,
        event.encrypted_payload, event.ttl, event.created_at,
    ]})


def decode_event(user_id: str, data: bytes) -> Tuple[int, Optional[StoredEvent]]:
    """(seq, event or None) from a notification."""
    msg = orjson.loads(data)
    seq = int(msg["s"])
    e = msg.get("e")
    if e is None:
        return seq, None
    return seq, StoredEvent(user_id, seq, e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7], e[8])


class _Subscriber(txredisapi.SubscriberProtocol):
    bus: "RedisBus"

    def connectionMade(self) -> Any:
        self.transport.setTcpNoDelay(True)
        d = super().connectionMade()
        self.bus._subscriber_up(self)
        return d

    def connectionLost(self, why: Any) -> None:
        self.bus._subscriber_down(self)
        super().connectionLost(why)

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.bus._message(channel, message)


class _Publisher(txredisapi.RedisProtocol):
    bus: "RedisBus"

    def connectionMade(self) -> Any:
        self.transport.setTcpNoDelay(True)
        d = super().connectionMade()
        self.bus._publisher_up(self)
        return d

    def connectionLost(self, why: Any) -> None:
        self.bus._publisher_down(self)
        super().connectionLost(why)


class _ProtoFactory(Factory):
    def __init__(self, proto_class: Any, bus: "RedisBus", password: Optional[str], db: Optional[int]) -> None:
        self.proto_class = proto_class
        self.bus = bus
        self.password = password
        self.db = db

    def buildProtocol(self, addr: Any) -> Any:
        p = self.proto_class(charset=None, password=self.password, dbid=self.db, convertNumbers=False)
        p.factory = self
        p.bus = self.bus
        return p


class RedisBus(MultiService):
    """The bus between nodes; also a service that keeps its two connections up."""

    def __init__(self, reactor: Any, url: str, hub: Any, storage: Any, node_id: str, prefix: str = "pb:") -> None:
        super().__init__()
        self.node_id = node_id
        self.reactor = reactor
        self.hub = hub
        self.storage = storage
        self.prefix = prefix
        self.control_channel = prefix + "control"
        self.control: Any = None
        host, port, db, password = parse_redis_url(url)
        policy = backoffPolicy(initialDelay=0.2, maxDelay=5.0)
        self.sub_service = ClientService(
            TCP4ClientEndpoint(reactor, host, port, timeout=5), _ProtoFactory(_Subscriber, self, password, db),
            retryPolicy=policy, clock=reactor,
        )
        self.pub_service = ClientService(
            TCP4ClientEndpoint(reactor, host, port, timeout=5), _ProtoFactory(_Publisher, self, password, db),
            retryPolicy=policy, clock=reactor,
        )
        self.sub_service.setServiceParent(self)
        self.pub_service.setServiceParent(self)
        self.sub: Optional[_Subscriber] = None
        self.pub: Optional[_Publisher] = None
        self.users: Set[str] = set()
        self.pending: Deque[Tuple[str, bytes]] = deque()
        self.overflowed = False
        self.ever_connected = False
        hub.bus = self

    # ------------------------------------------------------------ health

    def healthy(self) -> bool:
        """True while both connections are up."""
        return self.sub is not None and self.pub is not None

    # ------------------------------------------------------------ subscribing

    def _channel(self, user_id: str) -> str:
        return self.prefix + "u:" + user_id

    def subscribe(self, user_id: str) -> None:
        """Listen for the user's events (the node holds a socket of the user)."""
        self.users.add(user_id)
        if self.sub is not None:
            self.sub.subscribe(self._channel(user_id)).addErrback(self._cmd_failed, "subscribe")

    def unsubscribe(self, user_id: str) -> None:
        """Stop listening for the user's events."""
        self.users.discard(user_id)
        if self.sub is not None:
            self.sub.unsubscribe(self._channel(user_id)).addErrback(self._cmd_failed, "unsubscribe")

    def _subscriber_up(self, proto: _Subscriber) -> None:
        def ready(_: Any) -> None:
            self.sub = proto
            channels = [self.control_channel] + [self._channel(u) for u in sorted(self.users)]
            proto.subscribe(channels).addErrback(self._cmd_failed, "subscribe")
            if self.ever_connected:
                metrics.BUS_RECONNECTS.labels(connection="subscriber").inc()
                log.info("bus subscriber reconnected; catching up {n} users from storage", n=len(self.users))
                # Anything published while we were away is read from storage.
                for user in list(self.users):
                    self.hub.resync_user(user)
            self.ever_connected = True

        proto.whenConnected().addCallback(ready).addErrback(self._cmd_failed, "connect")

    def _subscriber_down(self, proto: _Subscriber) -> None:
        if self.sub is proto:
            self.sub = None
            log.warn("bus subscriber connection lost")

    def _message(self, channel: Any, message: Any) -> None:
        ch = channel.decode("utf-8") if isinstance(channel, bytes) else channel
        data = message if isinstance(message, bytes) else str(message).encode("utf-8")
        try:
            if ch == self.control_channel:
                msg = orjson.loads(data)
                if self.control is not None and msg.get("origin") != self.node_id:
                    self.control(msg)
                return
            user_id = ch[len(self.prefix) + 2:]
            seq, event = decode_event(user_id, data)
        except Exception:
            log.failure("bad bus message on {channel}", channel=ch)
            return
        self.hub.on_event(user_id, seq, event, time.monotonic())

    # ------------------------------------------------------------ publishing

    def publish_event(self, event: StoredEvent) -> None:
        """
        Announce a committed event to every node. This node's sockets get it at
        once; the copy that comes back from Redis is dropped by the hub (seq
        already routed), so local delivery does not depend on Redis.
        """
        self.hub.on_event(event.user_id, event.seq, event, time.monotonic())
        self._publish(self._channel(event.user_id), encode_event(event))

    def publish_control(self, message: Dict[str, Any]) -> None:
        """A control message for every node: applied here at once, sent to the others."""
        if self.control is not None:
            self.control(message)
        self._publish(self.control_channel, orjson.dumps(dict(message, origin=self.node_id)))

    def _publish(self, channel: str, data: bytes) -> None:
        if self.pub is None:
            if len(self.pending) < PENDING_MAX:
                self.pending.append((channel, data))
            else:
                self.overflowed = True
            return
        self.pub.publish(channel, data).addErrback(self._publish_failed, channel, data)

    def _publish_failed(self, failure: Any, channel: str, data: bytes) -> None:
        log.warn("bus publish failed: {error}", error=failure.getErrorMessage())
        if len(self.pending) < PENDING_MAX:
            self.pending.append((channel, data))
        else:
            self.overflowed = True

    def _publisher_up(self, proto: _Publisher) -> None:
        def ready(_: Any) -> None:
            self.pub = proto
            if self.ever_connected:
                metrics.BUS_RECONNECTS.labels(connection="publisher").inc()
            pending, self.pending = self.pending, deque()
            for channel, data in pending:
                self._publish(channel, data)
            if self.overflowed:
                self.overflowed = False
                # Too much was held back: every node re-reads its users from storage.
                self.publish_control({"kind": "resync"})

        proto.whenConnected().addCallback(ready).addErrback(self._cmd_failed, "connect")

    def _publisher_down(self, proto: _Publisher) -> None:
        if self.pub is proto:
            self.pub = None
            log.warn("bus publisher connection lost")

    def _cmd_failed(self, failure: Any, what: str) -> None:
        log.warn("bus {what} failed: {error}", what=what, error=failure.getErrorMessage())
