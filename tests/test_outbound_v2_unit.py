"""
What a v2 session sends (gateway/outbound_v2.py), in memory: the pushed
catch-up under the window, ``caught_up`` and then live events, cumulative
acks, a restart on ``replay_request``, and the slow-consumer close.
"""

from __future__ import annotations

from typing import Any, List

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.protocol import wire
from pocketbridge.protocol.events import relay_payload
from pocketbridge.server.gateway.outbound_v2 import V2Outbound
from pocketbridge.server.gateway.session import Session
from tests.conn_fakes import DEVICE, USER, FakeConn, make_node, stored


def frame(seq: int) -> bytes:
    return wire.encode("event", relay_payload(stored(seq)))


class V2Case(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.node = make_node(self.clock, v2_window_events=2, slow_consumer_timeout=8.0)
        self.storage: Any = self.node.storage
        self.storage.events.extend(stored(seq) for seq in range(1, 6))  # the backlog: H = 5
        self.conn = FakeConn()
        self.session = Session(self.node, self.conn, USER, DEVICE, "s1", 2, None, "cli")
        self.node.hub.attach(self.session)

    @property
    def outbound(self) -> V2Outbound:
        out = self.session.outbound
        assert isinstance(out, V2Outbound)
        return out

    def sent(self) -> List[Any]:
        """What went out since the last call: seqs of each page or event, and the other message types."""
        out: List[Any] = []
        for t, f in self.conn.take():
            if t == "replay_response":
                out.append([e["seq"] for e in f["events"]])
            elif t == "event":
                out.append(f["seq"])
            elif t == "caught_up":
                out.append(("caught_up", f["seq"]))
            else:
                out.append(t)
        return out

    def ack(self, seq: int) -> None:
        self.session.on_frame("ack", {"seq": seq})

    def cursor(self) -> int:
        return self.node.cursors.dirty.get((USER, DEVICE), 0)


class CatchUpTests(V2Case):
    """The backlog is pushed in pages the window allows, then caught_up, then live."""

    def test_window_paces_the_catch_up_then_live_events_follow(self) -> None:
        """Window 2, backlog 5: pages [1,2], [3,4], [5] as acks open the window; caught_up 5; then event 6 live."""
        self.session.established(5, 0, 1)
        self.assertEqual(self.sent(), [[1, 2]])
        self.ack(2)
        self.assertEqual(self.sent(), [[3, 4]])
        self.ack(4)
        self.assertEqual(self.sent(), [[5], ("caught_up", 5)])
        self.storage.events.append(stored(6))
        self.session.deliver_live(stored(6), frame(6))
        self.assertEqual(self.sent(), [6])

    def test_live_events_past_a_full_window_are_read_later(self) -> None:
        """Caught up with a full window, events 6 and 7 wait; an ack sends them from storage, in order."""
        self.session.established(0, 0, 1)
        self.assertEqual(self.sent(), [("caught_up", 0)])
        for seq in (1, 2, 3):
            self.session.deliver_live(stored(seq), frame(seq))
        self.assertEqual(self.sent(), [1, 2])
        self.ack(2)
        self.assertEqual(self.sent(), [3])
        self.assertEqual(self.outbound.pos, 3)

    def test_resume_restarts_the_catch_up(self) -> None:
        """replay_request{resume_from: 2} after the catch-up sends 3..5 again and caught_up."""
        self.session.established(5, 0, 1)
        self.ack(2)
        self.ack(4)
        self.ack(5)
        self.sent()
        self.session.on_frame("replay_request", {"resume_from": 2})
        self.assertEqual(self.sent(), [[3, 4]])
        self.ack(4)
        self.assertEqual(self.sent(), [[5], ("caught_up", 5)])

    def test_bad_resume_is_a_bad_request(self) -> None:
        """A replay_request without an integer resume_from is answered bad_request and restarts nothing."""
        self.session.established(5, 0, 1)
        self.sent()
        self.session.on_frame("replay_request", {"resume_from": -1})
        frames = self.conn.take()
        self.assertEqual([(t, f["code"]) for t, f in frames], [("error", "bad_request")])


class CumulativeAckTests(V2Case):
    """One ack acknowledges every event sent up to its seq."""

    def test_one_ack_releases_the_window_and_moves_the_cursor(self) -> None:
        """Ack 2 releases both unacked events and writes cursor 2; a repeat changes nothing."""
        self.session.established(5, 0, 1)
        self.assertEqual(len(self.outbound.unacked), 2)
        self.ack(2)
        self.assertEqual(self.cursor(), 2)
        self.assertEqual([seq for seq, _ in self.outbound.unacked], [3, 4])
        self.ack(2)
        self.assertEqual(self.sent(), [[1, 2], [3, 4]])
        self.assertEqual(self.outbound.acked, 2)

    def test_ack_beyond_what_was_sent_is_clamped(self) -> None:
        """An ack of seq 99 counts only up to the highest seq sent (2)."""
        self.session.established(5, 0, 1)
        self.ack(99)
        self.assertEqual(self.cursor(), 2)
        self.assertEqual(self.outbound.acked, 2)

    def test_junk_acks_spend_the_frame_budget(self) -> None:
        """Acks that match nothing take frame tokens; one matching an unacked delivery does not."""
        node = make_node(self.clock, v2_window_events=2, frames_per_socket_burst=2, frames_per_socket_rate=0.001)
        node.storage.events.extend(stored(seq) for seq in range(1, 6))  # type: ignore[attr-defined]
        conn = FakeConn()
        session = Session(node, conn, USER, DEVICE, "s2", 2, None, "cli")
        session.established(5, 0, 1)
        session.on_frame("ack", {"seq": 0})
        session.on_frame("ack", {"seq": 0})
        session.on_frame("ack", {"seq": 2})  # free: it acknowledges events sent
        self.assertEqual([t for t, _ in conn.frames], ["replay_response", "replay_response"])
        session.on_frame("ack", {"seq": 0})
        session.on_frame("ack", {"seq": 4})  # behind a junk ack that waits for a token
        self.assertFalse(conn.reading)
        self.assertEqual([t for t, _ in conn.frames], ["replay_response", "replay_response"])


class SlowConsumerTests(V2Case):
    """A window that stays full with events waiting closes the socket 4008."""

    def test_no_ack_for_the_timeout_closes_4008(self) -> None:
        """Window full, three events waiting, no ack for 8 s: closed 4008 'Slow consumer'."""
        self.session.established(5, 0, 1)
        self.clock.advance(7.0)
        self.assertIsNone(self.conn.closed)
        self.clock.advance(2.0)
        self.assertEqual(self.conn.closed, (4008, "Slow consumer"))

    def test_acks_that_advance_keep_the_socket(self) -> None:
        """An ack every 6 s resets the clock: after 30 s the socket is still open and caught up."""
        self.session.established(5, 0, 1)
        for seq in (2, 4, 5):
            self.clock.advance(6.0)
            self.ack(seq)
        self.clock.advance(30.0)
        self.assertIsNone(self.conn.closed)
        self.assertEqual(self.sent()[-1], ("caught_up", 5))

    def test_nothing_waiting_is_not_slow(self) -> None:
        """All caught up with the last events unacked: no close, however long."""
        self.session.established(2, 0, 1)
        self.clock.advance(60.0)
        self.assertIsNone(self.conn.closed)

    def test_paused_socket_sends_nothing_and_resumes_from_storage(self) -> None:
        """While the send buffer is paused a live event is not sent; on resume it is read and sent."""
        self.session.established(0, 0, 1)
        self.sent()
        self.session.outbound_paused()
        self.session.deliver_live(stored(1), frame(1))
        self.assertEqual(self.sent(), [])
        self.session.outbound_resumed()
        self.assertEqual(self.sent(), [1])

    def test_lost_cancels_the_slow_check(self) -> None:
        """A socket gone while its window was full leaves no timer behind."""
        self.session.established(5, 0, 1)
        self.session.lost()
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])
