"""
The delivery hub and the Redis bus in memory (issue 9 items 12 and 14):
duplicates of routed seqs are dropped and unrouted ones relayed once, gap
reads are paged, ``attach`` fires only once Redis confirmed the SUBSCRIBE,
the catch-up after a resubscribe waits for the confirmation, and a
publisher outage holds only "user has news" (no payloads), bounded, sent
back as small paced notices.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import orjson
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.protocol.events import StoredEvent
from pocketbridge.server.fanout.hub import DeliveryHub
from pocketbridge.server.fanout.redisbus import RedisBus, _Subscriber
from pocketbridge.server.fanout.redisconn import RedisConnection

USER = "a" * 64
DEV_A = "0b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b"
DEV_B = "1b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b"


def row(seq: int, payload: str = "QUJD", user: str = USER) -> StoredEvent:
    return StoredEvent(user, seq, "00000000-0000-7000-8000-{:012d}".format(seq), DEV_A, seq, "s", seq, "t",
                       payload, None, 0)


class FakeStorage:
    """Events 1..head of USER; records every read."""

    def __init__(self, head: int) -> None:
        self.head_seq = head
        self.reads: List[Tuple[int, int]] = []

    def read_range(self, user_id: str, after: int, upto: int) -> "Deferred[List[StoredEvent]]":
        self.reads.append((after, upto))
        return succeed([row(s) for s in range(after + 1, min(upto, self.head_seq) + 1)])

    def head(self, user_id: str) -> "Deferred[int]":
        return succeed(self.head_seq)


class Sink:
    """A session that records the seqs the hub routes to it."""

    def __init__(self, device_id: str = DEV_B) -> None:
        self.user_id = USER
        self.device_id = device_id
        self.seqs: List[int] = []

    def deliver_live(self, event: StoredEvent, frame: bytes) -> None:
        self.seqs.append(event.seq)

    def send_notice(self, frame: bytes) -> None:
        pass

    def close_for(self, code: int, reason: str, notice: Optional[bytes]) -> None:
        pass


class FakeSubscriber:
    """Stands in for the subscriber connection: records what is sent."""

    def __init__(self) -> None:
        self.sent: List[Tuple[str, List[str]]] = []

    def send_subscribe(self, channels: List[str]) -> None:
        self.sent.append(("SUBSCRIBE", list(channels)))

    def send_unsubscribe(self, channels: List[str]) -> None:
        self.sent.append(("UNSUBSCRIBE", list(channels)))

    def whenConnected(self) -> "Deferred[Any]":
        return succeed(self)


class FakePublisher:
    """Stands in for the command connection's protocol: records each PUBLISH (kept honest by
    tests/test_wiring.py's contract tests, which run the same checks on a real Redis)."""

    def __init__(self) -> None:
        self.published: List[Tuple[str, bytes]] = []

    def publish(self, channel: str, data: bytes) -> "Deferred[int]":
        self.published.append((channel, data))
        return succeed(1)

    def whenConnected(self) -> "Deferred[Any]":
        return succeed(self)


class HubTests(SynchronousTestCase):
    """Routing duplicates and reading gaps."""

    def test_duplicate_of_a_routed_seq_is_dropped_and_an_unrouted_one_relayed_once(self) -> None:
        """A re-published seq the hub routed is dropped; one it never routed (lost publish) reaches the sink once."""
        storage = FakeStorage(head=3)
        hub = DeliveryHub(storage)  # type: ignore[arg-type]
        sink = Sink()
        hub.attach(sink)
        hub.known_head(USER, 1)
        hub.on_event(USER, 2, row(2))
        hub.on_event(USER, 2, row(2))  # the duplicate of a relayed event
        self.assertEqual(sink.seqs, [2])
        # seq 3 was committed but its publish was lost; its duplicate is the first notice.
        hub.on_event(USER, 3, row(3))
        hub.on_event(USER, 3, row(3))
        self.assertEqual(sink.seqs, [2, 3])

    def test_gap_reads_are_paged(self) -> None:
        """A notice 1,000 seqs ahead is filled by reads of at most read_page seqs, in order, every seq once."""
        storage = FakeStorage(head=1000)
        hub = DeliveryHub(storage, read_page=256)  # type: ignore[arg-type]
        sink = Sink()
        hub.attach(sink)
        hub.known_head(USER, 0)
        hub.on_event(USER, 1000, None)
        self.assertEqual(sink.seqs, list(range(1, 1001)))
        self.assertTrue(all(upto - after <= 256 for after, upto in storage.reads), storage.reads)
        self.assertEqual(len(storage.reads), 4)

    def test_failing_gap_reads_log_once_per_outage(self) -> None:
        """While storage fails, 50 gap reads give one warning; the first read that works logs one recovery line."""
        from twisted.internet.defer import fail
        from twisted.logger import Logger

        from pocketbridge.server.fanout import hub as hub_module
        from pocketbridge.server.storage import StorageUnavailable

        events: List[Any] = []
        self.patch(hub_module, "log", Logger(observer=events.append))
        storage = FakeStorage(head=100)
        real_read = storage.read_range
        storage.read_range = lambda *a: fail(StorageUnavailable("read_range"))  # type: ignore[method-assign]
        hub = DeliveryHub(storage)  # type: ignore[arg-type]
        sink = Sink()
        hub.attach(sink)
        hub.known_head(USER, 0)
        for seq in range(2, 52):
            hub.on_event(USER, seq, None)
        self.assertEqual(len(events), 1)
        storage.read_range = real_read  # type: ignore[method-assign]
        hub.on_event(USER, 60, None)
        self.assertEqual(sink.seqs, list(range(1, 61)))
        self.assertEqual(len(events), 2)


class BusTests(SynchronousTestCase):
    """RedisBus with fake connections (nothing is started)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.storage = FakeStorage(head=0)
        self.redis = RedisConnection(self.clock, "redis://127.0.0.1:1")

        def bus(receiver: Any) -> RedisBus:
            return RedisBus(self.clock, self.redis, receiver, "n1", prefix="p:", held_users=3, resend_rate=40)

        self.hub = DeliveryHub(self.storage, bus)  # type: ignore[arg-type]
        self.bus: RedisBus = self.hub.bus  # type: ignore[assignment]
        self.sub = FakeSubscriber()
        self.pub = FakePublisher()

    def connect(self) -> None:
        self.bus._subscriber_up(self.sub)  # type: ignore[arg-type]
        self.redis._made(self.pub)  # type: ignore[arg-type]  # the command connection is up

    def confirm(self, channel: str) -> None:
        self.bus._confirmed(self.sub, channel.encode())  # type: ignore[arg-type]

    def test_attach_fires_only_after_redis_confirmed(self) -> None:
        """hub.attach's Deferred waits for the SUBSCRIBE confirmation; a second session of the user waits for the same one."""
        self.connect()
        self.confirm("p:control")
        first = self.hub.attach(Sink())
        second = self.hub.attach(Sink(DEV_A))
        self.assertEqual(self.sub.sent[-1], ("SUBSCRIBE", ["p:u:" + USER]))
        self.assertEqual(len([s for s in self.sub.sent if s[1] == ["p:u:" + USER]]), 1)
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.confirm("p:u:" + USER)
        self.assertTrue(self.successResultOf(first))
        self.assertTrue(self.successResultOf(second))
        self.assertTrue(self.successResultOf(self.hub.attach(Sink())))  # already listening

    def test_resubscribe_after_unsubscribe_waits_for_its_own_confirmation(self) -> None:
        """SUBSCRIBE, UNSUBSCRIBE, SUBSCRIBE: the second attach is not woken by the first confirmation."""
        self.connect()
        a = Sink()
        self.hub.attach(a)
        self.hub.detach(a)
        again = self.hub.attach(Sink())
        self.confirm("p:u:" + USER)  # the first SUBSCRIBE's reply
        self.assertNoResult(again)
        self.confirm("p:u:" + USER)
        self.assertTrue(self.successResultOf(again))

    def test_attach_while_subscriber_down_does_not_wait(self) -> None:
        """With the subscriber down, attach fires at once (False): the catch-up after the reconnect covers the user."""
        self.assertFalse(self.successResultOf(self.hub.attach(Sink())))

    def test_catch_up_after_resubscribe_waits_for_confirmation(self) -> None:
        """After a subscriber reconnect, the user is re-read from storage only once Redis confirmed the channel."""
        self.connect()
        sink = Sink()
        self.hub.attach(sink)
        self.confirm("p:u:" + USER)
        self.hub.known_head(USER, 0)
        self.bus._subscriber_down(self.sub)  # type: ignore[arg-type]
        self.storage.head_seq = 2  # committed while the subscriber was away
        self.bus._subscriber_up(self.sub)  # type: ignore[arg-type]
        self.assertEqual(self.sub.sent[-1], ("SUBSCRIBE", ["p:control", "p:u:" + USER]))
        self.assertEqual(sink.seqs, [])
        self.confirm("p:control")
        self.confirm("p:u:" + USER)
        self.assertEqual(sink.seqs, [1, 2])

    def test_subscriber_parses_confirmations_per_channel(self) -> None:
        """The subscriber protocol hands each SUBSCRIBE confirmation to the bus by channel, and messages as messages."""
        proto = _Subscriber(charset=None)
        proto.bus = self.bus
        self.bus.sub = proto
        got: List[Any] = []
        self.bus._confirmed = lambda p, ch: got.append(ch)  # type: ignore[method-assign]
        self.bus._message = lambda ch, msg: got.append((ch, msg))  # type: ignore[method-assign]
        proto.replyReceived([b"subscribe", b"p:u:x", 1])
        proto.replyReceived([b"unsubscribe", b"p:u:x", 0])
        proto.replyReceived([b"message", b"p:u:y", b"{}"])
        self.assertEqual(got, [b"p:u:x", (b"p:u:y", b"{}")])

    def test_outage_holds_no_payloads_and_resends_small_paced_notices(self) -> None:
        """100 events of 48 KB while the publisher is down hold one entry per user; then small seq-only notices, paced."""
        big = "A" * 48_000
        for seq in range(1, 101):
            self.bus.publish_event(row(seq, big, user="u{}".format(seq % 2) * 32))
        self.assertEqual(self.bus.held, 2)
        self.connect()
        self.assertEqual(len(self.pub.published), 2)  # 40/s in 50 ms ticks: 2 per tick
        for channel, data in self.pub.published:
            self.assertLess(len(data), 64)
            self.assertEqual(set(orjson.loads(data)), {"s"})
        self.assertEqual(sorted(orjson.loads(d)["s"] for _, d in self.pub.published), [99, 100])
        self.assertEqual(self.bus.held, 0)

    def test_outage_past_held_users_resyncs_everyone(self) -> None:
        """News for more users than held_users: the rest is not held, every node re-reads (one resync control message)."""
        for i in range(10):
            self.bus.publish_event(row(1, user="{:064d}".format(i)))
        self.assertEqual(self.bus.held, 3)
        self.connect()
        controls = [orjson.loads(d) for ch, d in self.pub.published if ch == "p:control"]
        self.assertEqual([c["kind"] for c in controls], ["resync"])

    def test_resend_is_paced(self) -> None:
        """Held notices go out at resend_rate per second, not all at once."""
        self.bus.held_users = 1000
        for i in range(100):
            self.bus.publish_event(row(1, user="{:064d}".format(i)))
        self.connect()
        self.assertEqual(len(self.pub.published), 2)
        self.clock.pump([0.05] * 20)  # one second
        self.assertLessEqual(len(self.pub.published), 2 + 40)
        self.clock.pump([0.05] * 40)
        self.assertEqual(len(self.pub.published), 100)
