"""
Conformance tests of protocol v2 (PROTOCOL.md §5, §7.1–§7.3, §8, §9, §11,
§12) against a real ``twistd pocketbridge`` process, on SQLite and on
PostgreSQL, driven by the project's client SDK (``Client.v2``, and
``RawConnection`` + ``V2Handshake`` for frames the SDK would never send).

A check that "nothing more arrives" uses a ping barrier: the server answers
a socket's frames in order, so everything it sent that socket before the
pong has arrived once the pong has. Flow-control checks ("the server sends
no more than the window") also wait a short real time after the barrier,
because pages are read from storage asynchronously.
"""

from __future__ import annotations

import base64
import os
import sqlite3
import time
import uuid
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Tuple

import orjson
from twisted.internet import defer, reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from pocketbridge.protocol import crypto
from pocketbridge.client import (
    Client,
    ConnectionClosed,
    DecryptFailed,
    DeviceKeys,
    EventRejected,
    Identity,
    RawConnection,
    ReconnectingClient,
    RetryPolicy,
    ServerKeyChanged,
    V2Codec,
    V2Handshake,
    server_address,
)
from pocketbridge.client.handshake import envelope_payload
from tests.class_servers import class_server
from tests.harness import PostgresMixin, ServerProcess, SQLiteMixin, drop_connection, start_server

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

TIMEOUT = 10.0  # seconds any single expected message may take
STREAM = "clipboard:main"
TYPE = "clipboard:text"

#: The fields of a relayed event (§7.1) when it has no ttl.
RELAY_FIELDS = frozenset(
    {"event_id", "user_id", "device_id", "device_seq", "stream_id", "stream_seq", "type",
     "encrypted_payload", "created_at", "seq"}
)


def b64(n: int = 24) -> str:
    """Standard padded base64 of ``n`` random bytes: a valid ``encrypted_payload``."""
    return base64.b64encode(os.urandom(n)).decode("ascii")


def new_id() -> str:
    """A fresh lowercase event or device id."""
    return str(uuid.uuid4())


def seqs(events: Iterable[Dict[str, Any]]) -> List[int]:
    """The ``seq`` of each event, in order."""
    return [e["seq"] for e in events]


def sleep(seconds: float) -> Any:
    """A Deferred that fires after ``seconds`` of real time."""
    return deferLater(reactor, seconds, lambda: None)


def of_type(client: Client, msg_type: str, since: int = 0) -> List[Dict[str, Any]]:
    """Payloads of the messages of ``msg_type`` in ``client.messages[since:]``."""
    return [m["payload"] for m in client.messages[since:] if isinstance(m, dict) and m.get("type") == msg_type]


def wire_events(client: Client, since: int = 0) -> List[Dict[str, Any]]:
    """Every event as it came off the wire (pages and live, repeats included), in arrival order."""
    out: List[Dict[str, Any]] = []
    for m in client.messages[since:]:
        if not isinstance(m, dict):
            continue
        if m.get("type") == "event":
            out.append(m["payload"])
        elif m.get("type") == "replay_response":
            out.extend(m["payload"]["events"])
    return out


class V2Tests(_Base):
    """The v2 contract against a real server; mixed with a backend and TestCase below."""

    backend: str

    # ------------------------------------------------------------ helpers

    async def start(self, args: Sequence[str] = ()) -> ServerProcess:
        """A healthy server on this class's backend, shared with the class's other tests (tests.class_servers).

        A test that restarts the server or changes its configuration uses ``start_server``.
        """
        return await class_server(self, args=args)

    def device(self, server: ServerProcess, identity: Identity, version: int = 2, **kwargs: Any) -> Client:
        """A (not yet connected) client of ``identity``, dropped after the test."""
        client = Client(reactor, server.ws_url, identity, protocol_version=version, handshake_timeout=TIMEOUT,
                        **kwargs)
        self.addCleanup(drop_connection, lambda: client.raw)
        return client

    async def online(self, server: ServerProcess, identity: Identity, version: int = 2, **kwargs: Any) -> Client:
        """A connected client; v2 clients have also finished their first catch-up."""
        client = self.device(server, identity, version, **kwargs)
        await client.connect()
        if version == 2:
            await client.wait_caught_up(TIMEOUT)
        return client

    async def raw_v2(self, server: ServerProcess, identity: Optional[Identity] = None,
                     device_id: Optional[str] = None, **auth: Any) -> Tuple[RawConnection, V2Handshake, Dict[str, Any]]:
        """A socket past server_hello with the v2 codec installed, frames recorded: (raw, handshake, client_auth)."""
        raw = await RawConnection.open(reactor, server.ws_url)
        self.addCleanup(drop_connection, lambda: raw)
        raw.record_frames = True
        hs = V2Handshake(identity or Identity.generate(), device_id or new_id(), pins={},
                         server_address=server_address(server.ws_url), **auth)
        raw.send_json(hs.client_hello())
        hello = await raw.next_message(TIMEOUT)
        client_auth = hs.on_server_hello(envelope_payload(hello, "server_hello"))
        raw.set_codec(hs.codec())
        return raw, hs, client_auth

    async def closed_within(self, conn: Any, timeout: float = TIMEOUT) -> Tuple[int, str]:
        """``(code, reason)`` once ``conn`` (a RawConnection or Client) closes; fails the test if it stays open."""
        d = conn.closed
        d.addTimeout(timeout, reactor)
        try:
            return tuple(await d)  # type: ignore[return-value]
        except defer.TimeoutError:
            self.fail("socket still open after {} s".format(timeout))
            raise

    async def settled(self, client: Client, d: Any, what: str, since: int = 0) -> Any:
        """The result of ``d`` (a caught_up wait); on timeout fail with what ``client`` received instead."""
        try:
            return await d
        except defer.TimeoutError:
            got = seqs(wire_events(client, since))
            self.fail("{}: no caught_up in time; received {} events{}, then nothing".format(
                what, len(got), " (seq {}..{})".format(got[0], got[-1]) if got else ""))

    async def barrier(self, client: Client) -> None:
        """Ping and wait for the pong: everything the server sent this socket before it has arrived."""
        mark = len(client.messages)
        client.send_raw({"type": "ping", "payload": {}})
        await client.wait_for("pong", timeout=TIMEOUT, since=mark)

    async def upload(self, client: Client, n: int, **fields: Any) -> List[Dict[str, Any]]:
        """Send ``n`` events at once from ``client``; their acks, in order."""
        return list(await gatherResults(
            [client.send_event(STREAM, TYPE, b64(), timeout=30, **fields) for _ in range(n)], consumeErrors=True))

    async def receive(self, client: Client, n: int) -> List[Dict[str, Any]]:
        """The next ``n`` events ``client`` hands out (deduplicated, pages and live)."""
        return [await client.next_event(TIMEOUT) for _ in range(n)]

    async def wait_until(self, predicate: Any, timeout: float, what: str) -> None:
        """Poll ``predicate`` every 50 ms; fail the test with ``what`` if it is not true in time."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                self.fail("{} (waited {} s)".format(what, timeout))
            await sleep(0.05)

    def sql(self, server: ServerProcess, statements: Sequence[Tuple[str, Tuple[Any, ...]]]) -> None:
        """Run ``statements`` (``?`` placeholders) in the server's database, in one transaction."""
        if self.backend == "postgresql":
            import psycopg2

            conn = psycopg2.connect(server.database_url)
            try:
                with conn, conn.cursor() as cur:
                    for query, params in statements:
                        cur.execute(query.replace("?", "%s"), params)
            finally:
                conn.close()
        else:
            conn3 = sqlite3.connect(os.path.join(server.data_dir, "pocketbridge.sqlite3"), timeout=10)
            try:
                with conn3:
                    for query, params in statements:
                        conn3.execute(query, params)
            finally:
                conn3.close()

    # ------------------------------------------------------------ 1. the channel (§5)

    async def test_handshake_and_encrypted_channel(self) -> None:
        """server_hello is a text frame saying protocol_version 2; every later frame is binary ciphertext that only this connection's keys open."""
        server = await self.start()
        raw, hs, auth = await self.raw_v2(server, device_name="laptop")
        raw.send_json(auth)
        est = await raw.next_message(TIMEOUT)
        self.assertEqual(est["type"], "session_established")
        p = est["payload"]
        self.assertEqual((p["device_id"], p["last_ack_device_seq"], p["protocol_version"]), (hs.device_id, 0, 2))
        for name in ("expires_at", "server_time"):
            self.assertIs(type(p[name]), int, name)
        self.assertIsInstance(p["session_id"], str)
        raw.send_json({"type": "ping", "payload": {}})
        caught_up = await raw.next_message(TIMEOUT)
        self.assertEqual(caught_up, {"type": "caught_up", "payload": {"seq": 0}})
        self.assertEqual((await raw.next_message(TIMEOUT))["type"], "pong")

        (hello_binary, hello_bytes), later = raw.frames[0], raw.frames[1:]
        self.assertFalse(hello_binary)
        self.assertEqual(orjson.loads(hello_bytes)["payload"]["protocol_version"], 2)
        self.assertEqual(len(later), 3)
        self.assertTrue(all(binary for binary, _ in later), "a frame after server_hello was text")
        for _, frame in later:
            self.assertRaises(orjson.JSONDecodeError, orjson.loads, frame)
            self.assertRaises(DecryptFailed, V2Codec(os.urandom(32), os.urandom(32)).decode, frame, True)
        assert hs.k_c2s is not None and hs.k_s2c is not None
        again = V2Codec(hs.k_c2s, hs.k_s2c)
        self.assertEqual([again.decode(f, True)["type"] for _, f in later], ["session_established", "caught_up", "pong"])

        # Each connection derives new keys; the SDK pins the server key it saw first.
        client = await self.online(server, Identity.generate())
        _, hs2, _ = await self.raw_v2(server)
        self.assertNotEqual(hs2.k_s2c, hs.k_s2c)
        self.assertEqual(client.pin_status, "new")
        self.assertEqual(client.server_pins, {server_address(server.ws_url): hs.server_identity_pub})

    async def test_text_frame_after_server_hello_closes_decrypt_failed(self) -> None:
        """A text frame after server_hello closes 1008 'Decrypt failed', before and after authentication."""
        server = await self.start()
        raw, _, auth = await self.raw_v2(server)
        raw.send_text(orjson.dumps(auth).decode())
        self.assertEqual(await self.closed_within(raw), (1008, "Decrypt failed"))

        client = await self.online(server, Identity.generate())
        assert client.raw is not None
        client.raw.send_text('{"type":"ping","payload":{}}')
        self.assertEqual(await self.closed_within(client), (1008, "Decrypt failed"))

    async def test_corrupted_ciphertext_closes(self) -> None:
        """A frame whose ciphertext has one flipped bit closes 1008 'Decrypt failed'."""
        server = await self.start()
        client = await self.online(server, Identity.generate())
        assert client.raw is not None
        frame = bytearray(client.raw.codec.seal(b'{"type":"ping","payload":{}}'))
        frame[3] ^= 0x01
        client.raw.send_bytes(bytes(frame))
        self.assertEqual(await self.closed_within(client), (1008, "Decrypt failed"))
        self.assertEqual(of_type(client, "pong"), [])

    async def test_replayed_frame_closes(self) -> None:
        """Sending the same ciphertext again (a replay) closes 1008 'Decrypt failed'; the first copy was answered."""
        server = await self.start()
        client = await self.online(server, Identity.generate())
        assert client.raw is not None
        frame = client.raw.send_json({"type": "ping", "payload": {}})
        await client.wait_for("pong", timeout=TIMEOUT)
        client.raw.send_bytes(frame)
        self.assertEqual(await self.closed_within(client), (1008, "Decrypt failed"))
        self.assertEqual(len(of_type(client, "pong")), 1)

    async def test_first_encrypted_frame_must_be_client_auth(self) -> None:
        """An encrypted ping before client_auth closes 1008 and no session is established."""
        server = await self.start()
        raw, _, auth = await self.raw_v2(server)
        raw.send_json({"type": "ping", "payload": {}})
        code, _reason = await self.closed_within(raw)
        self.assertEqual(code, 1008)
        self.assertEqual(raw.frames[1:], [], "the server sent something after server_hello")

    async def test_plaintext_not_a_message_closes_invalid_format(self) -> None:
        """A frame that decrypts to something other than a JSON object with a string type closes 1008 'Invalid message format'."""
        server = await self.start()
        client = await self.online(server, Identity.generate())
        assert client.raw is not None
        client.raw.send_bytes(client.raw.codec.seal(b"[1, 2, 3]"))
        self.assertEqual(await self.closed_within(client), (1008, "Invalid message format"))

    async def test_require_v2_refuses_v1(self) -> None:
        """With --require-v2 a v1 client is closed 1008 'Protocol version 2 required' and a v2 client syncs."""
        server = await self.start(["--require-v2"])
        user = Identity.generate()
        old = self.device(server, user, version=1)
        with self.assertRaises(ConnectionClosed) as caught:
            await old.connect()
        self.assertEqual((caught.exception.code, caught.exception.reason), (1008, "Protocol version 2 required"))
        a = await self.online(server, user)
        b = await self.online(server, user)
        ack = await a.send_event(STREAM, TYPE, b64(), timeout=TIMEOUT)
        self.assertEqual((await b.next_event(TIMEOUT))["event_id"], ack["event_id"])

    async def test_server_key_pinned_in_the_key_file(self) -> None:
        """The first v2 connection pins the server key in the device file; after the server key changes, connecting fails with ServerKeyChanged until server_key= accepts the new key."""
        server = await start_server(self)
        path = os.path.join(os.path.abspath(self.mktemp()), "device.json")
        keys = DeviceKeys.generate(device_name="laptop")
        keys.save(path)
        first = Client.for_device(reactor, server.ws_url, keys, keys_path=path, handshake_timeout=TIMEOUT)
        self.addCleanup(drop_connection, lambda: first.raw)
        await first.connect()
        await first.close()
        old_pin = DeviceKeys.load(path).pinned_server_key(server.ws_url)
        self.assertRegex(old_pin or "", "^[0-9a-f]{64}$")

        new_seed = os.urandom(32)
        new_pub = crypto.public_hex(crypto.signing_key_from_seed(new_seed))
        server.env["SERVER_PRIVATE_KEY_HEX"] = new_seed.hex()
        await server.restart()
        second = Client.for_device(reactor, server.ws_url, DeviceKeys.load(path), keys_path=path,
                                   handshake_timeout=TIMEOUT)
        self.addCleanup(drop_connection, lambda: second.raw)
        with self.assertRaises(ServerKeyChanged):
            await second.connect()
        self.assertEqual(DeviceKeys.load(path).pinned_server_key(server.ws_url), old_pin)

        third = Client.for_device(reactor, server.ws_url, DeviceKeys.load(path), keys_path=path,
                                  server_key=new_pub, handshake_timeout=TIMEOUT)
        self.addCleanup(drop_connection, lambda: third.raw)
        await third.connect()
        self.assertEqual(DeviceKeys.load(path).pinned_server_key(server.ws_url), new_pub)

    # ------------------------------------------------------------ 2. typed errors (§6, §8)

    async def test_event_errors_in_arrival_order_and_connection_stays_open(self) -> None:
        """not_owner, invalid_event and seq_conflict come as typed errors with in_reply_to, event_id and device_seq, in arrival order between the acks; nothing rejected is relayed and the socket stays open."""
        server = await self.start()
        user = Identity.generate()
        b = await self.online(server, user)
        a = await self.online(server, user)
        mark = len(a.messages)
        ids = [new_id() for _ in range(5)]
        no_seq_id = new_id()
        sends = [
            a.send_event(STREAM, TYPE, b64(), event_id=ids[0]),  # device_seq 1: stored
            a.send_event(STREAM, TYPE, b64(), event_id=ids[1], extra={"device_id": b.device_id}),  # 2: not_owner
            a.send_event("no spaces allowed", TYPE, b64(), event_id=ids[2]),  # 3: invalid_event
            a.send_event(STREAM, TYPE, b64(), event_id=ids[3], device_seq=1),  # 1 again: seq_conflict
        ]
        a.send_raw({"type": "event", "payload": {  # no device_seq: invalid_event without device_seq
            "event_id": no_seq_id, "user_id": user.user_id, "device_id": a.device_id, "stream_id": STREAM,
            "stream_seq": 0, "type": TYPE, "encrypted_payload": b64()}})
        sends.append(a.send_event(STREAM, TYPE, b64(), event_id=ids[4]))  # device_seq 4: stored
        results = await gatherResults([d.addErrback(lambda f: f.value) for d in sends])

        answers = [(m["type"], m["payload"].get("code"), m["payload"].get("event_id"), m["payload"].get("device_seq"))
                   for m in a.messages[mark:] if m.get("type") in ("ack", "error")]
        self.assertEqual(answers, [
            ("ack", None, ids[0], 1),
            ("error", "not_owner", ids[1], 2),
            ("error", "invalid_event", ids[2], 3),
            ("error", "seq_conflict", ids[3], 1),
            ("error", "invalid_event", no_seq_id, None),
            ("ack", None, ids[4], 4),
        ])
        for error in of_type(a, "error", mark):
            self.assertEqual(error["in_reply_to"], "event")
            self.assertIsInstance(error["message"], str)
            self.assertTrue(error["message"].isascii() and error["message"])
        self.assertNotIn("device_seq", of_type(a, "error", mark)[3])
        self.assertEqual([r.code if isinstance(r, EventRejected) else "ack" for r in results],
                         ["ack", "not_owner", "invalid_event", "seq_conflict", "ack"])
        self.assertEqual((results[0]["seq"], results[4]["seq"]), (1, 2))
        self.assertEqual((results[0]["stream_seq"], results[4]["stream_seq"]), (1, 2))

        received = await self.receive(b, 2)
        await self.barrier(b)
        self.assertEqual([e["event_id"] for e in received], [ids[0], ids[4]])
        self.assertEqual(len(wire_events(b)), 2, "a rejected event was relayed")
        await self.barrier(a)
        self.assertIsNone(a.close_info)

    async def test_message_errors_unknown_type_and_bad_request(self) -> None:
        """An unknown type gets unknown_type; an ack without an integer seq ≥ 0 or a replay_request with a bad resume_from gets bad_request; the socket stays open."""
        server = await self.start()
        user = Identity.generate()
        a = await self.online(server, user)
        mark = len(a.messages)
        a.send_raw({"type": "frobnicate", "payload": {}})
        for bad in ({}, {"seq": "3"}, {"seq": 2.5}, {"seq": True}, {"seq": -1}):
            a.send_raw({"type": "ack", "payload": bad})
        a.send_raw({"type": "replay_request", "payload": {"resume_from": "x"}})
        await self.barrier(a)
        errors = of_type(a, "error", mark)
        self.assertEqual([(e["code"], e["in_reply_to"]) for e in errors],
                         [("unknown_type", "frobnicate")] + [("bad_request", "ack")] * 5
                         + [("bad_request", "replay_request")])
        for e in errors:
            self.assertNotIn("event_id", e)
            self.assertNotIn("device_seq", e)
            self.assertTrue(e["message"].isascii())
        ack = await a.send_event(STREAM, TYPE, b64(), timeout=TIMEOUT)
        self.assertEqual(ack["seq"], 1)
        self.assertIsNone(a.close_info)

    async def test_quota_exceeded_is_a_typed_error(self) -> None:
        """An event over max_user_bytes is answered with quota_exceeded (event_id, device_seq) and the next small event is stored."""
        server = await self.start(["--max-user-bytes", "1000"])
        a = await self.online(server, Identity.generate())
        first = await a.send_event(STREAM, TYPE, "A" * 800, timeout=TIMEOUT)
        event_id = new_id()
        with self.assertRaises(EventRejected) as caught:
            await a.send_event(STREAM, TYPE, "B" * 800, event_id=event_id, timeout=TIMEOUT)
        self.assertEqual(caught.exception.code, "quota_exceeded")
        self.assertEqual((caught.exception.payload["event_id"], caught.exception.payload["device_seq"]), (event_id, 2))
        after = await a.send_event(STREAM, TYPE, "C" * 100, timeout=TIMEOUT)
        self.assertEqual((first["seq"], after["seq"]), (1, 2))

    async def test_payload_too_large_is_a_typed_error(self) -> None:
        """An encrypted_payload over max_payload_bytes is answered with payload_too_large (event_id, device_seq); the socket stays open."""
        server = await self.start(["--max-payload-bytes", "1000", "--max-message-bytes", "200000"])
        a = await self.online(server, Identity.generate())
        event_id = new_id()
        with self.assertRaises(EventRejected) as caught:
            await a.send_event(STREAM, TYPE, "A" * 1004, event_id=event_id, timeout=TIMEOUT)
        self.assertEqual(caught.exception.code, "payload_too_large")
        self.assertEqual((caught.exception.payload["event_id"], caught.exception.payload["device_seq"]), (event_id, 1))
        stored = await a.send_event(STREAM, TYPE, "A" * 1000, timeout=TIMEOUT)
        self.assertEqual(stored["seq"], 1)

    async def test_acked_events_survive_a_server_crash_and_resume_delivers_the_rest(self) -> None:
        """After kill -9 and a restart every acked upload is stored, an ack given before a clean disconnect holds, and a device that crashed with the server still gets everything (at least once, in seq order)."""
        server = await start_server(self)
        user = Identity.generate()
        a = await self.online(server, user)
        acks = await self.upload(a, 40)
        self.assertEqual([x["seq"] for x in acks], list(range(1, 41)))
        # B acks 25 and disconnects cleanly: its cursor is written on disconnect.
        b = self.device(server, user, auto_ack=False)
        await b.connect()
        got = await self.receive(b, 40)
        b.ack_seq(got[24]["seq"])
        await self.barrier(b)
        await b.close()
        await sleep(0.5)
        # C acks 10 and is still connected when the server dies: its batched
        # cursor write may be lost with the process.
        c = self.device(server, user, auto_ack=False)
        await c.connect()
        got_c = await self.receive(c, 40)
        c.ack_seq(got_c[9]["seq"])
        await self.barrier(c)
        await server.kill9()
        await server.restart()
        b2 = await self.online(server, user, device_id=b.device_id)
        self.assertEqual(seqs(wire_events(b2)), list(range(26, 41)))
        c2 = await self.online(server, user, device_id=c.device_id, resume=False)
        got_c2 = seqs(wire_events(c2))
        self.assertEqual(got_c2, sorted(set(got_c2)))
        self.assertTrue(set(range(11, 41)) <= set(got_c2), got_c2)
        a2 = await self.online(server, user, device_id=a.device_id)
        more = await a2.send_event(STREAM, TYPE, b64(), timeout=TIMEOUT)
        self.assertEqual(more["seq"], 41)

    # ------------------------------------------------------------ 3. catch-up and delivery (§7)

    async def test_caught_up_with_empty_backlog(self) -> None:
        """A fresh device gets caught_up {seq: 0} and no page; a device whose backlog is only its own events gets caught_up {seq: H} and no page."""
        server = await self.start()
        user = Identity.generate()
        a = await self.online(server, user)
        self.assertEqual(of_type(a, "caught_up"), [{"seq": 0}])
        self.assertEqual(of_type(a, "replay_response"), [])
        await self.upload(a, 3)
        await a.close()
        again = await self.online(server, user, device_id=a.device_id)
        await self.barrier(again)
        self.assertEqual(of_type(again, "caught_up"), [{"seq": 3}])
        self.assertEqual(of_type(again, "replay_response"), [], "a page without events (§7.3: a page holds at least one)")
        other = await self.online(server, user)
        self.assertEqual(seqs(wire_events(other)), [1, 2, 3])
        self.assertEqual(of_type(other, "caught_up"), [{"seq": 3}])

    async def test_backlog_of_600_in_pages_under_the_window(self) -> None:
        """600 waiting events come as pages: without acks no more than 256 arrive; after an ack the rest follow in seq order, then one caught_up {seq: 600}."""
        server = await self.start()
        user = Identity.generate()
        a = await self.online(server, user)
        await self.upload(a, 600)
        b = self.device(server, user, auto_ack=False)
        await b.connect()
        first = await self.receive(b, 256)
        await self.barrier(b)
        await sleep(1.0)
        await self.barrier(b)
        self.assertEqual(len(wire_events(b)), 256, "the server sent past the 256-event window without an ack")
        self.assertEqual(of_type(b, "caught_up"), [])
        b.auto_ack = True  # from now on every page is acked as it arrives
        b.ack_seq(first[-1]["seq"])
        rest = await self.receive(b, 344)
        head = await b.wait_caught_up(TIMEOUT)
        await self.barrier(b)
        self.assertEqual(head, 600)
        self.assertEqual(seqs(wire_events(b)), list(range(1, 601)))
        self.assertEqual(seqs(first + rest), list(range(1, 601)))
        self.assertEqual(of_type(b, "caught_up"), [{"seq": 600}])
        pages = of_type(b, "replay_response")
        self.assertEqual(of_type(b, "event"), [], "a live event was sent during catch-up")
        self.assertTrue(all(p["page_size"] == len(p["events"]) <= 256 for p in pages))
        self.assertEqual(pages[0]["total_events"], 600)
        self.assertEqual([p["has_more"] for p in pages][-1], False)
        self.assertTrue(all(p["has_more"] for p in pages[:-1]))

    async def test_live_events_strictly_increasing_exactly_once(self) -> None:
        """Live events reach a v2 device once each, in strictly increasing seq, with exactly the §7.1 fields."""
        server = await self.start()
        user = Identity.generate()
        b = await self.online(server, user)
        a = await self.online(server, user)
        mark = len(b.messages)
        acks = await self.upload(a, 100)
        received = await self.receive(b, 100)
        await self.barrier(b)
        on_wire = wire_events(b, mark)
        self.assertEqual(len(on_wire), 100, "an event was sent twice or lost")
        self.assertEqual(seqs(on_wire), sorted(set(seqs(on_wire))))
        self.assertEqual([e["event_id"] for e in received], [x["event_id"] for x in acks])
        self.assertEqual(seqs(received), [x["seq"] for x in acks])
        for event in received:
            self.assertEqual(set(event), RELAY_FIELDS)
            self.assertEqual(event["device_id"], a.device_id)
        await self.barrier(a)
        self.assertEqual(wire_events(a), [], "the sender received its own events")

    async def test_cumulative_ack_moves_the_cursor(self) -> None:
        """After {seq: S} acks the cursor is S: a reconnect without resume_from gets only the events above S."""
        server = await self.start()
        user = Identity.generate()
        a = await self.online(server, user)
        await self.upload(a, 10)
        b1 = self.device(server, user, auto_ack=False)
        await b1.connect()
        got = await self.receive(b1, 10)
        b1.ack_seq(got[5]["seq"])
        await self.barrier(b1)
        await b1.close()
        await sleep(0.5)  # the cursor is written on disconnect
        b2 = await self.online(server, user, device_id=b1.device_id)
        self.assertEqual(seqs(wire_events(b2)), [7, 8, 9, 10])
        self.assertEqual(of_type(b2, "caught_up"), [{"seq": 10}])

    async def test_resume_from_below_the_cursor_replays_from_there(self) -> None:
        """resume_from below the cursor replays every later event (more than one window of them), then caught_up; a larger resume_from never skips unacked events."""
        server = await self.start()
        user = Identity.generate()
        a = await self.online(server, user)
        await self.upload(a, 300)
        b1 = await self.online(server, user)
        self.assertEqual(b1.last_received_seq, 300)
        await b1.close()
        await sleep(0.5)
        b2 = self.device(server, user, device_id=b1.device_id)
        await b2.connect(resume_from=10)
        head = await self.settled(b2, b2.wait_caught_up(30), "catch-up from resume_from 10 below the cursor 300")
        self.assertEqual(head, 300)
        self.assertEqual(seqs(wire_events(b2)), list(range(11, 301)))

        await self.upload(a, 5)  # seqs 301..305, not acked by anyone
        await b2.close()
        await sleep(0.5)
        b3 = self.device(server, user, device_id=b1.device_id)
        await b3.connect(resume_from=10_000)
        await b3.wait_caught_up(TIMEOUT)
        self.assertEqual(seqs(wire_events(b3)), [301, 302, 303, 304, 305])

    async def test_replay_request_when_caught_up_replays_again(self) -> None:
        """After everything was received and acked, replay_request {resume_from: 14} sends 15..20 again (more than one window) and one caught_up {seq: 20}."""
        server = await self.start(["--v2-window-events", "5"])
        user = Identity.generate()
        a = await self.online(server, user)
        await self.upload(a, 20)
        b = await self.online(server, user)
        mark = len(b.messages)
        head = await self.settled(b, b.replay_request(resume_from=14, timeout=TIMEOUT),
                                  "replay_request from 14 after everything up to 20 was acked", mark)
        self.assertEqual(head, 20)
        self.assertEqual(seqs(wire_events(b, mark)), [15, 16, 17, 18, 19, 20])
        self.assertEqual(of_type(b, "caught_up", mark), [{"seq": 20}])
        self.assertEqual(seqs(b.events_received), list(range(1, 21)) + list(range(15, 21)),
                         "the SDK did not hand out the replayed events again")

    async def test_replay_request_mid_catch_up_restarts(self) -> None:
        """A replay_request during catch-up drops the rest of it and restarts from min(cursor, resume_from): events 3..20 follow, then exactly one caught_up."""
        server = await self.start(["--v2-window-events", "5"])
        user = Identity.generate()
        a = await self.online(server, user)
        await self.upload(a, 20)
        c = self.device(server, user, auto_ack=False)
        await c.connect()
        await self.wait_until(lambda: len(wire_events(c)) == 5, TIMEOUT, "first window")
        c.ack_seq(5)
        await self.wait_until(lambda: len(wire_events(c)) == 10, TIMEOUT, "second window")
        mark = len(c.messages)
        c.send_raw({"type": "replay_request", "payload": {"resume_from": 2}})

        def top() -> int:
            """The highest seq received since the request."""
            events = wire_events(c, mark)
            return events[-1]["seq"] if events else 0

        acked = 5
        while not of_type(c, "caught_up"):
            await self.wait_until(lambda: bool(of_type(c, "caught_up")) or top() > acked, TIMEOUT,
                                  "the restarted catch-up stalled after seq {}".format(top()))
            if top() > acked:
                acked = top()
                c.ack_seq(acked)
        await self.barrier(c)
        self.assertEqual(seqs(wire_events(c, mark)), list(range(3, 21)))
        self.assertEqual(seqs(wire_events(c)[:10]), list(range(1, 11)))
        self.assertEqual(of_type(c, "caught_up"), [{"seq": 20}], "expected exactly one caught_up")

    async def test_slow_consumer_closed_4008(self) -> None:
        """A device that never acks while events wait is closed 4008 within ~4 s; a device that acks stays open."""
        server = await self.start(["--slow-consumer-timeout", "2", "--v2-window-events", "5"])
        user = Identity.generate()
        a = await self.online(server, user)
        await self.upload(a, 20)
        t0 = time.monotonic()
        stuck = self.device(server, user, auto_ack=False)
        fine = self.device(server, user)
        await gatherResults([stuck.connect(), fine.connect()])
        code, _reason = await self.closed_within(stuck, 6)
        elapsed = time.monotonic() - t0
        self.assertEqual(code, 4008)
        self.assertLess(elapsed, 4.5)
        self.assertEqual(len(wire_events(stuck)), 5)
        self.assertEqual(await fine.wait_caught_up(TIMEOUT), 20)
        await self.barrier(fine)
        self.assertIsNone(fine.close_info)

    async def test_resync_required_after_the_retention_job(self) -> None:
        """Once the retention job purged a user's events, a device with an old cursor gets resync_required {retention, oldest_seq} and then caught_up."""
        server = await start_server(self)
        user = Identity.generate()
        a = await self.online(server, user)
        await self.upload(a, 5)
        await a.close()
        server.args += ["--event-retention-days", "0.00001", "--jobs-interval", "1"]
        await server.restart()
        deadline = time.monotonic() + 20
        while True:
            b = await self.online(server, user)
            await self.barrier(b)
            if b.resync is not None or time.monotonic() > deadline:
                break
            await b.close()
            await sleep(0.5)
        types = [m["type"] for m in b.messages if m["type"] in ("resync_required", "replay_response", "caught_up")]
        self.assertEqual((types[0], types[-1], types.count("caught_up")), ("resync_required", "caught_up", 1), types)
        self.assertEqual(wire_events(b), [])
        self.assertEqual(b.resync, {"reason": "retention", "oldest_seq": 6})
        self.assertEqual(of_type(b, "caught_up"), [{"seq": 5}])

    async def test_resync_required_precedes_the_retained_backlog(self) -> None:
        """With purged_below_seq = 5, a new device gets resync_required {retention, 5}, then events 5..10, then caught_up {seq: 10}; a device past the gap gets no resync."""
        server = await self.start()
        user = Identity.generate()
        a = await self.online(server, user)
        await self.upload(a, 10)
        self.sql(server, [
            ("DELETE FROM events WHERE user_id = ? AND seq < ?", (user.user_id, 5)),
            ("UPDATE users SET purged_below_seq = ? WHERE user_id = ?", (5, user.user_id)),
        ])
        seen: List[Dict[str, Any]] = []
        b = await self.online(server, user, on_resync=seen.append)
        types = [m["type"] for m in b.messages if m["type"] in ("resync_required", "replay_response", "caught_up")]
        self.assertEqual(types[0], "resync_required")
        self.assertEqual(types[-1], "caught_up")
        self.assertEqual(seen, [{"reason": "retention", "oldest_seq": 5}])
        self.assertEqual(seqs(wire_events(b)), [5, 6, 7, 8, 9, 10])
        self.assertEqual(of_type(b, "caught_up"), [{"seq": 10}])
        await b.close()
        await sleep(0.5)
        again = await self.online(server, user, device_id=b.device_id)
        await self.barrier(again)
        self.assertIsNone(again.resync)

    # ------------------------------------------------------------ 4. session lifetime (§9)

    async def test_session_expiring_soon(self) -> None:
        """A v2 session shorter than 5 minutes gets session_expiring_soon at once, with expires_in_seconds and the session's expires_at; a v1 session does not."""
        server = await self.start(["--session-max-age", "10"])
        user = Identity.generate()
        b = self.device(server, user)
        est = await b.connect()
        notice = (await b.wait_for("session_expiring_soon", timeout=5))["payload"]
        self.assertEqual(notice["expires_at"], est["expires_at"])
        self.assertIs(type(notice["expires_in_seconds"]), int)
        self.assertTrue(0 < notice["expires_in_seconds"] <= 10, notice)
        self.assertLessEqual(abs(est["server_time"] + notice["expires_in_seconds"] * 1000 - est["expires_at"]), 1500)
        old = await self.online(server, user, version=1)
        await sleep(0.5)
        await self.barrier(old)
        self.assertEqual(of_type(old, "session_expiring_soon"), [])

    async def test_reconnecting_client_resumes_after_rotation(self) -> None:
        """After the 1001 key-rotation close a ReconnectingClient reconnects with resume_from and receives every event exactly once."""
        server = await self.start(["--session-max-age", "3"])
        user = Identity.generate()
        a = Client.v2(reactor, server.ws_url, user, handshake_timeout=TIMEOUT)
        self.addCleanup(drop_connection, lambda: a.raw)
        watcher = self.device(server, user)
        connections: List[Dict[str, Any]] = []
        closes: List[Optional[int]] = []
        runner = ReconnectingClient(reactor, watcher, policy=RetryPolicy(soon=0.5), on_connected=connections.append,
                                    on_disconnected=lambda code, reason, decision: closes.append(code))
        done = runner.run()
        self.addCleanup(lambda: (runner.stop(), done)[1])
        sent: List[str] = []
        await self.wait_until(lambda: len(connections) == 1, TIMEOUT, "first connection")
        while len(connections) < 2 or len(sent) < 12:
            if a.raw is None or a.raw.close_info is not None:
                await a.connect()
                await a.wait_caught_up(TIMEOUT)
            try:
                ack = await a.send_event(STREAM, TYPE, b64(), timeout=TIMEOUT)
                sent.append(ack["event_id"])
            except ConnectionClosed:
                pass
            await sleep(0.4)
        await self.wait_until(lambda: {e["event_id"] for e in watcher.events_received} >= set(sent), TIMEOUT,
                              "events missing after the reconnect")
        self.assertIn(1001, closes)
        received = [e["event_id"] for e in watcher.events_received]
        self.assertEqual(len(received), len(set(received)), "an event was handed out twice")
        self.assertEqual(sorted(seqs(watcher.events_received)), seqs(watcher.events_received))

    # ------------------------------------------------------------ 5. v1 and v2 together

    async def test_v1_and_v2_devices_interoperate(self) -> None:
        """Events of a v1 device reach a v2 device and the reverse, live and in catch-up, with the same fields."""
        server = await self.start()
        user = Identity.generate()
        old = await self.online(server, user, version=1)
        new = await self.online(server, user)
        from_old = await self.upload(old, 3)
        from_new = await self.upload(new, 3)
        for ack in from_new:
            self.assertEqual(set(ack), {"device_seq", "event_id", "seq", "stream_seq"})
        got_new = await self.receive(new, 3)
        got_old = await self.receive(old, 3)
        self.assertEqual([e["event_id"] for e in got_new], [x["event_id"] for x in from_old])
        self.assertEqual([e["event_id"] for e in got_old], [x["event_id"] for x in from_new])
        for event in got_new + got_old:
            self.assertEqual(set(event), RELAY_FIELDS)
        await self.barrier(new)
        await self.barrier(old)
        self.assertEqual(len(wire_events(new)), 3)

        late_v2 = await self.online(server, user)
        self.assertEqual(seqs(wire_events(late_v2)), [1, 2, 3, 4, 5, 6])
        late_v1 = await self.online(server, user, version=1)
        history = await late_v1.catch_up(limit=1000, timeout=TIMEOUT)
        self.assertEqual([e["event_id"] for e in history], [e["event_id"] for e in wire_events(late_v2)])


class V2TestsSQLite(V2Tests, SQLiteMixin, TestCase):
    """The v2 contract on SQLite."""


class V2TestsPostgres(V2Tests, PostgresMixin, TestCase):
    """The v2 contract on PostgreSQL."""
