"""
Per-connection resources of the gateway (issue 9, "What to build" A;
PROTOCOL.md §12), in memory: outbound bytes are counted in O(1) with one
slow-consumer timer, unsent bytes are capped before and after
authentication, WebSocket pings are frames under the per-socket limit,
paused reading stops Autobahn's loop, closes are counted once, nothing is
written to a closing socket, and the handshake-failure budget is exact.
"""

from __future__ import annotations

from typing import Any, List

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.server import metrics

from pocketbridge.protocol import wire
from tests.conn_fakes import (
    OTHER, USER, authenticate, client_frame, close_code, connect, make_node, server_frames, stored, text,
)


class CountingList(list):  # type: ignore[type-arg]
    """A transport buffer list that counts how often it is walked."""

    walks = 0

    def __iter__(self) -> Any:
        CountingList.walks += 1
        return super().__iter__()


def pongs(frames: List[Any]) -> int:
    return sum(1 for op, _ in frames if op == 10)


def app_pongs(frames: List[Any]) -> int:
    return sum(1 for op, p in frames if op == 1 and p.startswith(b'{"type":"pong"'))


class OutboundAccountingTests(SynchronousTestCase):
    """Writes to a full send buffer cost O(1) and arm one timer."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()

    def test_full_buffer_writes_arm_one_timer_and_never_walk_the_buffer(self) -> None:
        """3,000 writes past the pause size leave one pending timer and never iterate the transport buffer."""
        node = make_node(self.clock, outbound_pause_bytes=4096, outbound_resume_bytes=1024, outbound_max_bytes=64 * 1024 * 1024)
        proto, tcp = connect(node, self.clock)
        authenticate(proto)
        before = len(self.clock.getDelayedCalls())
        tcp._tempDataBuffer = CountingList(tcp._tempDataBuffer)
        CountingList.walks = 0
        for _ in range(3000):
            proto.send_frame(b"x" * 100)
        self.assertEqual(CountingList.walks, 0)
        self.assertLessEqual(len(self.clock.getDelayedCalls()) - before, 1)
        self.assertTrue(proto.session.out_paused)  # type: ignore[union-attr]

    def test_drained_buffer_resumes_and_cancels_the_timer(self) -> None:
        """Once the peer reads the buffer, delivery resumes and the slow-consumer timer is gone."""
        node = make_node(self.clock, outbound_pause_bytes=4096, outbound_resume_bytes=1024)
        proto, tcp = connect(node, self.clock)
        session = authenticate(proto)
        before = len(self.clock.getDelayedCalls())
        for _ in range(100):
            proto.send_frame(b"x" * 100)
        self.assertTrue(session.out_paused)
        tcp.drain(10 ** 6)
        self.assertFalse(session.out_paused)
        self.assertEqual(len(self.clock.getDelayedCalls()), before)

    def test_stalled_consumer_closed_4008(self) -> None:
        """No byte leaves a paused buffer for slow_consumer_timeout: the socket is closed 4008."""
        node = make_node(self.clock, outbound_pause_bytes=4096, outbound_resume_bytes=1024, slow_consumer_timeout=10.0)
        proto, tcp = connect(node, self.clock)
        authenticate(proto)
        for _ in range(100):
            proto.send_frame(b"x" * 100)
        self.clock.pump([1.0] * 9)
        self.assertIsNone(close_code(server_frames(tcp.written())))
        self.clock.pump([1.0] * 3)
        self.assertEqual(close_code(server_frames(tcp.written())), 4008)


class OutboundCeilingTests(SynchronousTestCase):
    """The server never holds more than the configured unsent bytes for a connection."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()

    def test_authenticated_ceiling_closes_4008(self) -> None:
        """Past outbound_max_bytes unsent, the socket is closed 4008 and no further frame is buffered."""
        node = make_node(self.clock, outbound_pause_bytes=16 * 1024, outbound_resume_bytes=1024, outbound_max_bytes=64 * 1024)
        proto, tcp = connect(node, self.clock)
        authenticate(proto)
        for _ in range(2000):
            proto.send_frame(b"x" * 100)
        frames = server_frames(tcp.written())
        self.assertEqual(close_code(frames), 4008)
        self.assertLessEqual(len(tcp.written()), 64 * 1024 + 1024)

    def test_preauth_pong_flood_dropped(self) -> None:
        """Before authentication, unread pongs past preauth_outbound_bytes drop the connection."""
        node = make_node(self.clock, preauth_outbound_bytes=2048, max_preauth_messages=100000)
        proto, tcp = connect(node, self.clock)
        proto.dataReceived(client_frame(9, b"p" * 125) * 500)
        self.assertTrue(tcp.aborted)
        self.assertLessEqual(len(tcp.written()), 2048 + 512)

    def test_preauth_pings_are_unexpected_messages(self) -> None:
        """Before authentication a ping counts as an unexpected message: the 9th closes 1008."""
        node = make_node(self.clock)
        proto, tcp = connect(node, self.clock)
        proto.dataReceived(client_frame(9, b"p") * 200)
        frames = server_frames(tcp.written())
        self.assertEqual(close_code(frames), 1008)
        self.assertLessEqual(pongs(frames), 8)

    def test_preauth_close_drops_tcp_after_the_grace(self) -> None:
        """A peer that never answers a close sent before authentication loses its TCP connection after preauth_close_grace, not Autobahn's 5 s."""
        node = make_node(self.clock, preauth_close_grace=1.0)
        proto, tcp = connect(node, self.clock)
        proto.dataReceived(client_frame(9, b"p") * 20)
        self.assertEqual(close_code(server_frames(tcp.written())), 1008)
        self.clock.advance(0.9)
        self.assertFalse(tcp.aborted)
        proto.dataReceived(client_frame(9, b"p") * 20)  # the flood goes on, unanswered
        self.clock.advance(0.2)
        self.assertTrue(tcp.aborted)


class PingLimitTests(SynchronousTestCase):
    """WebSocket pings and pongs are client frames under frames_per_socket (§12)."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()

    def _flood(self, version: int) -> None:
        node = make_node(self.clock, frames_per_socket_burst=10, frames_per_socket_rate=1.0)
        proto, tcp = connect(node, self.clock)
        authenticate(proto, version)
        proto.dataReceived(client_frame(9, b"p") * 200)
        self.assertLessEqual(pongs(server_frames(tcp.written())), 11)
        self.assertFalse(tcp.reading)
        self.clock.advance(5)
        self.assertLessEqual(pongs(server_frames(tcp.written())), 17)
        self.assertGreaterEqual(pongs(server_frames(tcp.written())), 14)

    def test_v1_ping_flood_is_rate_limited(self) -> None:
        """200 pings on a v1 socket with a burst of 10 get about 10 pongs, then 1/s; reading stops."""
        self._flood(1)

    def test_v2_ping_flood_is_rate_limited(self) -> None:
        """200 pings on a v2 socket with a burst of 10 get about 10 pongs, then 1/s; reading stops."""
        self._flood(2)

    def test_client_pongs_count_too(self) -> None:
        """Unsolicited pongs spend the frame budget: an app ping after 200 of them waits."""
        node = make_node(self.clock, frames_per_socket_burst=10, frames_per_socket_rate=1.0)
        proto, tcp = connect(node, self.clock)
        authenticate(proto)
        proto.dataReceived(client_frame(10) * 200 + text("ping", {}))
        self.assertEqual(app_pongs(server_frames(tcp.written())), 0)


class PausedReadingTests(SynchronousTestCase):
    """A paused socket does not go on handling frames Autobahn has already buffered."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()

    def _burst(self, version: int) -> None:
        node = make_node(self.clock, frames_per_socket_burst=5, frames_per_socket_rate=1.0)
        proto, tcp = connect(node, self.clock)
        session = authenticate(proto, version)
        proto.dataReceived(text("ping", {}) * 50)
        self.assertEqual(app_pongs(server_frames(tcp.written())), 5)
        self.assertLessEqual(len(session.inbox), 1)
        self.assertFalse(tcp.reading)
        self.clock.pump([1.0] * 60)
        self.assertEqual(app_pongs(server_frames(tcp.written())), 50)
        self.assertTrue(tcp.reading)

    def test_v1_holds_buffered_frames_while_paused(self) -> None:
        """v1: 50 frames in one read with a burst of 5: at most one is parsed ahead, the rest wait unread."""
        self._burst(1)

    def test_v2_holds_buffered_frames_while_paused(self) -> None:
        """v2: 50 frames in one read with a burst of 5: at most one is parsed ahead, the rest wait unread."""
        self._burst(2)

    def test_v2_outbound_pause_stops_reading(self) -> None:
        """v2: a full send buffer stops reading, and frames already read are not handled meanwhile."""
        node = make_node(self.clock, outbound_pause_bytes=4096, outbound_resume_bytes=1024)
        proto, tcp = connect(node, self.clock)
        session = authenticate(proto, 2)
        for _ in range(100):
            proto.send_frame(b"x" * 100)
        proto.dataReceived(text("ping", {}) * 20)
        self.assertFalse(tcp.reading)
        self.assertLessEqual(len(session.inbox), 1)
        tcp.drain(10 ** 7)
        self.assertEqual(app_pongs(server_frames(tcp.written())), 20)


class JunkAckTests(SynchronousTestCase):
    """Only acks that match an unacknowledged delivery skip the frame limit (§12)."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.node = make_node(self.clock, frames_per_socket_burst=10, frames_per_socket_rate=1.0)
        self.proto, self.tcp = connect(self.node, self.clock)
        self.session: Any = authenticate(self.proto, 2)
        event = stored(1)
        self.session.deliver_live(event, wire.encode("event", {"seq": 1}))
        self.assertEqual(len(self.session.outbound.unacked), 1)

    def test_v2_junk_acks_are_limited(self) -> None:
        """200 acks that match nothing while one delivery is unacked spend the budget: a ping after them waits."""
        self.proto.dataReceived(text("ack", {"seq": 0}) * 200 + text("ping", {}))
        self.assertEqual(app_pongs(server_frames(self.tcp.written())), 0)
        self.assertFalse(self.tcp.reading)

    def test_v2_matching_ack_passes_an_empty_budget(self) -> None:
        """With the frame budget spent, an ack of the unacked delivery is still handled at once."""
        self.proto.dataReceived(text("ping", {}) * 10 + text("ack", {"seq": 1}) + text("ping", {}))
        self.assertEqual(self.session.outbound.acked, 1)
        self.assertEqual(app_pongs(server_frames(self.tcp.written())), 10)

    def test_v1_unmatched_acks_are_limited(self) -> None:
        """v1: acks naming a device_seq nothing was sent with spend the budget: a ping after them waits."""
        node = make_node(self.clock, frames_per_socket_burst=10, frames_per_socket_rate=1.0)
        proto, tcp = connect(node, self.clock)
        session = authenticate(proto, 1)
        session.deliver_live(stored(1), wire.encode("event", {"seq": 1}))
        proto.dataReceived(text("ack", {"device_seq": 99}) * 200 + text("ping", {}))
        self.assertEqual(app_pongs(server_frames(tcp.written())), 0)


class CloseTests(SynchronousTestCase):
    """Closes are counted once; a closing socket gets no more writes."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()

    def test_server_close_counted_once(self) -> None:
        """A session closed 4008 by the server adds exactly 1 to pocketbridge_closes_total{code=4008}."""
        node = make_node(self.clock)
        proto, tcp = connect(node, self.clock)
        session = authenticate(proto)
        counter = metrics.CLOSES.labels(code="4008")
        before = counter._value.get()
        session.close(4008, "Slow consumer")
        self.assertEqual(counter._value.get() - before, 1)

    def test_notice_to_a_closing_socket_is_not_written(self) -> None:
        """A presence notice routed to a socket the gateway is closing is dropped, not raised."""
        node = make_node(self.clock)
        proto, tcp = connect(node, self.clock)
        authenticate(proto)
        proto.close(1008, "Heartbeat timeout")
        size = len(tcp.written())
        node.hub.notify_user(USER, "device_status_changed", {"device_id": OTHER, "is_online": False})
        self.assertEqual(len(tcp.written()), size)


class HandshakeBudgetTests(SynchronousTestCase):
    """Handshake failures per IP are reserved at the upgrade: concurrency cannot overshoot (§12)."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()

    def test_concurrent_bad_handshakes_stay_within_the_budget(self) -> None:
        """Ten connections upgraded before any fails, budget 3: three fail 1008, seven are closed 4029."""
        node = make_node(self.clock, handshake_failures_per_ip=3)
        conns = [connect(node, self.clock) for _ in range(10)]
        for proto, _ in conns:
            proto.dataReceived(client_frame(1, b"not json"))
        codes = sorted(close_code(server_frames(tcp.written())) or 0 for _, tcp in conns)
        self.assertEqual(codes, [1008] * 3 + [4029] * 7)

    def test_handshakes_that_end_without_failing_give_the_token_back(self) -> None:
        """Connections that close without a client failure do not spend the budget."""
        node = make_node(self.clock, handshake_failures_per_ip=2)
        for _ in range(5):
            proto, tcp = connect(node, self.clock)
            self.assertIsNone(close_code(server_frames(tcp.written())))
            proto.onClose(False, 1006, "gone")
        proto, tcp = connect(node, self.clock)
        proto.dataReceived(client_frame(1, b"not json"))
        self.assertEqual(close_code(server_frames(tcp.written())), 1008)
