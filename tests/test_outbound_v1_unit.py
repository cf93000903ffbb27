"""
What a v1 session sends (gateway/outbound_v1.py), in memory: the backlog
in pages the client asks for, the first page a fresh device gets unasked,
live events held until the head is known, and the delivery cursor that
follows the acks.
"""

from __future__ import annotations

from typing import Any, Dict, List

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.protocol import wire
from pocketbridge.protocol.events import relay_payload
from pocketbridge.server.gateway.outbound_v1 import V1Outbound
from pocketbridge.server.gateway.session import Session
from tests.conn_fakes import DEVICE, USER, FakeConn, make_node, stored


def frame(seq: int, device: Any = None) -> bytes:
    event = stored(seq) if device is None else stored(seq, device)
    return wire.encode("event", relay_payload(event))


class V1Case(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.build(frames_per_socket_burst=1, frames_per_socket_rate=0.001)

    def build(self, **settings: Any) -> None:
        """A node whose storage holds the backlog 1..5 of another device, and a v1 session (not yet established)."""
        self.node = make_node(self.clock, **settings)
        self.storage: Any = self.node.storage
        self.storage.events.extend(stored(seq) for seq in range(1, 6))
        self.conn = FakeConn()
        self.session = Session(self.node, self.conn, USER, DEVICE, "s1", 1, None, "cli")
        self.node.hub.attach(self.session)

    @property
    def outbound(self) -> V1Outbound:
        out = self.session.outbound
        assert isinstance(out, V1Outbound)
        return out

    def pages(self) -> List[Dict[str, Any]]:
        return [f for t, f in self.conn.frames if t == "replay_response"]

    def cursor(self) -> int:
        return self.node.cursors.dirty.get((USER, DEVICE), 0)


class ReplayPagingTests(V1Case):
    """The backlog goes out in the pages the client asks for."""

    def test_pages_follow_the_continuation(self) -> None:
        """limit 2 over 5 events: pages of 2, 2 and 1, with has_more, continuation and the total."""
        self.build()
        self.session.established(5, 0, 3)
        self.assertEqual(self.conn.frames, [])  # a device that stored events asks itself
        for _ in range(4):
            self.session.on_frame("replay_request", {"limit": 2})
        pages = self.pages()
        self.assertEqual([[e["seq"] for e in p["events"]] for p in pages], [[1, 2], [3, 4], [5], []])
        self.assertEqual([p["has_more"] for p in pages], [True, True, False, False])
        self.assertEqual([p.get("continuation_token") for p in pages], ["seq:2", "seq:4", None, None])
        self.assertEqual([p["total_events"] for p in pages], [5, 3, 1, 0])

    def test_fresh_device_gets_the_first_page_unasked_and_free(self) -> None:
        """last_device_seq 0: the first page is pushed without a request and spends no frame token."""
        self.session.established(5, 0, 0)
        self.assertEqual([[e["seq"] for e in p["events"]] for p in self.pages()], [[1, 2, 3, 4, 5]])
        self.session.on_frame("ping", {})
        self.assertEqual(self.conn.types(), ["replay_response", "pong"])

    def test_a_page_read_holds_later_frames(self) -> None:
        """Frames after a replay_request wait while its page is read, and are answered after it."""
        reads: List[Any] = []
        real = self.storage.read_page

        def slow(*args: Any) -> "Deferred[Any]":
            d: "Deferred[Any]" = Deferred()
            reads.append((d, real(*args)))
            return d

        self.storage.read_page = slow
        self.session.established(5, 0, 3)
        self.session.on_frame("replay_request", {"limit": 10})
        self.clock.advance(10_000)  # tokens for the next frame
        self.session.on_frame("ping", {})
        self.assertEqual(self.conn.frames, [])
        self.assertTrue(self.outbound.busy)
        d, result = reads[0]
        result.addCallback(d.callback)
        self.assertEqual(self.conn.types(), ["replay_response", "pong"])


class CursorTests(V1Case):
    """The cursor moves only over what was sent and acknowledged, or was covered already."""

    def test_acks_of_a_page_move_the_cursor(self) -> None:
        """Page 1..5 sent: the cursor waits at 0 while 1 is unacked, then follows to 5."""
        self.session.established(5, 0, 0)
        out = self.outbound
        for d in (2, 3):
            out.on_ack({"device_seq": d})
        self.assertEqual(self.cursor(), 0)
        for d in (1, 4, 5):
            out.on_ack({"device_seq": d})
        self.assertEqual(self.cursor(), 5)

    def test_only_matching_acks_are_free(self) -> None:
        """An ack of something sent passes an empty frame budget; one that matches nothing waits for a token."""
        self.session.established(5, 0, 0)
        self.session.on_frame("ping", {})  # spends the one token
        self.session.on_frame("ack", {"device_seq": 1})
        self.assertTrue(self.outbound.tracker is not None and not self.outbound.tracker.expects_ack(1))
        self.session.on_frame("ack", {"device_seq": 99})
        self.session.on_frame("ack", {"device_seq": 2})
        self.assertTrue(self.outbound.tracker is not None and self.outbound.tracker.expects_ack(2))
        self.assertFalse(self.conn.reading)


class LiveTests(V1Case):
    """Live events: held until H is read, then relayed; own events are not echoed."""

    def test_live_events_before_the_head_are_released_in_order(self) -> None:
        """Events routed while the head is read are sent after it, once; those in the backlog are not resent."""
        self.session.deliver_live(stored(5), frame(5))
        self.session.deliver_live(stored(6), frame(6))
        self.assertEqual(self.conn.frames, [])
        self.session.established(5, 5, 3)
        self.assertEqual(self.conn.events(), [6])

    def test_own_events_are_not_echoed_but_move_the_cursor(self) -> None:
        """The device's own event is handled without a send; the cursor passes it."""
        self.session.established(5, 5, 3)
        self.session.deliver_live(stored(6, DEVICE), frame(6, DEVICE))
        self.session.deliver_live(stored(7), frame(7))
        self.assertEqual(self.conn.events(), [7])
        self.assertEqual(self.cursor(), 6)
        self.outbound.on_ack({"device_seq": 7})
        self.assertEqual(self.cursor(), 7)

    def test_lost_socket_writes_the_cursor_and_records_a_stall(self) -> None:
        """Gone with event 6 unacked right after the cursor: the stall is recorded for the give-up rule."""
        recorded: List[Any] = []

        def record_unacked(user_id: str, device_id: str, delivered: int, seq: int, now: int) -> "Deferred[bool]":
            recorded.append((delivered, seq))
            return succeed(False)

        self.storage.record_unacked = record_unacked
        self.session.established(5, 5, 3)
        self.session.deliver_live(stored(6), frame(6))
        self.session.lost()
        self.assertEqual(recorded, [(5, 6)])
        self.session.deliver_live(stored(7), frame(7))
        self.assertEqual(self.conn.events(), [6])
