"""
What a handshake cycle costs in storage (issue 11 item 1), in memory: a
returning device's connect -> v1/v2 handshake -> close makes exactly one
storage call (register + head + revocation in one transaction) and none on
close; the cursor and ``last_seen`` reach storage in the batched flush. The
order of refusals is kept (a revoked device is told 4003 even when a socket
limit is reached). No sockets, no sleeps.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.client.handshake import V1Handshake, V2Handshake
from pocketbridge.client.keys import Identity
from pocketbridge.protocol import wire
from pocketbridge.server.context import CursorBook
from pocketbridge.server.gateway.adapter import GatewayProtocol
from pocketbridge.server.gateway.connection import State
from pocketbridge.server.storage import DeviceState, StorageUnavailable
from tests.conn_fakes import DEVICE, FakeStorage, FakeTCP, client_frame, close_code, connect, make_node, server_frames

Key = Tuple[str, str]


class CountingStorage(FakeStorage):
    """Every storage call of the handshake path, recorded by name; the device row is the test's."""

    def __init__(self, device: Optional[DeviceState]) -> None:
        super().__init__()
        self.device = device
        self.calls: List[str] = []
        self.flushes: List[Tuple[Dict[Key, int], int, Dict[Key, int]]] = []
        self.fail_flush = False
        self.head_seq = 0  # the head register_and_read_head answers

    def get_device(self, user_id: str, device_id: str) -> "Deferred[Optional[DeviceState]]":
        self.calls.append("get_device")
        return succeed(self.device)

    def register_and_read_head(self, user_id: str, device_id: str, name: Optional[str], dtype: str,
                               now: int) -> "Deferred[Tuple[DeviceState, bool, int, int]]":
        self.calls.append("register_and_read_head")
        created = self.device is None
        if created:
            self.device = DeviceState(user_id, device_id, name, dtype, now, now, 0, 0, None)
        assert self.device is not None
        return succeed((self.device, created, self.head_seq, 0))

    def update_cursors(self, batch: Any, now: int, last_seen: Any = None) -> "Deferred[None]":
        self.calls.append("update_cursors")
        self.flushes.append((dict(batch), now, dict(last_seen or {})))
        if self.fail_flush:
            return fail(StorageUnavailable("down"))
        return succeed(None)

    def touch_device(self, *args: Any) -> "Deferred[None]":
        self.calls.append("touch_device")
        return succeed(None)

    def record_unacked(self, *args: Any) -> "Deferred[bool]":
        self.calls.append("record_unacked")
        return succeed(False)


def returning(user_id: str, delivered: int = 0, revoked_at: Optional[int] = None) -> DeviceState:
    return DeviceState(user_id, DEVICE, "laptop", "cli", 0, 0, 3, delivered, revoked_at)


class HandshakeCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_700_000_000)
        self.identity = Identity.generate()

    def node_with(self, device: Optional[DeviceState], **settings: Any) -> Tuple[Any, CountingStorage]:
        node = make_node(self.clock, **settings)
        storage = CountingStorage(device)
        node.storage = storage  # type: ignore[assignment]  # a fake
        node.cursors.storage = storage  # type: ignore[assignment]
        return node, storage

    def handshake(self, node: Any, version: int = 1) -> Tuple[GatewayProtocol, FakeTCP]:
        """connect -> client_hello -> client_auth, as the SDK sends them."""
        proto, tcp = connect(node, self.clock)
        hs: Any = V1Handshake(self.identity, DEVICE) if version == 1 else V2Handshake(self.identity, DEVICE)
        proto.dataReceived(client_frame(1, wire.dumps(hs.client_hello())))
        _, hello = wire.parse_message(server_frames(tcp.written())[-1][1])
        auth = wire.dumps(hs.on_server_hello(hello))
        codec = hs.codec()
        proto.dataReceived(client_frame(1, auth) if codec is None else client_frame(2, codec.seal(auth)))
        return proto, tcp


class RoundTripTests(HandshakeCase):
    """The storage calls of one handshake cycle."""

    def test_returning_device_v1_one_call_then_none_on_close(self) -> None:
        """A returning v1 device: one register_and_read_head to go live, no storage call on close."""
        node, storage = self.node_with(returning(self.identity.user_id))
        proto, tcp = self.handshake(node, 1)
        self.assertIs(proto.machine.state, State.LIVE)
        self.assertEqual(storage.calls, ["register_and_read_head"])
        proto.onClose(True, 1000, "")
        self.assertIs(proto.machine.state, State.GONE)
        self.assertEqual(storage.calls, ["register_and_read_head"])

    def test_returning_device_v2_one_call_then_none_on_close(self) -> None:
        """The same for v2 (the encrypted handshake)."""
        node, storage = self.node_with(returning(self.identity.user_id))
        proto, tcp = self.handshake(node, 2)
        self.assertIs(proto.machine.state, State.LIVE)
        proto.onClose(True, 1000, "")
        self.assertEqual(storage.calls, ["register_and_read_head"])

    def test_close_writes_last_seen_in_the_batched_write_then_notifies(self) -> None:
        """The device's last socket closes at T: no call then; close_delay later one write with last_seen = T, then the offline notice."""
        node, storage = self.node_with(returning(self.identity.user_id))
        notices: List[Tuple[bool, int]] = []
        node.announce_presence = lambda u, d, name, t, online, now: notices.append((online, len(storage.flushes)))
        proto, _ = self.handshake(node)
        self.clock.advance(1.5)
        closed_at = node.now_ms()
        proto.onClose(True, 1000, "")
        self.assertEqual((storage.flushes, [n for n in notices if not n[0]]), ([], []))
        self.clock.advance(CursorBook.close_delay)
        key = (self.identity.user_id, DEVICE)
        # v1 hands its cursor (0: nothing delivered) to the book on close; GREATEST keeps the stored one.
        self.assertEqual(storage.flushes, [({key: 0}, node.now_ms(), {key: closed_at})])
        self.assertEqual(storage.calls, ["register_and_read_head", "update_cursors"])
        self.assertEqual(notices[-1], (False, 1))  # sent after the write
        self.assertEqual(node.cursors.seen, {})

    def test_closes_within_the_delay_share_one_write(self) -> None:
        """Fifty devices closing within close_delay cost one storage call between them."""
        node, storage = self.node_with(returning(self.identity.user_id))
        protos = []
        for i in range(50):
            self.identity = Identity.generate()
            storage.device = returning(self.identity.user_id)
            protos.append(self.handshake(node)[0])
        calls = len(storage.calls)
        for proto in protos:
            proto.onClose(True, 1000, "")
            self.clock.advance(CursorBook.close_delay / 100)
        self.clock.advance(CursorBook.close_delay)
        self.assertEqual(storage.calls[calls:], ["update_cursors"])
        self.assertEqual(len(storage.flushes[0][2]), 50)

    def test_second_socket_closing_writes_nothing(self) -> None:
        """While another socket of the device is open its close marks no last_seen."""
        node, storage = self.node_with(returning(self.identity.user_id))
        first, _ = self.handshake(node)
        second, _ = self.handshake(node)
        first.onClose(True, 1000, "")
        self.assertEqual(node.cursors.seen, {})
        second.onClose(True, 1000, "")
        self.assertEqual(list(node.cursors.seen), [(self.identity.user_id, DEVICE)])

    def test_revoked_device_one_call_and_4003(self) -> None:
        """A revoked device is refused 4003 from the same single read, and its session leaves the hub."""
        node, storage = self.node_with(returning(self.identity.user_id, revoked_at=1))
        proto, tcp = self.handshake(node)
        self.assertEqual(close_code(server_frames(tcp.written())), 4003)
        self.assertEqual(storage.calls, ["register_and_read_head"])
        self.assertIsNone(proto.session)
        self.assertEqual(node.hub.sinks(self.identity.user_id), [])

    def test_revoked_wins_over_the_socket_limit(self) -> None:
        """At the device's socket limit a revoked device still gets 4003 (a device read of its own), not 4029."""
        node, storage = self.node_with(returning(self.identity.user_id, revoked_at=1), sockets_per_device=1)
        node.presence.claim(self.identity.user_id, DEVICE, "other-socket", 0, 1, 50)  # another socket holds the slot
        proto, tcp = self.handshake(node)
        self.assertEqual(close_code(server_frames(tcp.written())), 4003)
        self.assertEqual(storage.calls, ["get_device"])
        self.assertEqual(node.hub.sinks(self.identity.user_id), [])

    def test_socket_limit_refuses_4029(self) -> None:
        """At the device's socket limit a valid device is closed 4029 and never subscribed or registered."""
        node, storage = self.node_with(returning(self.identity.user_id), sockets_per_device=1)
        node.presence.claim(self.identity.user_id, DEVICE, "other-socket", 0, 1, 50)  # another socket holds the slot
        proto, tcp = self.handshake(node)
        self.assertEqual(close_code(server_frames(tcp.written())), 4029)
        self.assertEqual(storage.calls, ["get_device"])
        self.assertEqual(node.hub.sinks(self.identity.user_id), [])

    def test_reconnect_starts_at_the_unwritten_cursor(self) -> None:
        """A socket that reconnects before the flush starts at the cursor the node holds, not the stored one."""
        node, storage = self.node_with(returning(self.identity.user_id, delivered=2))
        storage.head_seq = 10
        node.cursors.update(self.identity.user_id, DEVICE, 7)
        proto, _ = self.handshake(node)
        assert proto.session is not None
        outbound: Any = proto.session.outbound
        self.assertEqual(outbound.replay_pos, 7)
        self.assertEqual(outbound.tracker.delivered(), 7)
        self.assertEqual(node.cursors.pending(self.identity.user_id, DEVICE), 7)


class CursorBookTests(SynchronousTestCase):
    """The book carries cursors and last_seen marks into one write, and keeps them when the write fails."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.storage = CountingStorage(None)
        self.book = CursorBook(self.storage, self.clock, 5.0, lambda: 1000)  # type: ignore[arg-type]

    def test_flush_carries_cursors_and_last_seen(self) -> None:
        """One update_cursors with the cursors, the flush time and the last_seen marks (newest mark wins)."""
        self.book.update("u", "a", 4)
        self.book.update("u", "a", 3)
        self.book.went_offline("u", "b", 900)
        self.book.went_offline("u", "b", 950)
        self.book.went_offline("u", "b", 920)
        self.book.flush()
        self.assertEqual(self.storage.flushes, [({("u", "a"): 4}, 1000, {("u", "b"): 950})])
        self.assertEqual((self.book.dirty, self.book.seen), ({}, {}))

    def test_nothing_pending_writes_nothing(self) -> None:
        """An idle book makes no storage call."""
        self.book.flush()
        self.assertEqual(self.storage.calls, [])

    def test_failed_flush_keeps_everything(self) -> None:
        """A failed write puts cursors and marks back (newer values win) for the next flush; the offline waiter still fires."""
        self.storage.fail_flush = True
        self.book.update("u", "a", 4)
        fired: List[None] = []
        self.book.went_offline("u", "b", 900).addCallback(fired.append)
        self.book.flush()
        self.assertEqual((self.book.dirty, self.book.seen), ({("u", "a"): 4}, {("u", "b"): 900}))
        self.assertEqual(self.book.writing, [])
        self.assertEqual(fired, [None])

    def test_went_offline_fires_after_the_write(self) -> None:
        """The Deferred of a mark fires when the write after the close is done, not before."""
        held: Deferred[None] = Deferred()
        self.storage.update_cursors = lambda *a: held  # type: ignore[method-assign]
        fired: List[None] = []
        self.book.went_offline("u", "b", 900).addCallback(fired.append)
        self.clock.advance(CursorBook.close_delay)
        self.assertEqual(fired, [])
        held.callback(None)
        self.assertEqual(fired, [None])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pending_reads_through_a_write_in_flight(self) -> None:
        """While a batch is being written its cursor still counts for a reconnect; afterwards storage has it."""
        held: Deferred[None] = Deferred()
        self.storage.update_cursors = lambda *a: held  # type: ignore[method-assign]
        self.book.update("u", "a", 4)
        self.book.flush()
        self.book.update("u", "a", 2)  # a lower value from another socket
        self.assertEqual(self.book.pending("u", "a"), 4)
        held.callback(None)
        self.assertEqual(self.book.pending("u", "a"), 2)
        self.assertEqual(self.book.pending("u", "z"), 0)
