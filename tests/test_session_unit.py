"""
Sessions without a socket (issue 9 items 13 and 16): a paused v1 receiver
catches up from storage page by page within the outbound bound, and a drain
stops reading, sends the acks of events already read once they commit, and
only then closes 1001.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.protocol import wire
from pocketbridge.server.cluster.drain import start_drain
from pocketbridge.protocol.events import relay_payload
from pocketbridge.server.gateway.outbound_v1 import V1Outbound
from pocketbridge.server.gateway.session import Session
from pocketbridge.server.storage import Outcome
from tests.conn_fakes import DEVICE, USER, FakeConn, make_node, stored


def v1_session(node: Any, conn: FakeConn) -> Session:
    session = Session(node, conn, USER, DEVICE, "s1", 1, None, "cli")
    node.hub.attach(session)
    session.established(0, 0, 1)
    return session


class PagedCatchUpTests(SynchronousTestCase):
    """A v1 socket resuming after a stall reads what it missed in bounded pages (item 13)."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.node = make_node(self.clock)
        self.conn = FakeConn()
        self.session = v1_session(self.node, self.conn)
        self.session.outbound_paused()
        # 1,000 events commit while the receiver is stalled.
        for seq in range(1, 1001):
            event = stored(seq)
            self.node.storage.events.append(event)
            self.session.deliver_live(event, wire.encode("event", relay_payload(event)))
        self.assertEqual(self.conn.events(), [])

    def test_resume_sends_pages_and_stops_when_paused_again(self) -> None:
        """After a resume, writing stops within one page of the buffer filling again (150 frames, not 1,000)."""
        session, conn = self.session, self.conn

        def fill() -> None:
            if len(conn.events()) == 50:
                session.outbound_paused()

        conn.on_send = fill
        session.outbound_resumed()
        self.assertLessEqual(len(conn.events()), 150)
        conn.on_send = None
        while len(conn.events()) < 1000 and session.out_paused:
            session.outbound_resumed()
        self.assertEqual(conn.events(), list(range(1, 1001)))

    def test_each_read_is_a_bounded_page(self) -> None:
        """No storage read on resume asks for more than 100 events."""
        self.session.outbound_resumed()
        self.assertEqual(self.conn.events(), list(range(1, 1001)))
        self.assertEqual(self.node.storage.ranges, [])
        self.assertTrue(all(limit <= 100 for _, _, limit in self.node.storage.pages))

    def test_live_events_during_the_catch_up_are_sent_once_in_order(self) -> None:
        """Events committed while pages are read arrive once each, in seq order, and the cursor follows acks."""
        session, conn = self.session, self.conn
        nxt = [1001]

        def commit_more() -> None:
            if nxt[0] <= 1100 and len(conn.events()) % 60 == 0:
                event = stored(nxt[0])
                nxt[0] += 1
                self.node.storage.events.append(event)
                session.deliver_live(event, wire.encode("event", relay_payload(event)))

        conn.on_send = commit_more
        session.outbound_resumed()
        sent = conn.events()
        self.assertEqual(sent, sorted(set(sent)))
        self.assertEqual(sent[-1], nxt[0] - 1)
        outbound = session.outbound
        assert isinstance(outbound, V1Outbound) and outbound.tracker is not None
        for seq in sent:
            outbound.on_ack({"device_seq": seq})
        self.assertEqual(outbound.tracker.delivered(), nxt[0] - 1)


class DrainAfterAcksTests(SynchronousTestCase):
    """On drain a socket stops reading, acks what commits, then closes 1001 (item 16)."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.node = make_node(self.clock)
        self.conn = FakeConn()
        self.session = v1_session(self.node, self.conn)

    def _event(self, n: int) -> Any:
        return {"event_id": "00000000-0000-7000-8000-%012d" % n, "user_id": USER, "device_id": DEVICE,
                "device_seq": n, "stream_id": "s", "stream_seq": n, "type": "t", "encrypted_payload": "eHh4eA==",
                "created_at": 1_700_000_000_000}

    def test_committed_events_are_acked_before_the_close(self) -> None:
        """Three events in flight at the drain: their acks go out, then the 1001 close; the socket reads nothing more."""
        for n in (1, 2, 3):
            self.session.on_frame("event", self._event(n))
        writer = self.node.writer
        self.assertEqual(len(writer.pending), 3)
        proto = _Proto(self.session)
        self.node.connections.add(proto)
        start_drain(self.node, 0.0)
        self.clock.advance(0)
        self.assertIsNone(self.conn.closed)
        self.assertFalse(self.conn.reading)
        self.session.on_frame("event", self._event(4))
        self.assertEqual(len(writer.pending), 3)
        for i, (event, d) in enumerate(writer.pending):
            d.callback(Outcome("stored", i + 1, i + 1, None))
        kinds = [(t, f.get("device_seq", f.get("code"))) for t, f in self.conn.frames]
        self.assertEqual(kinds, [("ack", 1), ("ack", 2), ("ack", 3), ("<close>", 1001)])

    def test_idle_socket_closes_at_once(self) -> None:
        """A socket with nothing in flight is closed 1001 at its drain moment."""
        self.node.connections.add(_Proto(self.session))
        start_drain(self.node, 0.0)
        self.clock.advance(0)
        self.assertEqual(self.conn.closed, (1001, "Server going away"))


class _Proto:
    """What the drain sees of a gateway connection."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def close(self, code: int, reason: str) -> None:
        raise AssertionError("an authenticated socket is closed through its session")
