"""
Unit tests of the parts a ``Client`` is composed of, each alone: ``Inbox``
(history, ``next_event``, ``wait_for``, ``on_event``), ``Outbox``
(``device_seq`` numbering, the event message, ack matching) and
``run_handshake`` (the handshake loop and what it does to the socket on
failure). In memory: a ``Clock`` and small fakes, no socket. The loopback
tests in test_client_unit and test_client_v2_unit run them inside a Client.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.client import Client, ConnectionClosed, DeviceKeys, Identity
from pocketbridge.client._util import WaitQueue
from pocketbridge.client.establish import run_handshake
from pocketbridge.client.handshake import HandshakeError
from pocketbridge.client.inbox import Inbox
from pocketbridge.client.options import OMIT
from pocketbridge.client.outbox import Outbox

IDENTITY = Identity.from_seed(bytes([0x22]) * 32)
DEVICE_ID = "5d6a3c1e-2b4f-4a8e-9c7d-0e1f2a3b4c5d"


class InboxTests(SynchronousTestCase):
    """What a caller reads and waits for of the received side."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.seen: List[Dict[str, Any]] = []
        self.inbox = Inbox(self.clock, True, self.seen.append)

    def test_history_queue_and_callback(self) -> None:
        """A recorded and queued event is in the history, given to on_event and returned by next_event."""
        self.inbox.record_message({"type": "event", "payload": {"n": 1}})
        self.inbox.record_event({"n": 1})
        self.inbox.queue_event({"n": 1})
        self.assertEqual(self.inbox.messages, [{"type": "event", "payload": {"n": 1}}])
        self.assertEqual(self.inbox.events_received, [{"n": 1}])
        self.assertEqual(self.seen, [{"n": 1}])
        self.assertEqual(self.successResultOf(self.inbox.next_event()), {"n": 1})

    def test_without_history_only_the_callback_runs(self) -> None:
        """keep_history=False stores and queues nothing; on_event is still called."""
        self.inbox.keep_history = False
        self.inbox.record_message({"type": "event"})
        self.inbox.record_event({"n": 2})
        self.inbox.queue_event({"n": 2})
        self.assertEqual((self.inbox.messages, self.inbox.events_received), ([], []))
        self.assertEqual(self.seen, [{"n": 2}])
        d = self.inbox.next_event(timeout=1)
        self.clock.advance(1)
        self.failureResultOf(d, DeferTimeoutError)

    def test_failing_callback_is_logged_not_raised(self) -> None:
        """An on_event that raises does not stop the event from being recorded."""
        def boom(event: Dict[str, Any]) -> None:
            raise ValueError("callback bug")

        self.inbox.on_event = boom
        self.inbox.record_event({"n": 3})
        self.assertEqual(self.inbox.events_received, [{"n": 3}])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_wait_for_looks_back_from_since(self) -> None:
        """wait_for finds a message already received after ``since``, not one before it."""
        self.inbox.record_message({"type": "pong", "payload": {"n": 1}})
        self.assertEqual(self.successResultOf(self.inbox.wait_for("pong"))["payload"], {"n": 1})
        pending = self.inbox.wait_for("pong", since=1)
        self.assertNoResult(pending)
        message = {"type": "pong", "payload": {"n": 2}}
        self.inbox.record_message(message)
        self.inbox.notify("other", {"type": "other"})
        self.assertNoResult(pending)
        self.inbox.notify("pong", message)
        self.assertIs(self.successResultOf(pending), message)

    def test_wait_for_times_out_and_cancels(self) -> None:
        """A watcher times out on the clock; a cancelled one is not fired later."""
        timed = self.inbox.wait_for("x", timeout=2, since=None)
        self.clock.advance(2)
        self.failureResultOf(timed, DeferTimeoutError)
        cancelled = self.inbox.wait_for("x", timeout=None, since=None)
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        self.inbox.notify("x", {"type": "x"})
        self.assertEqual(self.inbox._watchers, [])

    def test_close_fails_waiters_until_reopened(self) -> None:
        """After closed: queued events first, then ConnectionClosed; watchers fail; opened() resets."""
        self.inbox.queue_event({"n": 4})
        watcher = self.inbox.wait_for("x", since=None)
        self.inbox.closed(ConnectionClosed(4001, "bye"))
        self.assertEqual(self.failureResultOf(watcher, ConnectionClosed).value.code, 4001)
        self.assertEqual(self.successResultOf(self.inbox.next_event()), {"n": 4})
        self.assertEqual(self.failureResultOf(self.inbox.next_event(), ConnectionClosed).value.code, 4001)
        self.assertEqual(self.failureResultOf(self.inbox.wait_for("x"), ConnectionClosed).value.reason, "bye")
        self.inbox.opened()
        self.assertNoResult(self.inbox.next_event(timeout=None))
        self.assertNoResult(self.inbox.wait_for("x", timeout=None))


class FakeRaw:
    """The part of ``RawConnection`` the Outbox and run_handshake use."""

    def __init__(self, clock: Clock) -> None:
        self.sent: List[Any] = []
        self.incoming: WaitQueue[Any] = WaitQueue(clock)
        self.codecs: List[Any] = []
        self.closes: List[Tuple[int, Optional[str]]] = []
        self.aborted = False
        self.fail_sends = False

    def send_json(self, obj: Any) -> bytes:
        """Record ``obj`` (or fail as a closing socket does)."""
        if self.fail_sends:
            raise ConnectionClosed(1006, "closing")
        self.sent.append(obj)
        return b""

    def next_message(self, timeout: Optional[float] = 5.0) -> "Deferred[Any]":
        """The next message the test put in ``incoming``."""
        return self.incoming.get(timeout)

    def set_codec(self, codec: Any) -> None:
        """Remember the codec installed."""
        self.codecs.append(codec)

    def close(self, code: int = 1000, reason: Optional[str] = None) -> None:
        """Remember a close."""
        self.closes.append((code, reason))

    def abort(self) -> None:
        """Remember an abort."""
        self.aborted = True


class FakeSender:
    """An ``outbox.Sender``: the device and an open fake connection."""

    def __init__(self, clock: Clock, keys: Optional[DeviceKeys] = None) -> None:
        self.reactor = clock
        self.identity = IDENTITY
        self.device_id = DEVICE_ID
        self.keys = keys
        self.raw: Optional[FakeRaw] = FakeRaw(clock)

    def established_connection(self) -> Any:
        """The fake connection, or ConnectionClosed without one."""
        if self.raw is None:
            raise ConnectionClosed(1006, "not connected")
        return self.raw


class OutboxTests(SynchronousTestCase):
    """Numbering, the event message and ack matching."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.keys = DeviceKeys(identity=IDENTITY, device_id=DEVICE_ID, next_device_seq=1)
        self.sender = FakeSender(self.clock, self.keys)
        self.outbox = Outbox(self.sender, next_device_seq=3)

    def send(self, **kw: Any) -> "Deferred[Dict[str, Any]]":
        """One send with the defaults of ``Client.send_event``, overridden by ``kw``."""
        args: Dict[str, Any] = dict(ttl=None, event_id=None, device_seq=None, user_id=None, extra=None, timeout=None)
        args.update(kw)
        return self.outbox.send("s1", "note", "AAAA", **args)

    def test_event_message_and_numbering(self) -> None:
        """The event carries the device and the next device_seq; the counter and the key file advance."""
        self.outbox.established(last_ack_device_seq=7)
        d = self.send(ttl=60, extra={"stream_seq": OMIT, "x": 1})
        assert self.sender.raw is not None
        message = self.sender.raw.sent[-1]
        self.assertEqual(message["type"], "event")
        payload = message["payload"]
        self.assertEqual((payload["device_seq"], payload["device_id"], payload["user_id"]),
                         (8, DEVICE_ID, IDENTITY.user_id))
        self.assertEqual((payload["ttl"], payload["x"], "stream_seq" in payload), (60, 1, False))
        self.assertEqual((self.outbox.next_device_seq, self.keys.next_device_seq), (9, 9))
        self.outbox.match_ack({"event_id": payload["event_id"], "device_seq": 8, "seq": 1})
        self.assertEqual(self.successResultOf(d)["seq"], 1)
        self.assertEqual(self.outbox.last_acked_own, 8)

    def test_dropped_ack_does_not_advance(self) -> None:
        """A v1 ``dropped`` ack fires the send but is not counted as stored."""
        d = self.send(device_seq=5)
        event_id = self.sender.raw.sent[-1]["payload"]["event_id"] if self.sender.raw else None
        self.outbox.match_ack({"event_id": event_id, "device_seq": 5, "dropped": True})
        self.assertTrue(self.successResultOf(d)["dropped"])
        self.assertEqual(self.outbox.last_acked_own, 0)

    def test_closed_connection_fails_and_registers_nothing(self) -> None:
        """No connection, or a send that fails under way: ConnectionClosed, nothing awaits an ack."""
        self.sender.raw = None
        self.failureResultOf(self.send(), ConnectionClosed)
        self.sender.raw = FakeRaw(self.clock)
        self.sender.raw.fail_sends = True
        self.failureResultOf(self.send(), ConnectionClosed)
        self.assertEqual(len(self.outbox.outcomes), 0)

    def test_timeout_and_fail_all(self) -> None:
        """A send times out on the clock; fail_all fails the rest; reset forgets the connection's state."""
        timed = self.send(timeout=1)
        waiting = self.send()
        self.clock.advance(1)
        self.failureResultOf(timed, DeferTimeoutError)
        self.outbox.fail_all(ConnectionClosed(1001, "going away"))
        self.failureResultOf(waiting, ConnectionClosed)
        self.outbox.reset(4)
        self.assertEqual((len(self.outbox.outcomes), self.outbox.last_acked_own), (0, 4))


class FakeHandshake:
    """A handshake object as ``run_handshake`` drives it; ``fail`` makes server_hello raise."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def client_hello(self) -> Dict[str, Any]:
        """The first message."""
        return {"type": "client_hello"}

    def on_server_hello(self, payload: Dict[str, Any]) -> Dict[str, Any]:
        """client_auth, or HandshakeError."""
        if self.fail:
            raise HandshakeError("bad server_hello")
        return {"type": "client_auth"}

    def codec(self) -> str:
        """A stand-in codec."""
        return "codec"

    def on_session_established(self, payload: Dict[str, Any]) -> Dict[str, Any]:
        """The payload, as checked."""
        return dict(payload)


class RunHandshakeTests(SynchronousTestCase):
    """The handshake loop over a fake connection."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.raw = FakeRaw(self.clock)

    def drive(self, handshake: FakeHandshake, timeout: Optional[float] = 5.0) -> "Deferred[Dict[str, Any]]":
        """``run_handshake`` as a Deferred."""
        return Deferred.fromCoroutine(run_handshake(self.raw, handshake, timeout))  # type: ignore[arg-type]

    def test_success_installs_the_codec_before_auth(self) -> None:
        """hello, (other types ignored), server_hello → codec then client_auth, session_established."""
        d = self.drive(FakeHandshake())
        self.raw.incoming.put({"type": "noise"})
        self.raw.incoming.put({"type": "server_hello", "payload": {}})
        self.assertEqual((self.raw.sent, self.raw.codecs), ([{"type": "client_hello"}, {"type": "client_auth"}],
                                                           ["codec"]))
        self.raw.incoming.put({"type": "session_established", "payload": {"device_id": DEVICE_ID}})
        self.assertEqual(self.successResultOf(d), {"device_id": DEVICE_ID})
        self.assertEqual((self.raw.closes, self.raw.aborted), ([], False))

    def test_handshake_error_closes_1000(self) -> None:
        """A HandshakeError closes the socket cleanly and is raised."""
        d = self.drive(FakeHandshake(fail=True))
        self.raw.incoming.put({"type": "server_hello", "payload": {}})
        self.failureResultOf(d, HandshakeError)
        self.assertEqual((self.raw.closes, self.raw.aborted), ([(1000, "handshake failed")], False))

    def test_timeout_aborts(self) -> None:
        """No answer in time: the socket is aborted, not left half-open."""
        d = self.drive(FakeHandshake(), timeout=3)
        self.clock.advance(3)
        self.failureResultOf(d, DeferTimeoutError)
        self.assertEqual((self.raw.closes, self.raw.aborted), ([], True))

    def test_server_close_is_raised_as_is(self) -> None:
        """ConnectionClosed during the handshake neither closes nor aborts again."""
        d = self.drive(FakeHandshake())
        self.raw.incoming.fail(ConnectionClosed(4029, "too many"))
        self.assertEqual(self.failureResultOf(d, ConnectionClosed).value.code, 4029)
        self.assertEqual((self.raw.closes, self.raw.aborted), ([], False))


class ClientCompositionTests(SynchronousTestCase):
    """The Client's long-standing attributes read and write its parts."""

    def test_attributes_forward_to_the_parts(self) -> None:
        """keep_history/on_event are settable; messages/events_received/outcomes are the parts' own."""
        client = Client(Clock(), "ws://test/ws", IDENTITY, DEVICE_ID, keep_history=False, next_device_seq=6)
        self.assertFalse(client.inbox.keep_history)
        client.keep_history = True
        seen: List[Dict[str, Any]] = []
        client.on_event = seen.append
        client.record_event({"n": 1})
        self.assertTrue(client.inbox.keep_history)
        self.assertEqual((seen, client.events_received), ([{"n": 1}], [{"n": 1}]))
        self.assertIs(client.messages, client.inbox.messages)
        self.assertIs(client.outcomes, client.outbox.outcomes)
        self.assertEqual(client.next_device_seq, 6)
