"""
Unit tests for the client SDK and CLI: no sockets, no sleeps.

The loopback tests run the real ``Client``/``RawConnection``/Autobahn client
against a scripted Autobahn server over ``twisted.test.iosim`` on a Clock.
"""

from __future__ import annotations

import argparse
import io
import os
import stat
from typing import Any, Dict, List

import txaio
from twisted.internet.defer import CancelledError, TimeoutError as DeferTimeoutError
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.protocol import crypto
from pocketbridge.cli.main import build_parser
from pocketbridge.cli.commands import cmd_keygen
from pocketbridge.cli.support import CliError, describe
from pocketbridge.cli.watch import render
from pocketbridge.client import (
    AckTracker,
    Client,
    ConnectionClosed,
    DeviceKeys,
    DeviceRevoked,
    HandshakeError,
    Identity,
    KeyFileError,
    MalformedMessage,
    RawConnection,
    ReconnectingClient,
    RetryPolicy,
    V1Handshake,
    parse_retry_after,
)
from pocketbridge.client.replay import ReplayPages
from pocketbridge.client.testing import ScriptedServer

# PROTOCOL.md §13
V = {
    "user_id": "d04ab232742bb4ab3a1368bd4615e4e6d0224ab71a016baf8520a332c9778737",
    "server_identity_pub": "a09aa5f47a6759802ff955f8dc2d2a14a5c99d23be97f864127ff9383455a4f0",
    "client_ephemeral_pub": "0451a7580833898ea1b183cbd7350a4099078c6ef1c1e18e970cd7683035f25e7d0110522712b0b5a7cff081685486984a94e6831edac46e7360fa9d834a7a81a1",
    "server_ephemeral_pub": "045b36890dacbd7c9a96bb74a1ee28b3d2d75b72e09a20ef25cf8e6fd8a9f0350d0e14bed8d4682a34d83538bdff5b96e89a6666ec0db5745d02fa1210072df75a",
    "client_digest": "074f3ff11869553fb59d5eae107810251a690023e5b4d88ace5e9c937ca86156",
    "server_signature": "8d3f8c4305d4f3af18a805bc815110d3f87151e2bd7be2bc3a01a1a1cc45f36578f06891604e9bcb0d8c19d18f7f3328db928277b86c3b62c299cb7823b1a802",
    "client_signature": "9773580cda4e5c2c4f9710be51babaeec9042628636517e5cf40ee3799d9f8c740cce32f3fbb60a1a0fe2e4e137e451eb31c3faa1586adb3c98fd0947c6c9a0c",
}
DEVICE_ID = "0b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b"
VECTOR_IDENTITY = Identity.from_seed(bytes([0x11]) * 32)


def vector_handshake(**kwargs: Any) -> V1Handshake:
    """A V1Handshake with the §13 client inputs."""
    return V1Handshake(
        VECTOR_IDENTITY, DEVICE_ID, ephemeral=crypto.ephemeral_from_scalar(bytes([0x33]) * 32), nonce_c="aa" * 32,
        **kwargs,
    )


def vector_server_hello(**changes: Any) -> Dict[str, Any]:
    """The §13 server_hello payload, with optional changes."""
    payload: Dict[str, Any] = {
        "server_ephemeral_pub": V["server_ephemeral_pub"],
        "nonce_s": "bb" * 32,
        "server_identity_pub": V["server_identity_pub"],
        "server_signature": V["server_signature"],
        "protocol_version": 1,
    }
    payload.update(changes)
    return payload


class HandshakeVectorTests(SynchronousTestCase):
    """The v1 handshake against the PROTOCOL.md §13 vectors."""

    def test_client_hello_carries_vector_point_and_nonce(self) -> None:
        """client_hello sends the §13 client_ephemeral_pub and nonce_c in an envelope."""
        hello = vector_handshake().client_hello()
        self.assertEqual(hello, {"type": "client_hello",
                                 "payload": {"client_ephemeral_pub": V["client_ephemeral_pub"], "nonce_c": "aa" * 32}})

    def test_vector_server_hello_accepted_and_client_signature_matches(self) -> None:
        """The §13 server_signature verifies and client_auth carries the §13 client digest/signature."""
        hs = vector_handshake()
        hs.client_hello()
        auth = hs.on_server_hello(vector_server_hello())
        self.assertEqual(hs.client_digest().hex(), V["client_digest"])
        self.assertEqual(auth["type"], "client_auth")
        self.assertEqual(auth["payload"]["user_id"], V["user_id"])
        self.assertEqual(auth["payload"]["device_id"], DEVICE_ID)
        self.assertEqual(auth["payload"]["client_signature"], V["client_signature"])
        self.assertRegex(auth["payload"]["nonce_c2"], "^[0-9a-f]{64}$")

    def test_forged_server_signature_rejected(self) -> None:
        """A server_signature with one flipped bit fails the handshake."""
        forged = ("0" if V["server_signature"][0] != "0" else "1") + V["server_signature"][1:]
        hs = vector_handshake()
        hs.client_hello()
        self.assertRaises(HandshakeError, hs.on_server_hello, vector_server_hello(server_signature=forged))

    def test_signature_by_another_key_rejected(self) -> None:
        """A valid signature by a key other than server_identity_pub is rejected."""
        other = crypto.signing_key_from_seed(bytes([0x55]) * 32)
        digest = crypto.v1_server_digest(V["server_identity_pub"], V["server_ephemeral_pub"], "aa" * 32, "bb" * 32)
        hs = vector_handshake()
        hs.client_hello()
        self.assertRaises(HandshakeError, hs.on_server_hello,
                          vector_server_hello(server_signature=other.sign(digest).signature.hex()))

    def test_pinned_server_key_mismatch_rejected(self) -> None:
        """With server_key pinned, a correctly signed hello from another identity is rejected."""
        hs = vector_handshake(server_key="ab" * 32)
        hs.client_hello()
        self.assertRaises(HandshakeError, hs.on_server_hello, vector_server_hello())

    def test_bad_server_hello_fields_rejected(self) -> None:
        """A wrong protocol_version, a bool version or an off-curve point fails the handshake."""
        off_curve = "04" + "00" * 64
        for change in ({"protocol_version": 2}, {"protocol_version": True}, {"protocol_version": None},
                       {"server_ephemeral_pub": off_curve}, {"nonce_s": "bb"}):
            hs = vector_handshake()
            hs.client_hello()
            with self.subTest(change=change):
                self.assertRaises(HandshakeError, hs.on_server_hello, vector_server_hello(**change))

    def test_session_established_checked(self) -> None:
        """session_established needs our device_id and an integer last_ack_device_seq."""
        for bad in ({"device_id": DEVICE_ID}, {"device_id": DEVICE_ID, "last_ack_device_seq": 1.0},
                    {"device_id": "0" * 8 + DEVICE_ID[8:], "last_ack_device_seq": 0}):
            hs = vector_handshake()
            hs.client_hello()
            hs.on_server_hello(vector_server_hello())
            self.assertRaises(HandshakeError, hs.on_session_established, bad)
        hs = vector_handshake()
        hs.client_hello()
        hs.on_server_hello(vector_server_hello())
        self.assertEqual(hs.on_session_established({"device_id": DEVICE_ID, "last_ack_device_seq": 7})
                         ["last_ack_device_seq"], 7)

    def test_flat_messages(self) -> None:
        """flat=True puts the client_hello and client_auth fields at the top level."""
        hs = vector_handshake(flat=True)
        hello = hs.client_hello()
        self.assertEqual(hello["client_ephemeral_pub"], V["client_ephemeral_pub"])
        self.assertNotIn("payload", hello)
        auth = hs.on_server_hello(vector_server_hello())
        self.assertEqual(auth["client_signature"], V["client_signature"])


class AckTrackerTests(SynchronousTestCase):
    """Matching acks to sent events."""

    def test_in_order_acks_with_a_dropped_one(self) -> None:
        """Three sends acked in order, the middle one dropped without seq, each resolve their own Deferred."""
        t = AckTracker()
        ds = [t.expect("E%d" % i, i) for i in (1, 2, 3)]
        self.assertTrue(t.match({"device_seq": 1, "event_id": "e1", "seq": 10, "stream_seq": 1}))
        self.assertTrue(t.match({"device_seq": 2, "event_id": "e2", "dropped": True}))
        self.assertTrue(t.match({"device_seq": 3, "event_id": "e3", "seq": 11, "stream_seq": 2}))
        acks = [self.successResultOf(d) for d in ds]
        self.assertEqual([a.get("seq") for a in acks], [10, None, 11])
        self.assertTrue(acks[1]["dropped"])
        self.assertEqual(len(t), 0)

    def test_unacked_event_does_not_shift_matching(self) -> None:
        """An event ignored without an ack leaves later acks matched to the right sends."""
        t = AckTracker()
        ignored, kept = t.expect("a", 1), t.expect("b", 2)
        t.match({"device_seq": 2, "event_id": "b", "seq": 5})
        self.assertNoResult(ignored)
        self.assertEqual(self.successResultOf(kept)["seq"], 5)

    def test_fallback_to_device_seq(self) -> None:
        """An ack without event_id (the event's id was not a string) matches by device_seq."""
        t = AckTracker()
        d1, d2 = t.expect(None, 4), t.expect(12345, 5)
        t.match({"device_seq": 5, "dropped": True})
        self.assertNoResult(d1)
        self.assertTrue(self.successResultOf(d2)["dropped"])

    def test_duplicates_resolve_fifo_and_stray_ack_ignored(self) -> None:
        """The same event sent twice gets its two acks in order; an unknown ack matches nothing."""
        t = AckTracker()
        d1, d2 = t.expect("x", 1), t.expect("x", 1)
        self.assertFalse(t.match({"device_seq": 9, "event_id": "zz", "seq": 1}))
        t.match({"device_seq": 1, "event_id": "x", "seq": 3, "n": 1})
        t.match({"device_seq": 1, "event_id": "x", "seq": 3, "n": 2})
        self.assertEqual((self.successResultOf(d1)["n"], self.successResultOf(d2)["n"]), (1, 2))

    def test_same_event_id_prefers_matching_device_seq(self) -> None:
        """With one event_id sent under two device_seqs, an ack goes to the send with its device_seq."""
        t = AckTracker()
        first, second = t.expect("x", 1), t.expect("x", 50)
        t.match({"device_seq": 50, "event_id": "x", "dropped": True})
        self.assertNoResult(first)
        self.assertTrue(self.successResultOf(second)["dropped"])

    def test_abandoned_send_consumes_its_ack(self) -> None:
        """A timed-out send's late ack is swallowed, not given to a later send with the same device_seq."""
        t = AckTracker()
        d1 = t.expect(None, 1)
        d1.cancel()
        self.failureResultOf(d1, CancelledError)
        d2 = t.expect(None, 1)
        t.match({"device_seq": 1, "dropped": True})
        self.assertNoResult(d2)

    def test_fail_all(self) -> None:
        """Closing fails every pending send with the close reason."""
        t = AckTracker()
        d = t.expect("a", 1)
        t.fail_all(ConnectionClosed(4029, "x"))
        self.assertEqual(self.failureResultOf(d, ConnectionClosed).value.code, 4029)


class ReplayPagesTests(SynchronousTestCase):
    """Matching replay pages to requests (PROTOCOL.md §7.3)."""

    def page(self, *seqs: int, has_more: bool = False) -> Dict[str, Any]:
        """A replay_response payload holding events with these seqs."""
        return {"events": [{"seq": n} for n in seqs], "has_more": has_more,
                **({"continuation_token": "T%d" % seqs[-1]} if has_more else {})}

    def test_nonempty_first_page_at_watermark_zero_is_the_push(self) -> None:
        """With last_ack_device_seq 0, a non-empty first page is the server's push, not our answer."""
        pages = ReplayPages(0)
        d = pages.expect()
        seen: List[int] = []
        self.assertFalse(pages.receive(self.page(1, 2, has_more=True), lambda e: seen.append(e["seq"])))
        self.assertNoResult(d)
        self.assertEqual(pages.continuation_token, "T2")
        self.assertTrue(pages.receive(self.page(3), lambda e: seen.append(e["seq"])))
        self.assertEqual(self.successResultOf(d)["events"], [{"seq": 3}])
        self.assertEqual(seen, [1, 2, 3])
        self.assertEqual([e["seq"] for e in pages.take_replayed()], [1, 2, 3])
        self.assertEqual(pages.take_replayed(), [])

    def test_empty_first_page_answers_the_request(self) -> None:
        """With an empty backlog there is no push: the empty first page answers our request."""
        pages = ReplayPages(0)
        d = pages.expect()
        self.assertTrue(pages.receive(self.page(), lambda e: None))
        self.assertEqual(self.successResultOf(d)["events"], [])

    def test_first_page_answers_when_watermark_positive(self) -> None:
        """With last_ack_device_seq > 0 the server never pushes, so the first page is an answer."""
        pages = ReplayPages(5)
        d = pages.expect()
        self.assertTrue(pages.receive(self.page(9), lambda e: None))
        self.assertEqual(len(self.successResultOf(d)["events"]), 1)

    def test_abandoned_request_swallows_its_page(self) -> None:
        """A timed-out request's page is dropped instead of answering the next request."""
        pages = ReplayPages(5)
        first, second = pages.expect(), pages.expect()
        first.cancel()
        self.failureResultOf(first, CancelledError)
        pages.receive(self.page(1), lambda e: None)
        self.assertNoResult(second)
        pages.receive(self.page(2), lambda e: None)
        self.assertEqual(self.successResultOf(second)["events"], [{"seq": 2}])


class DeviceKeysTests(SynchronousTestCase):
    """The device key file."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "sub", "device.json")
        old = os.umask(0o000)  # a careless umask must not widen the file mode
        self.addCleanup(os.umask, old)

    def test_round_trip_and_mode_0600(self) -> None:
        """save/load keeps every field, and the file is mode 0600."""
        keys = DeviceKeys.generate(device_name="laptop", device_type="cli")
        keys.next_device_seq, keys.last_received_seq = 42, 17
        keys.save(self.path)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        loaded = DeviceKeys.load(self.path)
        self.assertEqual(loaded.to_dict(), keys.to_dict())
        self.assertEqual(loaded.identity, keys.identity)

    def test_new_device_shares_the_user_key(self) -> None:
        """for_new_device keeps user_id and seed, with a new device_id and fresh counters."""
        keys = DeviceKeys.generate()
        keys.next_device_seq = 9
        other = keys.for_new_device("phone", "mobile")
        self.assertEqual(other.user_id, keys.user_id)
        self.assertNotEqual(other.device_id, keys.device_id)
        self.assertEqual(other.next_device_seq, 1)

    def test_invalid_files_rejected(self) -> None:
        """A missing file, non-JSON or a user_id not matching the seed raises KeyFileError."""
        self.assertRaises(KeyFileError, DeviceKeys.load, self.path)
        doc = DeviceKeys.generate().to_dict()
        doc["user_id"] = "ab" * 32
        self.assertRaises(KeyFileError, DeviceKeys.from_dict, doc)
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write("{nope")
        self.assertRaises(KeyFileError, DeviceKeys.load, self.path)

    def test_seed_never_in_repr(self) -> None:
        """repr() of Identity and DeviceKeys shows the user_id, never the seed."""
        keys = DeviceKeys.generate()
        for text in (repr(keys), repr(keys.identity)):
            self.assertNotIn(keys.identity.seed_hex, text)
            self.assertIn(keys.user_id, text)

    def test_identity_from_seed_hex(self) -> None:
        """Identity.from_seed_hex gives the §13 user_id for seed 11…11."""
        self.assertEqual(Identity.from_seed_hex("11" * 32).user_id, V["user_id"])
        self.assertRaises(ValueError, Identity.from_seed_hex, "xyz")

    def test_trailing_newline_is_not_valid(self) -> None:
        """The SDK validates like the server (``\\Z``): a seed, device_id or pin ending in a newline is refused."""
        self.assertRaises(ValueError, Identity.from_seed_hex, "11" * 32 + "\n")
        for field, value in (("device_id", DEVICE_ID + "\n"), ("server_pins", {"h:1": "ab" * 32 + "\n"})):
            doc = DeviceKeys.generate().to_dict()
            doc[field] = value
            with self.subTest(field=field):
                self.assertRaises(KeyFileError, DeviceKeys.from_dict, doc)
        hs = vector_handshake()
        hs.client_hello()
        self.assertRaises(HandshakeError, hs.on_server_hello, vector_server_hello(nonce_s="bb" * 32 + "\n"))


class RetryPolicyTests(SynchronousTestCase):
    """The close code → retry table of PROTOCOL.md §11."""

    def setUp(self) -> None:
        import random

        self.policy = RetryPolicy(rng=random.Random(1), base=1.0, cap=60.0, soon=1.0)

    def test_table(self) -> None:
        """4003 stops; 4029 waits N s; 1001/4008 reconnect within 1 s; others back off."""
        p = self.policy
        self.assertFalse(p.decide(4003, "Device revoked", 0).retry)
        d = p.decide(4029, "Too many connections; retry after 7 s", 0)
        self.assertTrue(d.retry)
        self.assertTrue(7 <= d.delay <= 8, d)
        for code in (1001, 4008):
            d = p.decide(code, "", 0)
            self.assertTrue(d.retry and 0 <= d.delay <= 1, (code, d))
        for code in (1000, 1002, 1006, 1007, 1008, 1009, 1011, 1013, None):
            d = p.decide(code, "", 3)
            self.assertTrue(d.retry and 4 <= d.delay <= 8, (code, d))

    def test_backoff_grows_and_is_capped(self) -> None:
        """Backoff doubles per attempt, stays within 50–100 % of its ceiling and never exceeds the cap."""
        for attempt in range(12):
            ceiling = min(60.0, 2.0 ** attempt)
            delay = self.policy.backoff(attempt)
            self.assertTrue(ceiling / 2 <= delay <= ceiling, (attempt, delay))
        self.assertLessEqual(self.policy.backoff(10**6), 60.0)

    def test_repeated_1001_backs_off(self) -> None:
        """1001 after a failed reconnect attempt uses backoff, not the 1 s fast path."""
        self.assertGreaterEqual(self.policy.decide(1001, "", 4).delay, 8)

    def test_parse_retry_after(self) -> None:
        """Only a reason ending in '; retry after N s' with N ≥ 1 yields N."""
        self.assertEqual(parse_retry_after("Rate limited; retry after 30 s"), 30)
        self.assertIsNone(parse_retry_after("retry after 30 s"))
        self.assertIsNone(parse_retry_after("x; retry after 0 s"))
        self.assertIsNone(parse_retry_after("x; retry after 5 s then"))
        self.assertEqual(self.policy.decide(4029, "no time given", 0).retry, True)


class LoopbackTestCase(SynchronousTestCase):
    """Base: a Clock as Autobahn's loop and a ScriptedServer."""

    def setUp(self) -> None:
        self.clock = Clock()
        old = txaio.config.loop
        txaio.config.loop = self.clock
        self.addCleanup(setattr, txaio.config, "loop", old)
        self.server = ScriptedServer(self.clock)

    def make_client(self, **kwargs: Any) -> Client:
        """A Client of the §13 user wired to the scripted server."""
        kwargs.setdefault("device_id", DEVICE_ID)
        return Client(self.clock, "ws://test/ws", VECTOR_IDENTITY, connector=self.server.connector, **kwargs)

    def connected(self, **kwargs: Any) -> Client:
        """A connected Client."""
        client = self.make_client(**kwargs)
        d = client.connect()
        self.server.flush()
        self.successResultOf(d)
        return client

    def event(self, seq: int, device_seq: int) -> Dict[str, Any]:
        """A relayed event from another device."""
        return {"event_id": "00000000-0000-7000-8000-%012d" % seq, "user_id": V["user_id"],
                "device_id": "11111111-1111-4111-8111-111111111111", "device_seq": device_seq,
                "stream_id": "s", "stream_seq": seq, "type": "t", "encrypted_payload": "aGk=",
                "created_at": 1, "seq": seq}


class ClientLoopbackTests(LoopbackTestCase):
    """Client + RawConnection + Autobahn against a scripted server."""

    def test_connect_signs_vector_digest(self) -> None:
        """Over the wire, the client verifies the §13 server_hello and sends the §13 client_signature."""
        client = self.make_client(
            handshake_factory=lambda c: vector_handshake(device_type=c.device_type))
        d = client.connect()
        self.server.flush()
        est = self.successResultOf(d)
        self.assertEqual(est["last_ack_device_seq"], 0)
        self.assertEqual(self.server.client_auths[0]["client_signature"], V["client_signature"])

    def test_forged_server_hello_fails_connect_and_closes(self) -> None:
        """A tampered server_signature makes connect fail with HandshakeError and the socket close."""
        self.server.mutate_server_hello = lambda p: p.update(server_signature="00" * 64)
        client = self.make_client()
        d = client.connect()
        self.server.flush()
        self.failureResultOf(d, HandshakeError)
        self.assertEqual(self.server.client_auths, [])
        self.assertIsNotNone(client.raw.close_info)

    def test_device_seq_starts_after_server_watermark(self) -> None:
        """After connect the next device_seq is last_ack_device_seq + 1."""
        self.server.last_ack_device_seq = 41
        self.assertEqual(self.connected().next_device_seq, 42)

    def test_pipelined_sends_get_their_own_acks(self) -> None:
        """Three pipelined events, acked in order with the middle dropped, resolve the right Deferreds."""
        def on_message(proto: Any, msg: Any) -> None:
            if msg["type"] == "event":
                p = msg["payload"]
                if p["device_seq"] == 2:
                    proto.send({"type": "ack", "payload": {"device_seq": 2, "event_id": p["event_id"], "dropped": True}})
                else:
                    proto.send({"type": "ack", "payload": {"device_seq": p["device_seq"], "event_id": p["event_id"],
                                                           "seq": p["device_seq"] * 10, "stream_seq": 1}})
        self.server.on_message = on_message
        client = self.connected()
        ds = [client.send_event_nowait("clipboard:main", "clipboard:text", "aGVsbG8=") for _ in range(3)]
        self.server.flush()
        acks = [self.successResultOf(d) for d in ds]
        self.assertEqual([a.get("seq") for a in acks], [10, None, 30])
        self.assertTrue(acks[1]["dropped"])
        sent = [m["payload"] for m in self.server.received if m["type"] == "event"]
        self.assertEqual([e["device_seq"] for e in sent], [1, 2, 3])
        self.assertEqual(sent[0]["user_id"], V["user_id"])
        self.assertEqual(sent[0]["stream_seq"], 0)

    def test_live_event_is_queued_and_acked_with_sender_seq(self) -> None:
        """A relayed event reaches next_event and is acked with the sender's device_seq."""
        client = self.connected()
        self.server.current.send({"type": "event", "payload": self.event(5, 77)})
        self.server.flush()
        self.assertEqual(self.successResultOf(client.next_event())["seq"], 5)
        acks = [m for m in self.server.received if m["type"] == "ack"]
        self.assertEqual(acks, [{"type": "ack", "payload": {"device_seq": 77}}])

    def test_event_is_acked_before_a_waiter_resumes(self) -> None:
        """A waiter that closes the socket as soon as next_event fires still lets the ack go out first."""
        client = self.connected()
        d = client.next_event()
        d.addCallback(lambda _: client.close())
        self.server.current.send({"type": "event", "payload": self.event(1, 9)})
        self.server.flush()
        self.assertEqual([m["type"] for m in self.server.current.received][-1:], ["ack"])
        self.assertEqual(client.close_info, (1000, ""))

    def test_catch_up_with_unsolicited_first_page(self) -> None:
        """catch_up collects the unsolicited first page and requested pages until has_more is false."""
        self.server.on_authenticated = lambda proto: proto.send({"type": "replay_response", "payload": {
            "type": "replay_response", "events": [self.event(1, 1), self.event(2, 2)], "has_more": True,
            "page_size": 2, "total_events": 3, "continuation_token": "T"}})

        def on_message(proto: Any, msg: Any) -> None:
            if msg["type"] == "replay_request":
                proto.send({"type": "replay_response", "payload": {
                    "type": "replay_response", "events": [self.event(3, 3)], "has_more": False,
                    "page_size": 1, "total_events": 1}})
        self.server.on_message = on_message
        client = self.connected()
        d = client.catch_up()
        self.server.flush()
        self.assertEqual([e["seq"] for e in self.successResultOf(d)], [1, 2, 3])
        requests = [m["payload"] for m in self.server.received if m["type"] == "replay_request"]
        self.assertEqual(requests, [{"last_ack_device_seq": 0, "limit": 100, "continuation_token": "T"}])
        acked = [m["payload"]["device_seq"] for m in self.server.received if m["type"] == "ack"]
        self.assertEqual(acked, [1, 2, 3])

    def test_close_fails_pending_and_reports_code(self) -> None:
        """A server close 4029 fails pending sends with ConnectionClosed and fires closed."""
        client = self.connected()
        closed = client.closed
        d = client.send_event_nowait("s", "t", "aGk=")
        self.server.current.close_with(4029, "Too many connections; retry after 3 s")
        self.server.flush()
        self.assertEqual(self.failureResultOf(d, ConnectionClosed).value.code, 4029)
        self.assertEqual(self.successResultOf(closed), (4029, "Too many connections; retry after 3 s"))
        self.failureResultOf(client.next_event(), ConnectionClosed)

    def test_raw_next_message_timeout_and_malformed(self) -> None:
        """next_message times out with TimeoutError and raises MalformedMessage for a non-JSON frame."""
        d = RawConnection.open(self.clock, "ws://test/ws", endpoint=self.server.endpoint)
        self.server.flush()
        raw = self.successResultOf(d)
        pending = raw.next_message(timeout=2.0)
        self.clock.advance(2.5)
        self.failureResultOf(pending, DeferTimeoutError)
        self.server.current.sendMessage(b"not json", isBinary=False)
        self.server.flush()
        self.failureResultOf(raw.next_message(), MalformedMessage)


class ReconnectTests(LoopbackTestCase):
    """ReconnectingClient follows the policy on real closes."""

    def test_4003_stops_without_retry(self) -> None:
        """A 4003 close ends run() with DeviceRevoked and no second connection."""
        self.server.on_authenticated = lambda proto: proto.close_with(4003, "Device revoked")
        runner = ReconnectingClient(self.clock, self.make_client())
        d = runner.run()
        self.server.flush()
        self.clock.advance(120)
        self.server.flush()
        self.assertEqual(self.failureResultOf(d, DeviceRevoked).value.code, 4003)
        self.assertEqual(len(self.server.protocols), 1)

    def test_1001_reconnects_within_a_second_and_catches_up(self) -> None:
        """After a 1001 close the client reconnects within 1 s and sends a replay_request on each connection."""
        def on_message(proto: Any, msg: Any) -> None:
            if msg["type"] == "replay_request":
                proto.send({"type": "replay_response", "payload": {"events": [], "has_more": False}})
        self.server.on_message = on_message
        runner = ReconnectingClient(self.clock, self.make_client())
        d = runner.run()
        self.server.flush()
        self.server.current.close_with(1001, "Session key rotation required")
        self.server.flush()
        self.clock.advance(1.0)
        self.server.flush()
        self.assertEqual(len(self.server.protocols), 2)
        self.assertEqual(len([m for m in self.server.received if m["type"] == "replay_request"]), 2)
        runner.stop()
        self.server.flush()
        self.assertIsNone(self.successResultOf(d))

    def test_4029_waits_the_given_seconds(self) -> None:
        """After a 4029 '; retry after 5 s' close the client waits at least 5 s before reconnecting."""
        self.server.on_authenticated = lambda proto: proto.close_with(4029, "Too many connections; retry after 5 s")
        runner = ReconnectingClient(self.clock, self.make_client())
        d = runner.run()
        self.server.flush()
        self.assertEqual(len(self.server.protocols), 1)
        self.clock.advance(4.9)
        self.server.flush()
        self.assertEqual(len(self.server.protocols), 1)
        self.clock.advance(1.2)
        self.server.flush()
        self.assertEqual(len(self.server.protocols), 2)
        self.server.on_authenticated = None
        runner.stop()
        self.server.flush()
        self.clock.advance(10)
        self.server.flush()
        self.successResultOf(d)

    def test_stop_waits_for_the_closing_handshake(self) -> None:
        """run() fires only after the close handshake, so the reactor can stop without losing frames."""
        self.server.on_message = lambda proto, msg: msg["type"] == "replay_request" and proto.send(
            {"type": "replay_response", "payload": {"events": [], "has_more": False}})
        client = self.make_client()
        runner = ReconnectingClient(self.clock, client)
        d = runner.run()
        self.server.flush()
        runner.stop()
        self.assertNoResult(d)
        self.server.flush()
        self.successResultOf(d)
        self.assertEqual(client.close_info, (1000, ""))

    def test_refused_connection_backs_off(self) -> None:
        """A refused TCP connect is retried after a backoff, not in a tight loop."""
        self.server.endpoint.refuse_next = ConnectionRefusedError()
        runner = ReconnectingClient(self.clock, self.make_client())
        d = runner.run()
        self.assertEqual(len(self.server.protocols), 0)
        self.clock.advance(0.4)
        self.server.flush()
        self.assertEqual(len(self.server.protocols), 0)
        self.clock.advance(0.7)
        self.server.flush()
        self.assertEqual(len(self.server.protocols), 1)
        runner.stop()
        self.server.flush()
        self.successResultOf(d)


class CliTests(SynchronousTestCase):
    """The pocketbridge-cli commands that need no server."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "device.json")

    def keygen(self, *argv: str) -> List[str]:
        """Run keygen and return its stdout lines."""
        out = io.StringIO()
        args = build_parser().parse_args(["keygen", "--keys", self.path, *argv])
        self.assertEqual(cmd_keygen(args, out), 0)
        return out.getvalue().splitlines()

    def test_keygen_prints_ids_not_seed(self) -> None:
        """keygen writes a 0600 key file and prints user_id and device_id but never the seed."""
        lines = self.keygen("--name", "laptop")
        keys = DeviceKeys.load(self.path)
        self.assertEqual(lines, ["user_id=" + keys.user_id, "device_id=" + keys.device_id])
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(keys.device_name, "laptop")

    def test_keygen_from_makes_second_device_and_refuses_overwrite(self) -> None:
        """keygen --from copies the user key under a new device_id; an existing file is not overwritten."""
        self.keygen()
        first = DeviceKeys.load(self.path)
        self.assertRaises(CliError, self.keygen)
        second_path = os.path.join(self.dir, "second.json")
        args = build_parser().parse_args(["keygen", "--device-keys", second_path, "--from", self.path])
        cmd_keygen(args, io.StringIO())
        second = DeviceKeys.load(second_path)
        self.assertEqual(second.user_id, first.user_id)
        self.assertNotEqual(second.device_id, first.device_id)

    def test_format_and_describe(self) -> None:
        """Events print as a summary line and their text; errors describe close codes and refusals in one line."""
        line = render({"seq": 3, "stream_id": "clipboard:main", "type": "clipboard:text",
                       "encrypted_payload": "aGVsbG8="}, b"hello", "text")
        self.assertEqual(line, b"seq=3 stream=clipboard:main type=clipboard:text\nhello\n")
        self.assertEqual(describe(ConnectionClosed(4029, "x; retry after 2 s")),
                         "rate limited by the server (x; retry after 2 s); try again later")
        from twisted.internet.error import ConnectionRefusedError as Refused

        self.assertEqual(describe(Refused()), "cannot connect to: connection refused")
        self.assertIsInstance(build_parser().parse_args(["send", "--url", "ws://x/ws", "--stream", "s",
                                                         "--type", "t", "--ttl", "5"]), argparse.Namespace)
