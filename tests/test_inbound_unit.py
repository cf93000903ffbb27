"""
The one inbound path of a session (gateway/inbound.py) for both protocol
versions, in memory: answers in arrival order across slow commits, what
each version answers to duplicate and rejected events, the frame and
uncommitted-byte bounds, and the close that waits for the acks.
"""

from __future__ import annotations

from typing import Any, List, Tuple

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.server.gateway.session import Session
from pocketbridge.server.storage import Outcome, StorageUnavailable
from tests.conn_fakes import DEVICE, OTHER, USER, FakeConn, make_node, upload


def answers(conn: FakeConn) -> List[Tuple[str, Any]]:
    """(type, device_seq or error code) of each answer sent."""
    out = []
    for t, f in conn.frames:
        if t == "ack":
            out.append(("dropped" if f.get("dropped") else "ack", f.get("device_seq")))
        elif t == "error":
            out.append(("error:" + f["code"], f.get("device_seq")))
        else:
            out.append((t, f.get("code")))
    return out


class InboundCase(SynchronousTestCase):
    version = 1

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.node = make_node(self.clock, frames_per_socket_burst=10, frames_per_socket_rate=1.0)
        self.conn = FakeConn()
        self.session = self.make_session()

    def make_session(self) -> Session:
        session = Session(self.node, self.conn, USER, DEVICE, "s1", self.version, None, "cli")
        self.node.hub.attach(session)
        session.established(0, 0, 1)
        return session

    def commit(self, index: int, kind: str = "stored", seq: int = 0) -> None:
        event, d = self.node.writer.pending[index]
        d.callback(Outcome(kind, seq or event.device_seq, event.device_seq, None))


class ArrivalOrderTests(InboundCase):
    """Acks leave in the order the events arrived, whatever order they commit in."""

    def _slow_first_commit(self) -> None:
        for n in (1, 2, 3):
            self.session.on_frame("event", upload(n))
        self.commit(2)
        self.commit(1)
        self.assertEqual(self.conn.frames, [])
        self.commit(0)
        self.assertEqual(answers(self.conn), [("ack", 1), ("ack", 2), ("ack", 3)])
        self.assertEqual([f["seq"] for _, f in self.conn.frames], [1, 2, 3])

    def test_v1_acks_wait_for_the_slow_first_commit(self) -> None:
        """v1: events 2 and 3 commit before 1; nothing is sent until 1 commits, then acks 1, 2, 3."""
        self._slow_first_commit()

    def test_v2_acks_wait_for_the_slow_first_commit(self) -> None:
        """v2: the same order holds on a v2 socket."""
        self.version = 2
        self.conn = FakeConn()
        self.session = self.make_session()
        self.conn.take()
        self._slow_first_commit()

    def test_rejection_decided_at_once_waits_behind_a_pending_commit(self) -> None:
        """An invalid event is answered without storage, but after the ack of the event before it."""
        self.session.on_frame("event", upload(1))
        self.session.on_frame("event", upload(2, stream_id=""))
        self.assertEqual(self.conn.frames, [])
        self.commit(0)
        self.assertEqual(answers(self.conn), [("ack", 1), ("dropped", 2)])


class V1AnswerTests(InboundCase):
    """v1 answers as old clients expect: acks, dropped acks, or silence."""

    def test_duplicate_is_acked_with_its_stored_seq(self) -> None:
        """An event already stored is acked like a new one, with the seq it was stored at."""
        self.session.on_frame("event", upload(1))
        self.commit(0, "duplicate", seq=7)
        self.assertEqual(self.conn.frames, [("ack", {"device_seq": 1, "event_id": upload(1)["event_id"],
                                                     "seq": 7, "stream_seq": 1})])

    def test_conflict_and_quota_are_dropped_acks(self) -> None:
        """A seq conflict and a full quota are acked as dropped, in order."""
        self.session.on_frame("event", upload(1))
        self.session.on_frame("event", upload(2))
        self.commit(0, "conflict")
        self.commit(1, "quota")
        self.assertEqual(answers(self.conn), [("dropped", 1), ("dropped", 2)])

    def test_other_device_and_unknown_type_get_no_answer(self) -> None:
        """An event of another device, one without device_seq, and an unknown type are ignored."""
        self.session.on_frame("event", upload(1, device=OTHER))
        self.session.on_frame("event", upload(1, device_seq="x"))
        self.session.on_frame("whatever", {})
        self.session.on_frame("ping", {})
        self.assertEqual(self.conn.types(), ["pong"])
        self.assertEqual(self.node.writer.pending, [])


class V2AnswerTests(InboundCase):
    """v2 answers every refusal with a typed error, in arrival order."""

    version = 2

    def setUp(self) -> None:
        super().setUp()
        self.conn.take()  # caught_up

    def test_rejections_are_typed_errors(self) -> None:
        """Not owner, invalid, conflict and quota each get their error code, with the device_seq echoed."""
        self.session.on_frame("event", upload(1, device=OTHER))
        self.session.on_frame("event", upload(2, stream_id=""))
        self.session.on_frame("event", upload(3))
        self.session.on_frame("event", upload(4))
        self.commit(0, "conflict")
        self.commit(1, "quota")
        self.assertEqual(answers(self.conn), [
            ("error:not_owner", 1), ("error:invalid_event", 2), ("error:seq_conflict", 3), ("error:quota_exceeded", 4)])

    def test_unknown_type_and_bad_ack_are_errors(self) -> None:
        """An unknown type is answered unknown_type; an ack without an integer seq, bad_request."""
        self.session.on_frame("whatever", {})
        self.session.on_frame("ack", {"seq": "x"})
        self.assertEqual(answers(self.conn), [("error:unknown_type", None), ("error:bad_request", None)])
        self.assertEqual(self.conn.frames[0][1]["in_reply_to"], "whatever")


class BoundTests(InboundCase):
    """The limits of the inbound path hold the queue and the socket's reading."""

    def test_frame_budget_pauses_reading_until_tokens_return(self) -> None:
        """Past a burst of 10 frames the 11th waits (reading paused) and is answered a second later."""
        for _ in range(11):
            self.session.on_frame("ping", {})
        self.assertEqual(self.conn.types(), ["pong"] * 10)
        self.assertFalse(self.conn.reading)
        self.clock.advance(1.0)
        self.assertEqual(self.conn.types(), ["pong"] * 11)
        self.assertTrue(self.conn.reading)

    def test_uncommitted_bytes_hold_the_queue(self) -> None:
        """Over pending_bytes_per_socket nothing more is handled until a commit brings it back under."""
        self.node = make_node(self.clock, pending_bytes_per_socket=8)
        self.conn = conn = FakeConn()
        session = self.make_session()
        session.on_frame("event", upload(1))
        session.on_frame("event", upload(2))
        session.on_frame("ping", {})
        self.assertEqual(len(self.node.writer.pending), 2)  # 8 bytes are not over the bound, 16 are
        self.assertNotIn("pong", conn.types())
        self.assertFalse(conn.reading)
        self.commit(0)
        self.assertEqual(conn.types(), ["ack", "pong"])
        self.assertTrue(conn.reading)

    def test_storage_down_closes_1013(self) -> None:
        """A commit failing with StorageUnavailable closes the socket 1013."""
        self.session.on_frame("event", upload(1))
        self.node.writer.pending[0][1].errback(StorageUnavailable("down"))
        self.assertEqual(self.conn.closed, (1013, "Storage unavailable"))

    def test_account_deleted_closes_4003(self) -> None:
        """An event of a deleted account closes 4003 and sends no ack."""
        self.session.on_frame("event", upload(1))
        self.commit(0, "no_user")
        self.assertEqual(self.conn.types(), ["<close>"])
        self.assertEqual(self.conn.closed, (4003, "Account deleted"))


class CloseAfterAcksTests(InboundCase):
    """Expiry stops reading at once and closes only after the acks of events already read."""

    def test_expire_waits_for_pending_acks(self) -> None:
        """Two events in flight at expiry: both acks, then 1001; a frame after expiry is not read."""
        self.session.on_frame("event", upload(1))
        self.session.on_frame("event", upload(2))
        self.session.expire()
        self.session.on_frame("event", upload(3))
        self.assertFalse(self.conn.reading)
        self.assertEqual(len(self.node.writer.pending), 2)
        self.commit(1)
        self.assertIsNone(self.conn.closed)
        self.commit(0)
        self.assertEqual(answers(self.conn), [("ack", 1), ("ack", 2), ("<close>", 1001)])

    def test_frames_queued_behind_the_limit_are_dropped_at_expiry(self) -> None:
        """Frames still waiting for tokens are not handled after expiry; the idle socket closes at once."""
        for _ in range(12):
            self.session.on_frame("ping", {})
        self.session.expire()
        self.clock.advance(5.0)
        self.assertEqual(self.conn.types(), ["pong"] * 10 + ["<close>"])
