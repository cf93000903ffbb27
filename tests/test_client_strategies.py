"""
Unit tests of the two protocol strategies of ``Client`` (``ProtocolV1``,
``ProtocolV2``), each driven alone through a fake ``Host``: no socket, no
Autobahn, a ``Clock`` for time. The loopback tests in test_client_unit and
test_client_v2_unit run the same strategies inside a real ``Client``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.client import Client, ConnectionClosed, DecryptFailed, DeviceKeys, EventRejected, Identity
from pocketbridge.client.client import PROTOCOLS
from pocketbridge.client.connection import MalformedMessage
from pocketbridge.client.handshake import V1Handshake, V2Handshake
from pocketbridge.client.options import AUTO, ClientOptions
from pocketbridge.client.protocol_v1 import ProtocolV1
from pocketbridge.client.protocol_v2 import ProtocolV2
from pocketbridge.client.strategy import ServerReports
from pocketbridge.client.v2 import V2Outcomes

IDENTITY = Identity.from_seed(bytes([0x11]) * 32)
DEVICE_ID = "0b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b"
URL = "ws://test:3001/ws"


class FakeRaw:
    """The part of ``RawConnection`` a strategy touches: sends are recorded, close is remembered."""

    def __init__(self) -> None:
        self.sent: List[Any] = []
        self.close_info: Optional[Tuple[int, str]] = None
        self.closes: List[Tuple[int, Optional[str]]] = []

    def send_json(self, obj: Any) -> bytes:
        """Record ``obj``; ConnectionClosed once closed, as the real one."""
        if self.close_info is not None:
            raise ConnectionClosed(*self.close_info)
        self.sent.append(obj)
        return b""

    def close(self, code: int = 1000, reason: Optional[str] = None) -> None:
        """Remember the close the strategy asked for."""
        self.closes.append((code, reason))


class FakeHost:
    """A ``strategy.Host`` without a Client: what is recorded and queued lands in lists."""

    def __init__(self, clock: Clock, keys: Optional[DeviceKeys] = None, keys_path: Optional[str] = None) -> None:
        self.reactor = clock
        self.url = URL
        self.identity = IDENTITY
        self.device_id = DEVICE_ID
        self.device_name: Optional[str] = "phone"
        self.device_type: Optional[str] = "mobile"
        self.auto_ack = True
        self.keep_history = True
        self.keys = keys
        self.keys_path = keys_path
        self.server_pins: Dict[str, str] = keys.server_pins if keys is not None else {}
        self.last_seq = 0
        self.raw: Optional[FakeRaw] = FakeRaw()
        self.reports = ServerReports()
        self.outcomes = V2Outcomes()
        self.last_acked_own = 0
        self.recorded: List[Dict[str, Any]] = []
        self.queued: List[Dict[str, Any]] = []

    def established_connection(self) -> FakeRaw:
        """The fake socket, or ConnectionClosed once it closed."""
        if self.raw is None:
            raise ConnectionClosed(1006, "not connected")
        if self.raw.close_info is not None:
            raise ConnectionClosed(*self.raw.close_info)
        return self.raw

    def record_event(self, event: Dict[str, Any]) -> None:
        """History and on_event, in one list."""
        self.recorded.append(event)

    def queue_event(self, event: Dict[str, Any]) -> None:
        """The next_event queue, as a list."""
        self.queued.append(event)

    @property
    def sent(self) -> List[Any]:
        """Everything the strategy sent."""
        assert self.raw is not None
        return self.raw.sent


def event(seq: int, device_seq: int = 1, event_id: Optional[str] = None) -> Dict[str, Any]:
    """A received event payload with ``seq`` (event_id derived from it unless given)."""
    return {"seq": seq, "device_seq": device_seq, "event_id": event_id or "00000000-0000-4000-8000-{:012d}".format(seq)}


class StrategyTableTests(SynchronousTestCase):
    """The Client picks its strategy once, from the table."""

    def test_table_and_choice(self) -> None:
        """PROTOCOLS has v1 and v2; a Client reports the version it was built with and refuses others."""
        self.assertEqual(PROTOCOLS, {1: ProtocolV1, 2: ProtocolV2})
        clock = Clock()
        self.assertEqual(Client(clock, URL, IDENTITY, protocol_version=2).protocol_version, 2)
        for bad in (0, 3, True, "1", 1.0):
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, Client, clock, URL, IDENTITY, protocol_version=bad)

    def test_options_collect_the_tuning_keywords(self) -> None:
        """The constructor's tuning keywords land in one frozen ClientOptions."""
        client = Client(Clock(), URL, IDENTITY, flat_hello=True, server_key="ab" * 32, ack_interval=0.5)
        self.assertEqual((client.options.flat_hello, client.options.server_key, client.options.ack_interval),
                         (True, "ab" * 32, 0.5))
        self.assertRaises(AttributeError, setattr, client.options, "ack_interval", 1.0)
        self.assertIsInstance(client.options, ClientOptions)


class ProtocolV1Tests(SynchronousTestCase):
    """ProtocolV1 against a fake host."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.host = FakeHost(self.clock)
        self.v1 = ProtocolV1(self.host, ClientOptions(flat_hello=True, server_key="AB" * 32))
        self.v1.reset(0)

    def test_handshake_and_resume_point(self) -> None:
        """The handshake is v1 for the host's device with the options' framing and pin; there is no resume_from."""
        hs = self.v1.handshake(self.v1.resume_point(AUTO))
        self.assertIsInstance(hs, V1Handshake)
        assert isinstance(hs, V1Handshake)
        self.assertEqual((hs.device_id, hs.device_name, hs.device_type, hs.flat, hs.server_key),
                         (DEVICE_ID, "phone", "mobile", True, "ab" * 32))
        self.assertIsNone(self.v1.resume_point(7))

    def test_event_acked_with_sender_seq_then_recorded(self) -> None:
        """A relayed event is acked with the sender's device_seq, then recorded and queued; last_seq grows."""
        self.v1.receive("event", event(9, device_seq=4))
        self.assertEqual(self.host.sent, [{"type": "ack", "payload": {"device_seq": 4}}])
        self.assertEqual(([e["seq"] for e in self.host.recorded], [e["seq"] for e in self.host.queued]), ([9], [9]))
        self.assertEqual(self.host.last_seq, 9)
        self.v1.receive("event", event(3))
        self.assertEqual(self.host.last_seq, 9, "last_seq never goes back")

    def test_no_ack_without_auto_ack_or_connection(self) -> None:
        """auto_ack off sends nothing; a closed socket loses the ack but still records the event."""
        self.host.auto_ack = False
        self.v1.receive("event", event(1))
        self.assertEqual(self.host.sent, [])
        self.host.auto_ack = True
        assert self.host.raw is not None
        self.host.raw.close_info = (1006, "gone")
        self.v1.receive("event", event(2))
        self.assertEqual(len(self.host.recorded), 2)

    def test_replay_request_and_unsolicited_first_page(self) -> None:
        """The pushed first page is reported, the next page answers the request sent with last_acked_own."""
        self.host.last_acked_own = 5
        d = self.v1.replay_request(10, None, "tok", None, None)
        self.assertEqual(self.host.sent, [{"type": "replay_request", "payload": {
            "last_ack_device_seq": 5, "limit": 10, "continuation_token": "tok"}}])
        pushed = {"events": [event(1)], "has_more": False}
        self.v1.receive("replay_response", pushed)
        self.assertNoResult(d)
        self.assertEqual(self.host.reports.unsolicited_pages, [pushed])
        answer = {"events": [], "has_more": False}
        self.v1.receive("replay_response", answer)
        self.assertEqual(self.successResultOf(d), answer)

    def test_catch_up_follows_continuation_tokens(self) -> None:
        """catch_up asks again with each page's token until has_more is false, and returns the replayed events."""
        self.v1.reset(3)  # a positive watermark: no page comes unasked
        d = self.v1.catch_up(2, None)
        self.v1.receive("replay_response", {"events": [event(1), event(2)], "has_more": True, "continuation_token": "t1"})
        self.v1.receive("replay_response", {"events": [event(3)], "has_more": False})
        self.assertEqual([e["seq"] for e in self.successResultOf(d)], [1, 2, 3])
        self.assertEqual([m["payload"].get("continuation_token") for m in self.host.sent if m["type"] == "replay_request"],
                         [None, "t1"])

    def test_closed_fails_waiting_requests_and_malformed_is_ignored(self) -> None:
        """A bad frame leaves the socket open; a close fails the page a request waits for."""
        self.v1.malformed(MalformedMessage("x"))
        assert self.host.raw is not None
        self.assertEqual(self.host.raw.closes, [])
        d = self.v1.replay_request(None, 0, None, None, 2)
        self.v1.closed(ConnectionClosed(1001, "bye"))
        self.assertEqual(self.failureResultOf(d, ConnectionClosed).value.code, 1001)

    def test_v2_calls_refused(self) -> None:
        """ack_seq and wait_caught_up are v2 calls; a v1 client says so instead of waiting for ever."""
        self.assertRaises(TypeError, self.v1.ack_seq, 1)
        self.assertRaises(TypeError, self.v1.wait_caught_up, None)
        self.assertEqual(self.host.sent, [])


class ProtocolV2Tests(SynchronousTestCase):
    """ProtocolV2 against a fake host."""

    def make(self, keys: Optional[DeviceKeys] = None, keys_path: Optional[str] = None, **options: Any) -> ProtocolV2:
        """A v2 strategy on a fresh fake host (``self.host``), with a connection started."""
        self.clock = Clock()
        self.host = FakeHost(self.clock, keys, keys_path)
        v2 = ProtocolV2(self.host, ClientOptions(**options))
        v2.reset(0)
        return v2

    def test_resume_point(self) -> None:
        """AUTO resumes from last_seq when it is known and resume is on; None and integers pass through."""
        v2 = self.make()
        self.assertIsNone(v2.resume_point(AUTO))
        self.host.last_seq = 7
        self.assertEqual((v2.resume_point(AUTO), v2.resume_point(None), v2.resume_point(3)), (7, None, 3))
        off = self.make(resume=False)
        self.host.last_seq = 7
        self.assertIsNone(off.resume_point(AUTO))

    def test_handshake_uses_host_pins_and_address(self) -> None:
        """The handshake checks and fills the host's pins under the URL's address, with resume_from."""
        v2 = self.make(server_key="cd" * 32)
        hs = v2.handshake(4)
        self.assertIsInstance(hs, V2Handshake)
        assert isinstance(hs, V2Handshake)
        self.assertIs(hs.pins, self.host.server_pins)
        self.assertEqual((hs.server_address, hs.resume_from, hs.server_key), ("test:3001", 4, "cd" * 32))

    def test_pages_deduped_acked_and_caught_up(self) -> None:
        """Page events are deduplicated, acked cumulatively per page; caught_up ends the wait with its head."""
        v2 = self.make()
        waiting = v2.wait_caught_up(None)
        done = v2.catch_up(100, None)
        v2.receive("replay_response", {"events": [event(1), event(2), "junk"]})
        v2.receive("replay_response", {"events": [event(2), event(3)]})
        self.assertNoResult(waiting)
        v2.receive("caught_up", {"seq": 3})
        self.assertEqual(self.successResultOf(waiting), 3)
        self.assertEqual([e["seq"] for e in self.successResultOf(done)], [1, 2, 3])
        self.assertEqual([e["seq"] for e in self.host.queued], [1, 2, 3])
        self.assertEqual(self.host.sent, [{"type": "ack", "payload": {"seq": 2}}, {"type": "ack", "payload": {"seq": 3}}])
        self.assertEqual(self.host.last_seq, 3)

    def test_live_acks_coalesced_and_flushed_before_close(self) -> None:
        """With ack_interval, live events share one ack after the interval; before_close sends one still due."""
        v2 = self.make(ack_interval=1.0)
        v2.receive("event", event(1))
        v2.receive("event", event(2))
        self.assertEqual(self.host.sent, [])
        self.clock.advance(1.0)
        self.assertEqual(self.host.sent, [{"type": "ack", "payload": {"seq": 2}}])
        v2.receive("event", event(3))
        v2.before_close()
        self.assertEqual(self.host.sent[-1], {"type": "ack", "payload": {"seq": 3}})
        self.clock.advance(5)
        self.assertEqual(len(self.host.sent), 2, "the flushed ack's timer was cancelled")

    def test_errors_fail_their_send_or_are_reported(self) -> None:
        """An event error fails the matching send with EventRejected; every error is kept in reports."""
        v2 = self.make()
        d = self.host.outcomes.expect("e1", 1)
        v2.receive("error", {"in_reply_to": "event", "code": "not_owner", "message": "no", "event_id": "e1"})
        self.assertEqual(self.failureResultOf(d, EventRejected).value.code, "not_owner")
        v2.receive("error", {"in_reply_to": "ack", "code": "bad_request", "message": "?"})
        self.assertEqual([e["code"] for e in self.host.reports.errors], ["not_owner", "bad_request"])

    def test_resync_and_expiry_reported(self) -> None:
        """resync_required reaches reports and on_resync (whose failure is logged); expiry is reported."""
        seen: List[Dict[str, Any]] = []

        def on_resync(payload: Dict[str, Any]) -> None:
            seen.append(payload)
            raise ValueError("app bug")

        v2 = self.make(on_resync=on_resync)
        v2.receive("resync_required", {"reason": "retention", "oldest_seq": 6})
        v2.receive("session_expiring_soon", {"expires_at": 1})
        self.assertEqual(seen, [{"reason": "retention", "oldest_seq": 6}])
        self.assertEqual(self.host.reports.resync, seen[0])
        self.assertEqual(self.host.reports.expiring, {"expires_at": 1})
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_malformed_frame_closes_1008(self) -> None:
        """A frame that does not decrypt, or is not JSON, closes the channel with 1008."""
        v2 = self.make()
        v2.malformed(DecryptFailed("tag"))
        v2.malformed(MalformedMessage("json"))
        assert self.host.raw is not None
        self.assertEqual(self.host.raw.closes, [(1008, "Decrypt failed"), (1008, "Invalid message format")])

    def test_replay_request_waits_for_the_running_catch_up(self) -> None:
        """A replay_request mid catch-up is sent at caught_up and fires with its own head; bad arguments raise."""
        v2 = self.make()
        self.assertRaises(TypeError, v2.replay_request, 100, None, None, None, None)
        self.assertRaises(ValueError, v2.replay_request, 100, None, None, -1, None)
        v2.receive("replay_response", {"events": [event(1), event(2)]})
        d = v2.replay_request(None, None, None, 1, None)
        self.assertNotIn({"type": "replay_request", "payload": {"resume_from": 1}}, self.host.sent)
        v2.receive("caught_up", {"seq": 2})
        self.assertIn({"type": "replay_request", "payload": {"resume_from": 1}}, self.host.sent)
        v2.receive("replay_response", {"events": [event(2)]})
        self.assertEqual([e["seq"] for e in self.host.queued], [1, 2, 2], "the id above resume_from was forgotten")
        v2.receive("caught_up", {"seq": 2})
        self.assertEqual(self.successResultOf(d), 2)

    def test_close_fails_waiters_and_saves(self) -> None:
        """A close fails wait_caught_up and saves last_received_seq to the key file; a timeout fails alone."""
        keys = DeviceKeys(IDENTITY, DEVICE_ID)
        path = self.mktemp()
        v2 = self.make(keys, path)
        timed = v2.wait_caught_up(2)
        self.clock.advance(2)
        self.failureResultOf(timed, DeferTimeoutError)
        d = v2.wait_caught_up(None)
        v2.receive("event", event(4))
        v2.closed(ConnectionClosed(4008, "drain"))
        self.assertEqual(self.failureResultOf(d, ConnectionClosed).value.code, 4008)
        self.assertEqual(DeviceKeys.load(path).last_received_seq, 4)

    def test_new_pin_saved_at_once(self) -> None:
        """A handshake that pinned a new key is reported and saved with the key file."""
        keys = DeviceKeys(IDENTITY, DEVICE_ID)
        path = self.mktemp()
        v2 = self.make(keys, path)

        class Pinned:
            pin_status = "new"

        keys.server_pins["test:3001"] = "ef" * 32
        v2.established(Pinned())
        self.assertEqual(self.host.reports.pin_status, "new")
        self.assertEqual(DeviceKeys.load(path).server_pins, {"test:3001": "ef" * 32})
