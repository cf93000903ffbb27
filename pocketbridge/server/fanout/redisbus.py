"""
The Redis bus of the cluster shape (ARCHITECTURE.md "Cluster concerns").

The bus subscribes on a connection of its own and publishes on the node's
command connection (``RedisConnection``, shared with presence and the shared
limits). A node
subscribes to ``<prefix>u:<user_id>`` while it holds a socket of that user and
always to ``<prefix>control``. Redis is a doorbell: a notification carries the
event when its payload is ≤ 64 KiB, otherwise only its seq, and storage stays
the truth. After the subscriber reconnects, the node resubscribes and catches
every local user up from storage (messages may have been missed meanwhile).

Subscriptions are confirmed: ``subscribe`` fires once Redis answered the
SUBSCRIBE for that channel (or at once while the subscriber is down: the
catch-up after the reconnect covers that user), so a session's head read
done after it cannot miss an event published in between.

During an outage of the publisher connection the bus holds no payloads:
only "user X has news up to seq N" for at most ``held_users`` users, and the
control messages (small) up to ``CONTROL_HELD_BYTES``. When Redis is back
it sends one small seq-only notice per held user, at most ``resend_rate``
per second; the other nodes read the events from storage. Past either bound
every node re-reads all its users instead (a ``resync`` control message).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

import orjson
import txredisapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from pocketbridge.server import metrics
from pocketbridge.protocol.events import StoredEvent
from pocketbridge.server.fanout.bus import BusReceiver, Control
from pocketbridge.server.fanout.redisconn import Commands, RedisConnection

log = Logger()
INLINE_PAYLOAD_MAX = 64 * 1024
CONTROL_HELD_BYTES = 1024 * 1024  # control messages held during a publisher outage
RESEND_TICK = 0.05  # seconds between batches of held notices after a reconnect
_SUB_REPLIES = (b"subscribe", "subscribe")
_UNSUB_REPLIES = (b"unsubscribe", "unsubscribe")


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


class _Sent:
    """One SUBSCRIBE sent for a channel and not yet confirmed, with who waits for it."""

    __slots__ = ("waiters", "open")

    def __init__(self) -> None:
        self.waiters: List["Deferred[bool]"] = []
        self.open = True  # False once an UNSUBSCRIBE followed it: new waiters need a new SUBSCRIBE


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

    def replyReceived(self, reply: Any) -> None:
        # SUBSCRIBE is sent without a reply Deferred (one confirmation per
        # channel; txredisapi would hand a leftover one to the next command):
        # each confirmation is matched to its channel here.
        if isinstance(reply, list) and len(reply) == 3:
            if reply[0] in _SUB_REPLIES:
                self.bus._confirmed(self, reply[1])
                return
            if reply[0] in _UNSUB_REPLIES:
                return
        super().replyReceived(reply)

    def send_subscribe(self, channels: List[str]) -> None:
        """SUBSCRIBE without waiting: the confirmations arrive in ``replyReceived``."""
        self.transport.write(self._build_command("SUBSCRIBE", *channels))

    def send_unsubscribe(self, channels: List[str]) -> None:
        """UNSUBSCRIBE without waiting for its replies."""
        self.transport.write(self._build_command("UNSUBSCRIBE", *channels))


class _SubscriberFactory(Factory):
    def __init__(self, bus: "RedisBus", redis: RedisConnection) -> None:
        self.bus = bus
        self.redis = redis

    def buildProtocol(self, addr: Any) -> _Subscriber:
        p = _Subscriber(**self.redis.protocol_options())
        p.factory = self
        p.bus = self.bus
        return p


class RedisBus:
    """
    The ``Bus`` between nodes. It delivers into ``receiver`` (the hub, which
    makes its bus), subscribes on a connection it asks ``redis`` for, and
    publishes on ``redis``'s command connection.
    """

    def __init__(self, reactor: IReactorTime, redis: RedisConnection, receiver: BusReceiver, node_id: str,
                 prefix: str = "pb:", held_users: int = 10000, resend_rate: int = 2000) -> None:
        self.node_id = node_id
        self.reactor = reactor
        self.redis = redis
        self.hub = receiver
        self.prefix = prefix
        self.control_channel = prefix + "control"
        self.sub_service = redis.connect(_SubscriberFactory(self, redis))
        self.sub: Optional[_Subscriber] = None
        self.users: Set[str] = set()
        # Per channel, one list of waiters per SUBSCRIBE sent and not yet confirmed.
        self.inflight: Dict[str, Deque[_Sent]] = {}
        self.listening: Set[str] = set()  # channels Redis confirmed on the current connection
        # Held while the publisher is down: user -> highest seq with news; control messages.
        self.held_users = held_users
        self.resend_rate = resend_rate
        self.news: Dict[str, int] = {}
        self.held_control: Deque[bytes] = deque()
        self.held_control_bytes = 0
        self.overflowed = False
        self._resending: Optional[IDelayedCall] = None
        self.ever_connected = False  # the subscriber connected once (later connects are reconnects)
        redis.on_ready(self._publisher_up)

    # ------------------------------------------------------------ health

    def healthy(self) -> bool:
        """True while both connections are up."""
        return self.sub is not None and self.redis.healthy()

    # ------------------------------------------------------------ subscribing

    def _channel(self, user_id: str) -> str:
        return self.prefix + "u:" + user_id

    def subscribe(self, user_id: str) -> "Deferred[bool]":
        """
        Listen for the user's events (the node holds a socket of the user).

        Idempotent. Fires True once Redis confirmed the subscription, or False
        at once (or when the connection drops) while the subscriber is down:
        then the catch-up after the reconnect reads the user from storage.
        """
        self.users.add(user_id)
        channel = self._channel(user_id)
        if self.sub is None:
            return succeed(False)
        if channel in self.listening:
            return succeed(True)
        d: "Deferred[bool]" = Deferred()
        waiting = self.inflight.setdefault(channel, deque())
        if not waiting or not waiting[-1].open:
            waiting.append(_Sent())
            self.sub.send_subscribe([channel])
        waiting[-1].waiters.append(d)
        return d

    def unsubscribe(self, user_id: str) -> None:
        """Stop listening for the user's events."""
        self.users.discard(user_id)
        channel = self._channel(user_id)
        self.listening.discard(channel)
        for sent in self.inflight.get(channel, ()):
            sent.open = False
        if self.sub is not None:
            self.sub.send_unsubscribe([channel])

    def _confirmed(self, proto: _Subscriber, channel: Any) -> None:
        """Redis confirmed one SUBSCRIBE of ``channel``: wake its waiters."""
        if proto is not self.sub:
            return
        ch = channel.decode("utf-8") if isinstance(channel, bytes) else str(channel)
        waiting = self.inflight.get(ch)
        if not waiting:
            return
        sent = waiting.popleft()
        if not waiting:
            del self.inflight[ch]
            if ch == self.control_channel or ch[len(self.prefix) + 2:] in self.users:
                self.listening.add(ch)
        for d in sent.waiters:
            d.callback(True)

    def _drop_subscriptions(self) -> None:
        """The subscriber connection is gone: nothing is confirmed, waiters go on unconfirmed."""
        inflight, self.inflight = self.inflight, {}
        self.listening = set()
        for waiting in inflight.values():
            for sent in waiting:
                for d in sent.waiters:
                    d.callback(False)

    def _subscriber_up(self, proto: _Subscriber) -> None:
        def ready(_: Any) -> None:
            self._drop_subscriptions()
            self.sub = proto
            users = sorted(self.users)
            channels = [self.control_channel] + [self._channel(u) for u in users]
            for ch in channels:
                self.inflight.setdefault(ch, deque()).append(_Sent())
            proto.send_subscribe(channels)
            if self.ever_connected:
                metrics.BUS_RECONNECTS.labels(connection="subscriber").inc()
                log.info("bus subscriber reconnected; catching up {n} users from storage", n=len(users))
                # Anything published while we were away is read from storage,
                # once Redis confirmed the user's channel (nothing falls in between).
                for user in users:
                    self._after_confirm(user)
            self.ever_connected = True

        proto.whenConnected().addCallback(ready).addErrback(self._cmd_failed, "connect")

    def _after_confirm(self, user_id: str) -> None:
        d: "Deferred[bool]" = Deferred()
        waiting = self.inflight.get(self._channel(user_id))
        if not waiting:
            d.callback(self.sub is not None)
        else:
            waiting[-1].waiters.append(d)
        d.addCallback(lambda ok: self.hub.resync_user(user_id) if ok else None)

    def _subscriber_down(self, proto: _Subscriber) -> None:
        if self.sub is proto:
            self.sub = None
            self._drop_subscriptions()
            log.warn("bus subscriber connection lost")

    def _message(self, channel: Any, message: Any) -> None:
        ch = channel.decode("utf-8") if isinstance(channel, bytes) else channel
        data = message if isinstance(message, bytes) else str(message).encode("utf-8")
        try:
            if ch == self.control_channel:
                msg = orjson.loads(data)
                if msg.get("origin") != self.node_id:
                    self.hub.on_control(msg)
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
        pub = self.redis.current
        if pub is None:
            self._hold_news(event.user_id, event.seq)
            return
        pub.publish(self._channel(event.user_id), encode_event(event)).addErrback(
            self._event_publish_failed, event.user_id, event.seq)

    def publish_control(self, message: Control) -> None:
        """A control message for every node: applied here at once, sent to the others."""
        self.hub.on_control(message)
        self._publish_control(orjson.dumps(dict(message, origin=self.node_id)))

    def _publish_control(self, data: bytes) -> None:
        pub = self.redis.current
        if pub is None:
            self._hold_control(data)
            return
        pub.publish(self.control_channel, data).addErrback(self._control_publish_failed, data)

    def _hold_news(self, user_id: str, seq: int) -> None:
        """Remember that the user has news up to ``seq`` (no payload), within ``held_users``."""
        if user_id in self.news:
            self.news[user_id] = max(self.news[user_id], seq)
        elif len(self.news) < self.held_users:
            self.news[user_id] = seq
        else:
            self.overflowed = True

    def _hold_control(self, data: bytes) -> None:
        if self.held_control_bytes + len(data) <= CONTROL_HELD_BYTES:
            self.held_control.append(data)
            self.held_control_bytes += len(data)
        else:
            self.overflowed = True

    def _event_publish_failed(self, failure: Any, user_id: str, seq: int) -> None:
        self._publish_failed_once(failure)
        self._hold_news(user_id, seq)

    def _control_publish_failed(self, failure: Any, data: bytes) -> None:
        self._publish_failed_once(failure)
        self._hold_control(data)

    def _publish_failed_once(self, failure: Any) -> None:
        # One line per outage, not one per message.
        if not self.news and not self.held_control:
            log.warn("bus publish failed: {error}", error=failure.getErrorMessage())

    @property
    def held(self) -> int:
        """Users with news and control messages held for the publisher (for tests and stats)."""
        return len(self.news) + len(self.held_control)

    def _publisher_up(self, proto: Commands) -> None:
        """The command connection is usable (again): send what was held, paced."""
        if self._resending is not None and self._resending.active():
            self._resending.cancel()  # a pacing loop of the connection before this one
        self._resending = None
        control, self.held_control = self.held_control, deque()
        self.held_control_bytes = 0
        for data in control:
            self._publish_control(data)
        if self.overflowed:
            self.overflowed = False
            self.news = {}
            # Too much was held back: every node re-reads its users from storage.
            self.publish_control({"kind": "resync"})
        self._resend_news()

    def _resend_news(self) -> None:
        """Send held seq-only notices, ``resend_rate`` per second, while the publisher is up."""
        self._resending = None
        pub = self.redis.current
        if pub is None or not self.news:
            return
        per_tick = max(1, int(self.resend_rate * RESEND_TICK))
        for _ in range(min(per_tick, len(self.news))):
            user_id = next(iter(self.news))
            seq = self.news.pop(user_id)
            pub.publish(self._channel(user_id), orjson.dumps({"s": seq})).addErrback(
                self._event_publish_failed, user_id, seq)
        if self.news:
            self._resending = self.reactor.callLater(RESEND_TICK, self._resend_news)

    def _cmd_failed(self, failure: Any, what: str) -> None:
        log.warn("bus {what} failed: {error}", what=what, error=failure.getErrorMessage())
