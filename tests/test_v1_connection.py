"""
Integration tests of a v1 connection against a real ``twistd pocketbridge``
process: handshake, malformed input, size limits, the pre-authentication
budget, handshake deadline, session expiry, backpressure, socket limits,
heartbeat, configuration errors and the server key (PROTOCOL.md §1, §2, §4,
§8, §9, §11, §12).

Every class runs once on SQLite and once on PostgreSQL, except
``ConfigurationErrorTests``: those servers never reach their storage.

The handshake is sometimes written out by hand (``RawV1``) so that a test
controls every byte the server sees; the crypto it checks against is computed
here, from the contract, not with the server's own helpers.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Tuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from pocketbridge.client import Client, ConnectionClosed, Identity, RawConnection
from tests.class_servers import class_server
from tests.harness import ExitResult, PostgresMixin, ServerProcess, SQLiteMixin, drop_connection, make_server, start_server

DAY_MS = 86_400_000
ROTATION = (1001, "Session key rotation required")
RETRY_AFTER = re.compile(r"; retry after (\d+) s$")


# --------------------------------------------------------------------------
# Helpers that do not need a test case


def now_ms() -> float:
    """Local wall-clock time in ms (the server runs on the same host)."""
    return time.time() * 1000.0


def sleep(seconds: float) -> "defer.Deferred[None]":
    """A Deferred that fires after ``seconds`` of reactor time."""
    return deferLater(reactor, seconds, lambda: None)


def b64(n: int = 24) -> str:
    """A valid ``encrypted_payload``: standard padded base64 of ``n`` random bytes."""
    return base64.b64encode(os.urandom(n)).decode("ascii")


def digest(*parts: str) -> bytes:
    """SHA-256 of the UTF-8 concatenation of ``parts`` (the v1 signing digests, §4.2/§4.3)."""
    return hashlib.sha256("".join(parts).encode("utf-8")).digest()


def new_ephemeral_pub() -> str:
    """A fresh uncompressed P-256 public point as hex130."""
    key = ec.generate_private_key(ec.SECP256R1())
    raw = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return raw.hex()


def nested_ping(containers: int, leaf: str = "") -> str:
    """A ``ping`` whose JSON nests exactly ``containers`` objects/arrays deep (the envelope counts 2)."""
    inner = containers - 2
    assert inner >= 1
    return '{"type":"ping","payload":{"x":' + "[" * inner + leaf + "]" * inner + "}}"


class RawV1:
    """
    A v1 handshake written out by hand over a ``RawConnection``.

    ``hello``/``auth`` build the two client messages; keyword arguments
    replace or add payload fields, so tests can send upper-case hex, wrong
    versions or forged signatures. The signatures are computed over the
    strings exactly as sent.
    """

    def __init__(self, identity: Identity, device_id: Optional[str] = None) -> None:
        self.identity = identity
        self.device_id = device_id or str(uuid.uuid4())
        self.nonce_c = os.urandom(32).hex()
        self.client_ephemeral_pub = new_ephemeral_pub()

    def hello(self, **fields: Any) -> Dict[str, Any]:
        """The ``client_hello`` message; remembers ``nonce_c`` as sent."""
        payload: Dict[str, Any] = {"client_ephemeral_pub": self.client_ephemeral_pub, "nonce_c": self.nonce_c}
        payload.update(fields)
        if isinstance(payload.get("nonce_c"), str):
            self.nonce_c = payload["nonce_c"]
        return {"type": "client_hello", "payload": payload}

    def auth(
        self,
        server_hello: Dict[str, Any],
        *,
        user_id: Optional[str] = None,
        device_id: Optional[str] = None,
        signer: Optional[Identity] = None,
        **fields: Any,
    ) -> Dict[str, Any]:
        """The ``client_auth`` message answering ``server_hello`` (its payload), signed by ``signer``."""
        user_id = user_id if user_id is not None else self.identity.user_id
        device_id = device_id if device_id is not None else self.device_id
        d = digest(user_id, device_id, self.nonce_c, server_hello["nonce_s"], server_hello["server_ephemeral_pub"])
        payload: Dict[str, Any] = {
            "user_id": user_id,
            "device_id": device_id,
            "client_signature": (signer or self.identity).sign_hex(d),
            "nonce_c2": os.urandom(32).hex(),
            "device_type": "cli",
        }
        payload.update(fields)
        return {"type": "client_auth", "payload": payload}


# --------------------------------------------------------------------------
# Helpers bound to a test case


if TYPE_CHECKING:
    _TestCaseBase = TestCase
else:
    _TestCaseBase = object


class ConnectionTestMixin(_TestCaseBase):
    """Connecting, waiting and asserting, shared by every class below (mixed into a TestCase)."""

    backend: str
    # True: the class's tests share one server (tests.class_servers); only
    # for tests that use their own identities and spend little of the
    # per-IP connection and handshake-failure budgets.
    share_server = False

    async def server(self, *args: str, env: Optional[Dict[str, str]] = None) -> ServerProcess:
        """A healthy server on this class's backend with the given options (see ``share_server``)."""
        if self.share_server:
            return await class_server(self, args=list(args), env=env)
        return await start_server(self, args=list(args), env=env)

    async def open_raw(self, server: ServerProcess) -> RawConnection:
        """An open WebSocket to ``server`` with nothing sent yet; dropped after the test."""
        conn = await RawConnection.open(reactor, server.ws_url)
        self.addCleanup(drop_connection, lambda: conn)
        return conn

    async def connect(self, server: ServerProcess, identity: Identity, device_id: Optional[str] = None,
                      **kwargs: Any) -> Client:
        """A ``Client`` of ``identity`` that has completed the handshake; closed after the test."""
        client = Client(reactor, server.ws_url, identity, device_id=device_id, handshake_timeout=10, **kwargs)
        self.addCleanup(drop_connection, lambda: client.raw)
        await client.connect()
        return client

    async def expect(self, conn: RawConnection, msg_type: str, timeout: float = 5.0) -> Dict[str, Any]:
        """The next message of ``msg_type`` on ``conn`` (others are skipped); fails the test otherwise."""
        deadline = time.monotonic() + timeout
        seen: List[Any] = []
        while True:
            remaining = deadline - time.monotonic()
            try:
                message = await conn.next_message(timeout=max(remaining, 0.01))
            except ConnectionClosed as e:
                self.fail("socket closed {} {!r} while waiting for {}; saw {}".format(e.code, e.reason, msg_type, seen))
            except defer.TimeoutError:
                self.fail("no {} within {} s; saw {}".format(msg_type, timeout, seen))
            if isinstance(message, dict) and message.get("type") == msg_type:
                return message
            seen.append(message.get("type") if isinstance(message, dict) else message)

    async def close_of(self, conn: RawConnection, timeout: float = 5.0) -> Tuple[int, str, List[Any]]:
        """Read ``conn`` until it closes: (code, reason, types of the messages read before)."""
        deadline = time.monotonic() + timeout
        types: List[Any] = []
        while True:
            remaining = deadline - time.monotonic()
            try:
                message = await conn.next_message(timeout=max(remaining, 0.01))
            except ConnectionClosed as e:
                return e.code, e.reason, types
            except defer.TimeoutError:
                self.fail("socket still open after {} s; received {}".format(timeout, types))
            types.append(message.get("type") if isinstance(message, dict) else message)

    async def closed_within(self, conn: RawConnection, timeout: float) -> Tuple[int, str]:
        """``(code, reason)`` once ``conn`` closes; fails the test if it is still open after ``timeout``."""
        d = conn.closed
        d.addTimeout(timeout, reactor)
        try:
            return await d
        except defer.TimeoutError:
            self.fail("socket still open after {} s".format(timeout))
            raise  # unreachable

    async def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``predicate`` every 50 ms; fail the test with ``what`` if it is not true in time."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                self.fail("{} (waited {} s)".format(what, timeout))
            await sleep(0.05)

    async def receive(self, client: Client, event_ids: Iterable[str], timeout: float = 10.0) -> Dict[str, Dict[str, Any]]:
        """Wait until ``client`` has received every event in ``event_ids``; returns them by id."""
        wanted = set(event_ids)

        def got() -> Dict[str, Dict[str, Any]]:
            return {e["event_id"]: e for e in client.events_received if e.get("event_id") in wanted}

        await self.wait_until(
            lambda: len(got()) == len(wanted), timeout,
            "events not received: {}".format(sorted(wanted - set(got()))[:5]),
        )
        return got()

    async def handshake(self, conn: RawConnection, hs: RawV1, **auth_fields: Any) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """Run ``hs`` on ``conn`` to the end: (server_hello payload, session_established payload)."""
        conn.send_json(hs.hello())
        hello = (await self.expect(conn, "server_hello"))["payload"]
        conn.send_json(hs.auth(hello, **auth_fields))
        est = (await self.expect(conn, "session_established"))["payload"]
        return hello, est

    async def assertStillSyncs(self, server: ServerProcess, identity: Identity, client: Client) -> None:
        """``client`` is open, its events are stored and relayed, and it receives another device's events."""
        self.assertIsNone(client.close_info)
        other = await self.connect(server, identity)
        ack = await client.send_event("clipboard:main", "clipboard:text", b64(), timeout=5)
        self.assertIsInstance(ack.get("seq"), int, repr(ack))
        self.assertNotIn("dropped", ack)
        await self.receive(other, [ack["event_id"]], timeout=5)
        back = await other.send_event("clipboard:main", "clipboard:text", b64(), timeout=5)
        await self.receive(client, [back["event_id"]], timeout=5)
        self.assertIsNone(client.close_info)

    def assertServerHelloRefused(self, closed: Tuple[int, str, List[Any]], reason: Optional[str] = None) -> None:
        """The socket was closed 1008 (with ``reason`` if given) before any server_hello."""
        code, why, types = closed
        self.assertEqual(code, 1008, closed)
        if reason is not None:
            self.assertEqual(why, reason)
        self.assertNotIn("server_hello", types)


# --------------------------------------------------------------------------
# 1. Handshake


class HandshakeTests(ConnectionTestMixin):
    """The v1 handshake as old clients see it (§2, §4)."""

    share_server = True

    async def test_server_hello_is_enveloped_and_signed(self) -> None:
        """server_hello is {type, payload} with type repeated inside, protocol_version 1, a valid v1 signature and a fresh key per connection."""
        server = await self.server()
        hellos = []
        for _ in range(2):
            conn = await self.open_raw(server)
            hs = RawV1(Identity.generate())
            conn.send_json(hs.hello())
            message = await self.expect(conn, "server_hello")
            p = message["payload"]
            self.assertEqual(p.get("type"), "server_hello", message)
            self.assertIs(type(p["protocol_version"]), int)
            self.assertEqual(p["protocol_version"], 1)
            for name, size in (("server_ephemeral_pub", 130), ("nonce_s", 64), ("server_identity_pub", 64),
                               ("server_signature", 128)):
                self.assertRegex(p[name], "^[0-9a-fA-F]{%d}$" % size, name)
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes.fromhex(p["server_ephemeral_pub"]))
            signed = digest(p["server_identity_pub"], p["server_ephemeral_pub"], hs.nonce_c, p["nonce_s"])
            try:
                VerifyKey(bytes.fromhex(p["server_identity_pub"])).verify(signed, bytes.fromhex(p["server_signature"]))
            except BadSignatureError:
                self.fail("server_signature does not verify over SHA-256(identity ‖ ephemeral ‖ nonce_c ‖ nonce_s)")
            hellos.append(p)
        self.assertEqual(hellos[0]["server_identity_pub"], hellos[1]["server_identity_pub"])
        self.assertNotEqual(hellos[0]["server_ephemeral_pub"], hellos[1]["server_ephemeral_pub"])
        self.assertNotEqual(hellos[0]["nonce_s"], hellos[1]["nonce_s"])

    async def test_session_established_has_every_field(self) -> None:
        """session_established is enveloped, repeats type, and carries device_id, last_ack_device_seq 0, expires_at ~24 h, session_id, protocol_version 1, server_time."""
        server = await self.server()
        conn = await self.open_raw(server)
        hs = RawV1(Identity.generate())
        conn.send_json(hs.hello())
        hello = (await self.expect(conn, "server_hello"))["payload"]
        t0 = now_ms()
        conn.send_json(hs.auth(hello))
        message = await self.expect(conn, "session_established")
        t1 = now_ms()
        p = message["payload"]
        self.assertEqual(p.get("type"), "session_established", message)
        self.assertEqual(p["device_id"], hs.device_id)
        for name in ("last_ack_device_seq", "expires_at", "protocol_version", "server_time"):
            self.assertIs(type(p.get(name)), int, "{} is not an integer: {!r}".format(name, p.get(name)))
        self.assertEqual(p["last_ack_device_seq"], 0)
        self.assertEqual(p["protocol_version"], 1)
        self.assertIsInstance(p.get("session_id"), str)
        self.assertTrue(p["session_id"])
        self.assertGreaterEqual(p["server_time"], t0 - 1000)
        self.assertLessEqual(p["server_time"], t1 + 1000)
        # default session_max_age: 24 h minus a random 0-5 %
        self.assertGreaterEqual(p["expires_at"], t0 + 0.95 * DAY_MS - 1000)
        self.assertLessEqual(p["expires_at"], t1 + DAY_MS + 1000)

    async def test_last_ack_device_seq_is_highest_stored(self) -> None:
        """After storing device_seq 3 and 7, the device's next session_established says last_ack_device_seq 7 and has a new session_id."""
        server = await self.server()
        identity = Identity.generate()
        client = await self.connect(server, identity)
        first_session = client.session["session_id"]  # type: ignore[index]
        for seq in (3, 7):
            ack = await client.send_event("clipboard:main", "clipboard:text", b64(), device_seq=seq, timeout=5)
            self.assertIsInstance(ack.get("seq"), int, repr(ack))
        await client.close()
        again = await self.connect(server, identity, device_id=client.device_id)
        self.assertEqual(again.session["last_ack_device_seq"], 7)  # type: ignore[index]
        self.assertNotEqual(again.session["session_id"], first_session)  # type: ignore[index]

    async def test_flat_and_type_repeating_client_messages_accepted(self) -> None:
        """A flat client_hello/client_auth, and an enveloped one repeating type in the payload, both authenticate and sync."""
        server = await self.server()
        identity = Identity.generate()
        flat = await self.connect(server, identity, flat_hello=True)
        await self.assertStillSyncs(server, identity, flat)

        conn = await self.open_raw(server)
        hs = RawV1(identity)
        conn.send_json(hs.hello(type="client_hello"))
        hello = (await self.expect(conn, "server_hello"))["payload"]
        conn.send_json(hs.auth(hello, type="client_auth"))
        est = (await self.expect(conn, "session_established"))["payload"]
        self.assertEqual(est["device_id"], hs.device_id)

    async def test_uppercase_ids_accepted_and_lowercased(self) -> None:
        """Upper-case hex and UUIDs are signed as sent, accepted, and every id comes back lower-case (session, ack, relay, device row)."""
        server = await self.server()
        identity = Identity.generate()
        device_upper = str(uuid.uuid4()).upper()
        conn = await self.open_raw(server)
        hs = RawV1(identity, device_upper)
        conn.send_json(hs.hello(client_ephemeral_pub=hs.client_ephemeral_pub.upper(), nonce_c=hs.nonce_c.upper()))
        hello = (await self.expect(conn, "server_hello"))["payload"]
        signed = digest(hello["server_identity_pub"], hello["server_ephemeral_pub"], hs.nonce_c, hello["nonce_s"])
        try:  # the server signs nonce_c exactly as transmitted (upper-case)
            VerifyKey(bytes.fromhex(hello["server_identity_pub"])).verify(signed, bytes.fromhex(hello["server_signature"]))
        except BadSignatureError:
            self.fail("server_signature is not over the upper-case nonce_c as sent")
        auth = hs.auth(hello, user_id=identity.user_id.upper(), nonce_c2=os.urandom(32).hex().upper())
        auth["payload"]["client_signature"] = auth["payload"]["client_signature"].upper()
        conn.send_json(auth)
        est = (await self.expect(conn, "session_established"))["payload"]
        self.assertEqual(est["device_id"], device_upper.lower())

        event_id = str(uuid.uuid4()).upper()
        conn.send_json({"type": "event", "payload": {
            "event_id": event_id, "user_id": identity.user_id.upper(), "device_id": device_upper, "device_seq": 5,
            "stream_id": "clipboard:main", "stream_seq": 0, "type": "clipboard:text", "encrypted_payload": b64(),
        }})
        ack = (await self.expect(conn, "ack"))["payload"]
        self.assertEqual(ack.get("event_id"), event_id.lower(), ack)
        self.assertIsInstance(ack.get("seq"), int, repr(ack))

        other = await self.connect(server, identity)
        relayed = (await self.receive(other, [event_id.lower()]))[event_id.lower()]
        self.assertEqual((relayed["user_id"], relayed["device_id"]), (identity.user_id, device_upper.lower()))

        await conn.close()
        same_device = await self.connect(server, identity, device_id=device_upper.lower())
        self.assertEqual(same_device.session["last_ack_device_seq"], 5)  # type: ignore[index]


class HandshakeTestsSQLite(HandshakeTests, SQLiteMixin, TestCase):
    """HandshakeTests on SQLite."""


class HandshakeTestsPostgres(HandshakeTests, PostgresMixin, TestCase):
    """HandshakeTests on PostgreSQL."""


# --------------------------------------------------------------------------
# 2. Refused handshakes


class HandshakeRefusalTests(ConnectionTestMixin):
    """Bad handshakes close 1008 and authenticate nobody (§4.1, §4.3, §11)."""

    async def test_forged_client_signature(self) -> None:
        """client_auth signed by another key for the victim's user_id closes 1008 'Invalid client signature' without a session."""
        server = await self.server()
        victim, attacker = Identity.generate(), Identity.generate()
        conn = await self.open_raw(server)
        hs = RawV1(victim)
        conn.send_json(hs.hello())
        hello = (await self.expect(conn, "server_hello"))["payload"]
        conn.send_json(hs.auth(hello, signer=attacker))
        code, reason, types = await self.close_of(conn)
        self.assertEqual((code, reason), (1008, "Invalid client signature"))
        self.assertNotIn("session_established", types)

    async def test_ephemeral_key_not_on_curve(self) -> None:
        """A well-formed hex130 client_ephemeral_pub that is not a P-256 point closes 1008 before server_hello."""
        server = await self.server()
        bogus = "04" + "01" * 64
        with self.assertRaises(ValueError):  # the input really is off the curve
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes.fromhex(bogus))
        conn = await self.open_raw(server)
        conn.send_json(RawV1(Identity.generate()).hello(client_ephemeral_pub=bogus))
        self.assertServerHelloRefused(await self.close_of(conn))

    async def test_malformed_hello_fields(self) -> None:
        """A client_ephemeral_pub or nonce_c of the wrong length or not hex closes 1008 before server_hello."""
        server = await self.server()
        hs = RawV1(Identity.generate())
        cases = {
            "short key": {"client_ephemeral_pub": hs.client_ephemeral_pub[:128]},
            "non-hex key": {"client_ephemeral_pub": "zz" + hs.client_ephemeral_pub[2:]},
            "short nonce_c": {"nonce_c": hs.nonce_c[:62]},
            "non-hex nonce_c": {"nonce_c": "g" * 64},
            "missing nonce_c": {"nonce_c": None},
        }
        for name, fields in cases.items():
            conn = await self.open_raw(server)
            message = RawV1(Identity.generate()).hello(**fields)
            message["payload"] = {k: v for k, v in message["payload"].items() if v is not None}
            conn.send_json(message)
            closed = await self.close_of(conn)
            self.assertEqual(closed[0], 1008, "{}: {}".format(name, closed))
            self.assertNotIn("server_hello", closed[2], name)

    async def test_unsupported_protocol_version(self) -> None:
        """client_hello with protocol_version 3 closes 1008 'Unsupported protocol version' before server_hello."""
        server = await self.server()
        conn = await self.open_raw(server)
        conn.send_json(RawV1(Identity.generate()).hello(protocol_version=3))
        self.assertServerHelloRefused(await self.close_of(conn), "Unsupported protocol version")

    async def test_protocol_version_must_be_an_integer(self) -> None:
        """protocol_version "1", 1.0 or true is not the integer 1: each closes 1008 before server_hello."""
        server = await self.server()
        for raw_value in ('"1"', "1.0", "true"):
            conn = await self.open_raw(server)
            hs = RawV1(Identity.generate())
            conn.send_text('{"type":"client_hello","payload":{"client_ephemeral_pub":"%s","nonce_c":"%s",'
                           '"protocol_version":%s}}' % (hs.client_ephemeral_pub, hs.nonce_c, raw_value))
            closed = await self.close_of(conn)
            self.assertEqual(closed[0], 1008, "protocol_version {}: {}".format(raw_value, closed))
            self.assertNotIn("server_hello", closed[2], "protocol_version {} was accepted".format(raw_value))


class HandshakeRefusalTestsSQLite(HandshakeRefusalTests, SQLiteMixin, TestCase):
    """HandshakeRefusalTests on SQLite."""


class HandshakeRefusalTestsPostgres(HandshakeRefusalTests, PostgresMixin, TestCase):
    """HandshakeRefusalTests on PostgreSQL."""


# --------------------------------------------------------------------------
# 3. Malformed messages


class MalformedMessageTests(ConnectionTestMixin):
    """A frame that is not a JSON object with a string type closes only its own socket (§4.3, §8)."""

    share_server = True

    async def test_malformed_after_auth_closes_only_that_socket(self) -> None:
        """Invalid JSON after authentication closes 1008 'Invalid message format'; another client of the user keeps syncing."""
        server = await self.server()
        identity = Identity.generate()
        bystander = await self.connect(server, identity)
        broken = await self.connect(server, identity)
        assert broken.raw is not None
        broken.raw.send_text('{"type": "event", "payload": ')
        self.assertEqual(await self.closed_within(broken.raw, 5), (1008, "Invalid message format"))
        await self.assertStillSyncs(server, identity, bystander)

    async def test_malformed_before_auth_closes_only_that_socket(self) -> None:
        """Before authentication, invalid JSON, a non-object and a non-string type each close 1008 'Invalid message format'; another client keeps syncing."""
        server = await self.server()
        identity = Identity.generate()
        bystander = await self.connect(server, identity)
        hs = RawV1(identity)
        for with_hello, text in ((False, "{not json"), (True, "[1, 2]"), (True, '{"type": 5, "payload": {}}')):
            conn = await self.open_raw(server)
            if with_hello:
                conn.send_json(hs.hello())
            conn.send_text(text)
            code, reason, types = await self.close_of(conn)
            self.assertEqual((code, reason), (1008, "Invalid message format"), text)
            self.assertNotIn("session_established", types)
        await self.assertStillSyncs(server, identity, bystander)

    async def test_nan_deep_nesting_and_lone_surrogate_are_malformed(self) -> None:
        """NaN, Infinity, nesting 65 deep and a lone \\ud800 escape each close 1008 'Invalid message format'."""
        server = await self.server()
        identity = Identity.generate()
        bystander = await self.connect(server, identity)
        cases = {
            "NaN": '{"type":"ping","payload":{"x":NaN}}',
            "Infinity": '{"type":"ping","payload":{"x":Infinity}}',
            "depth 65": nested_ping(65),
            "lone surrogate": '{"type":"ping","payload":{"x":"\\ud800"}}',
        }
        for name, text in cases.items():
            client = await self.connect(server, identity)
            assert client.raw is not None
            client.raw.send_text(text)
            closed = await self.closed_within(client.raw, 5)
            self.assertEqual(closed, (1008, "Invalid message format"), name)
            self.assertNotIn("pong", [m.get("type") for m in client.messages], name)
        await self.assertStillSyncs(server, identity, bystander)

    async def test_json_at_the_edges_is_accepted(self) -> None:
        """Nesting exactly 64 deep (with or without a scalar leaf) and an escaped surrogate pair are valid: the ping is answered."""
        server = await self.server()
        client = await self.connect(server, Identity.generate())
        assert client.raw is not None
        cases = {
            "depth 64, empty leaf": nested_ping(64),
            "depth 64, scalar leaf": nested_ping(64, "1"),
            "surrogate pair": '{"type":"ping","payload":{"x":"\\ud83d\\ude00"}}',
        }
        for name, text in cases.items():
            mark = len(client.messages)
            client.raw.send_text(text)
            try:
                await client.wait_for("pong", timeout=5, since=mark)
            except ConnectionClosed as e:
                self.fail("{}: closed {} {!r}".format(name, e.code, e.reason))


class MalformedMessageTestsSQLite(MalformedMessageTests, SQLiteMixin, TestCase):
    """MalformedMessageTests on SQLite."""


class MalformedMessageTestsPostgres(MalformedMessageTests, PostgresMixin, TestCase):
    """MalformedMessageTests on PostgreSQL."""


# --------------------------------------------------------------------------
# 4. Message size


class MessageSizeTests(ConnectionTestMixin):
    """Messages over the size limit close 1009; 64 KiB before auth, max_message_bytes after (§1, §12)."""

    async def test_oversized_message_before_auth(self) -> None:
        """Before authentication a 60 KiB client_hello is answered and a 70 KiB one closes 1009; another client keeps syncing."""
        server = await self.server()
        identity = Identity.generate()
        bystander = await self.connect(server, identity)

        fits = await self.open_raw(server)
        fits.send_json(RawV1(identity).hello(padding="A" * (60 * 1024)))
        await self.expect(fits, "server_hello")

        big = await self.open_raw(server)
        big.send_json(RawV1(identity).hello(padding="A" * (70 * 1024)))
        code, reason, types = await self.close_of(big)
        self.assertEqual(code, 1009, (code, reason))
        self.assertNotIn("server_hello", types)
        await self.assertStillSyncs(server, identity, bystander)

    async def test_oversized_message_after_auth(self) -> None:
        """With --max-message-bytes 200000 a 150 kB message is served and a 250 kB event closes 1009 unstored; another client keeps syncing."""
        server = await self.server("--max-message-bytes", "200000", "--max-payload-bytes", "100000")
        identity = Identity.generate()
        bystander = await self.connect(server, identity)
        sender = await self.connect(server, identity)
        assert sender.raw is not None

        mark = len(sender.messages)
        sender.send_raw({"type": "ping", "payload": {"padding": "A" * 150_000}})
        await sender.wait_for("pong", timeout=5, since=mark)

        too_big = sender.send_event("files:main", "file:chunk", "A" * 250_000)
        code, reason = await self.closed_within(sender.raw, 5)
        self.assertEqual(code, 1009, reason)
        with self.assertRaises(ConnectionClosed):
            await too_big
        await self.assertStillSyncs(server, identity, bystander)
        self.assertNotIn("file:chunk", [e.get("type") for e in bystander.events_received])


class MessageSizeTestsSQLite(MessageSizeTests, SQLiteMixin, TestCase):
    """MessageSizeTests on SQLite."""


class MessageSizeTestsPostgres(MessageSizeTests, PostgresMixin, TestCase):
    """MessageSizeTests on PostgreSQL."""


# --------------------------------------------------------------------------
# 5. Unexpected messages before authentication


class PreAuthBudgetTests(ConnectionTestMixin):
    """v1 clients flush queued acks right after client_hello; 8 are tolerated, the 9th closes (§4.3)."""

    share_server = True

    async def test_eight_early_acks_are_ignored(self) -> None:
        """Eight ack frames sent right after client_hello are ignored and the handshake completes."""
        server = await self.server()
        conn = await self.open_raw(server)
        hs = RawV1(Identity.generate())
        conn.send_json(hs.hello())
        for n in range(8):
            conn.send_json({"type": "ack", "payload": {"device_seq": n + 1}})
        hello = (await self.expect(conn, "server_hello"))["payload"]
        conn.send_json(hs.auth(hello))
        est = (await self.expect(conn, "session_established"))["payload"]
        self.assertEqual(est["device_id"], hs.device_id)
        conn.send_json({"type": "ping", "payload": {}})
        await self.expect(conn, "pong")

    async def test_ninth_early_message_closes(self) -> None:
        """A ninth unexpected message before authentication closes 1008 'Too many messages before authentication'."""
        server = await self.server()
        conn = await self.open_raw(server)
        hs = RawV1(Identity.generate())
        conn.send_json(hs.hello())
        for n in range(9):
            conn.send_json({"type": "ack", "payload": {"device_seq": n + 1}})
        code, reason, types = await self.close_of(conn)
        self.assertEqual((code, reason), (1008, "Too many messages before authentication"))
        self.assertNotIn("session_established", types)


class PreAuthBudgetTestsSQLite(PreAuthBudgetTests, SQLiteMixin, TestCase):
    """PreAuthBudgetTests on SQLite."""


class PreAuthBudgetTestsPostgres(PreAuthBudgetTests, PostgresMixin, TestCase):
    """PreAuthBudgetTests on PostgreSQL."""


# --------------------------------------------------------------------------
# 6. Handshake deadline


class HandshakeTimeoutTests(ConnectionTestMixin):
    """A connection must be authenticated within --handshake-timeout seconds (§1)."""

    async def test_handshake_timeout(self) -> None:
        """With --handshake-timeout 1, a silent socket and one stuck after client_hello close 1008 'Handshake timeout'; an authenticated one stays."""
        server = await self.server("--handshake-timeout", "1")
        identity = Identity.generate()
        start = time.monotonic()
        silent = await self.open_raw(server)
        stuck = await self.open_raw(server)
        stuck.send_json(RawV1(identity).hello())
        done = await self.connect(server, identity)
        for name, conn, before_close in (("silent", silent, []), ("stuck after client_hello", stuck, ["server_hello"])):
            code, reason, types = await self.close_of(conn, timeout=5)
            elapsed = time.monotonic() - start
            self.assertEqual((code, reason), (1008, "Handshake timeout"), name)
            self.assertGreaterEqual(elapsed, 0.9, name)
            self.assertLessEqual(elapsed, 4.0, name)
            self.assertEqual(types, before_close, name)
        await sleep(max(0.0, 2.0 - (time.monotonic() - start)))
        await self.assertStillSyncs(server, identity, done)


class HandshakeTimeoutTestsSQLite(HandshakeTimeoutTests, SQLiteMixin, TestCase):
    """HandshakeTimeoutTests on SQLite."""


class HandshakeTimeoutTestsPostgres(HandshakeTimeoutTests, PostgresMixin, TestCase):
    """HandshakeTimeoutTests on PostgreSQL."""


# --------------------------------------------------------------------------
# 7. Session lifetime


class SessionExpiryTests(ConnectionTestMixin):
    """Sessions end at expires_at with 1001, pongs do not extend them, and no event is lost (§1, §9)."""

    async def test_session_closes_at_expires_at_despite_pongs(self) -> None:
        """With --session-max-age 2, expires_at is 1.9-2 s after auth and the socket is closed 1001 then, although every ping was answered."""
        server = await self.server("--session-max-age", "2", "--heartbeat-interval", "0.5", "--heartbeat-timeout", "10")
        t0 = now_ms()
        client = await self.connect(server, Identity.generate())
        t1 = now_ms()
        assert client.raw is not None and client.raw.protocol is not None and client.session is not None
        proto = client.raw.protocol
        pings: List[float] = []
        answer = proto.onPing

        def counting_ping(payload: bytes) -> None:
            pings.append(now_ms())
            answer(payload)  # autobahn's default: pong

        proto.onPing = counting_ping  # type: ignore[method-assign]
        expires_at = client.session["expires_at"]
        self.assertGreaterEqual(expires_at, t0 + 1900 - 20)
        self.assertLessEqual(expires_at, t1 + 2000 + 20)

        # When the close frame arrives, and when the socket is really closed
        # (a v1 client reconnects on the close event, i.e. once TCP is gone).
        await self.wait_until(lambda: proto.remoteCloseCode is not None or client.raw.close_info is not None, 5,
                              "no close frame by expires_at + 3 s")
        frame_at = now_ms()
        self.assertEqual((proto.remoteCloseCode, proto.remoteCloseReason), ROTATION)
        self.assertGreaterEqual(len(pings), 2, "the server should have pinged every 0.5 s")
        self.assertGreaterEqual(frame_at, expires_at - 50)
        self.assertLessEqual(frame_at, expires_at + 1000)
        d = client.raw.closed
        d.addTimeout(6, reactor)
        closed = await d
        closed_at = now_ms()
        self.assertEqual(closed, ROTATION)
        self.assertLessEqual(
            closed_at - frame_at, 1500,
            "the 1001 close frame came at expires_at{:+.0f} ms but the connection was only closed {:.0f} ms later".format(
                frame_at - expires_at, closed_at - frame_at),
        )

    async def test_events_sent_around_expiry_are_not_lost(self) -> None:
        """Events pipelined across the session deadline are either acked or, resent after reconnecting, acked; another device gets them all."""
        server = await self.server("--session-max-age", "2")
        identity = Identity.generate()
        sender = await self.connect(server, identity)
        assert sender.raw is not None and sender.session is not None
        await sleep(max(0.0, (sender.session["expires_at"] - 300 - now_ms()) / 1000.0))
        sent: List[Tuple[str, int, "defer.Deferred[Dict[str, Any]]"]] = []
        acks: Dict[str, Dict[str, Any]] = {}
        proto = sender.raw.protocol
        assert proto is not None
        # Send until the close frame arrives. (The SDK raises at once, and leaks
        # an unhandled ack Deferred, when asked to send while the socket closes.)
        while proto.state == WebSocketProtocol.STATE_OPEN and len(sent) < 300:
            for _ in range(5):
                event_id, seq = str(uuid.uuid4()), sender.next_device_seq
                d = sender.send_event("clipboard:main", "clipboard:text", b64(), event_id=event_id, device_seq=seq)
                d.addCallback(lambda ack, eid=event_id: acks.__setitem__(eid, ack))
                d.addErrback(lambda f: f.trap(ConnectionClosed))
                sent.append((event_id, seq, d))
            await sleep(0.01)
        self.assertEqual(await self.closed_within(sender.raw, 8), ROTATION)
        self.assertTrue(acks, "no event was acked before the session ended")
        for ack in acks.values():
            self.assertIsInstance(ack.get("seq"), int, repr(ack))

        await sender.connect()
        unacked = [(eid, seq) for eid, seq, _ in sent if eid not in acks]
        for eid, seq in unacked:
            ack = await sender.send_event("clipboard:main", "clipboard:text", b64(), event_id=eid, device_seq=seq,
                                          timeout=5)
            self.assertIsInstance(ack.get("seq"), int, repr(ack))
            self.assertNotIn("dropped", ack)

        reader = await self.connect(server, identity)
        await reader.catch_up(limit=1000, timeout=5)
        await self.receive(reader, [eid for eid, _, _ in sent], timeout=5)


class SessionExpiryTestsSQLite(SessionExpiryTests, SQLiteMixin, TestCase):
    """SessionExpiryTests on SQLite."""


class SessionExpiryTestsPostgres(SessionExpiryTests, PostgresMixin, TestCase):
    """SessionExpiryTests on PostgreSQL."""


# --------------------------------------------------------------------------
# 8. Rate-limit backpressure


class BackpressureTests(ConnectionTestMixin):
    """Over the event rate the server stops reading; it never drops or closes (§12)."""

    async def test_burst_over_rate_is_slowed_not_dropped(self) -> None:
        """At 20 events/s (burst 20), 200 pipelined events are all acked in order over >= 6 s on an open socket, and another device gets all 200."""
        server = await self.server("--events-per-device-rate", "20", "--events-per-device-burst", "20")
        identity = Identity.generate()
        reader = await self.connect(server, identity)
        sender = await self.connect(server, identity)
        acked_order: List[int] = []
        acks: List[Dict[str, Any]] = []
        pending = []
        start = time.monotonic()
        for _ in range(200):
            d = sender.send_event("clipboard:main", "clipboard:text", b64())
            d.addCallback(lambda ack: (acked_order.append(ack["device_seq"]), acks.append(ack)))
            pending.append(d)
        await self.wait_until(lambda: len(acks) == 200 or sender.close_info is not None, 40,
                              "only {} of 200 events acked".format(len(acks)))
        elapsed = time.monotonic() - start
        self.assertIsNone(sender.close_info, "the server closed a socket for sending too fast")
        self.assertEqual(len(acks), 200)
        self.assertEqual(acked_order, sorted(acked_order))
        self.assertEqual(len(set(acked_order)), 200)
        self.assertEqual([a for a in acks if a.get("dropped")], [])
        seqs = [a["seq"] for a in acks]
        self.assertEqual(seqs, sorted(seqs))
        self.assertGreaterEqual(elapsed, 6.0, "200 events at 20/s burst 20 were taken in {:.1f} s".format(elapsed))
        await self.receive(reader, [a["event_id"] for a in acks], timeout=15)
        self.assertIsNone(reader.close_info)


class BackpressureTestsSQLite(BackpressureTests, SQLiteMixin, TestCase):
    """BackpressureTests on SQLite."""


class BackpressureTestsPostgres(BackpressureTests, PostgresMixin, TestCase):
    """BackpressureTests on PostgreSQL."""


# --------------------------------------------------------------------------
# 9. Sockets per device


class SocketLimitTests(ConnectionTestMixin):
    """A device may hold --sockets-per-device sockets; the next is refused with 4029 (§11, §12)."""

    async def test_third_socket_of_a_device_refused(self) -> None:
        """With --sockets-per-device 2, the 3rd socket closes 4029 '…; retry after N s', the first two keep syncing, and a freed slot is reusable."""
        server = await self.server("--sockets-per-device", "2")
        identity = Identity.generate()
        device_id = str(uuid.uuid4())
        first = await self.connect(server, identity, device_id)
        second = await self.connect(server, identity, device_id, next_device_seq=1000)  # one device, one seq space
        with self.assertRaises(ConnectionClosed) as caught:
            await self.connect(server, identity, device_id)
        self.assertEqual(caught.exception.code, 4029, str(caught.exception))
        match = RETRY_AFTER.search(caught.exception.reason)
        self.assertTrue(match, "4029 reason {!r} lacks '; retry after N s'".format(caught.exception.reason))
        self.assertGreaterEqual(int(match.group(1)), 1)  # type: ignore[union-attr]
        await self.assertStillSyncs(server, identity, first)
        await self.assertStillSyncs(server, identity, second)

        await second.close()
        await self.connect(server, identity, device_id)


class SocketLimitTestsSQLite(SocketLimitTests, SQLiteMixin, TestCase):
    """SocketLimitTests on SQLite."""


class SocketLimitTestsPostgres(SocketLimitTests, PostgresMixin, TestCase):
    """SocketLimitTests on PostgreSQL."""


# --------------------------------------------------------------------------
# 10. Heartbeat


class HeartbeatTests(ConnectionTestMixin):
    """A socket that stops answering pings is closed; one that answers is not (§1)."""

    async def test_client_ignoring_pings_is_closed(self) -> None:
        """With --heartbeat-interval 1 --heartbeat-timeout 2, a client that never pongs gets 1008 'Heartbeat timeout' within 8 s; a ponging one stays."""
        server = await self.server("--heartbeat-interval", "1", "--heartbeat-timeout", "2")
        identity = Identity.generate()
        healthy = await self.connect(server, identity)
        silent = await self.connect(server, identity)
        assert silent.raw is not None and silent.raw.protocol is not None
        ignored: List[bytes] = []
        silent.raw.protocol.onPing = ignored.append  # type: ignore[method-assign]
        start = time.monotonic()
        closed = await self.closed_within(silent.raw, 8)
        elapsed = time.monotonic() - start
        self.assertEqual(closed, (1008, "Heartbeat timeout"))
        self.assertTrue(ignored, "the server never pinged")
        self.assertGreaterEqual(elapsed, 1.5)
        await self.assertStillSyncs(server, identity, healthy)

    async def test_client_not_reading_is_dropped(self) -> None:
        """With --heartbeat-interval 1 --heartbeat-timeout 2, a client that stops reading is dropped (other devices see it offline) within ~9 s; a normal client stays."""
        server = await self.server("--heartbeat-interval", "1", "--heartbeat-timeout", "2")
        identity = Identity.generate()
        healthy = await self.connect(server, identity)
        stalled = await self.connect(server, identity)
        assert stalled.raw is not None

        def offline_notices() -> List[Dict[str, Any]]:
            return [m["payload"] for m in healthy.messages
                    if m.get("type") == "device_status_changed"
                    and m["payload"].get("device_id") == stalled.device_id and m["payload"].get("is_online") is False]

        stalled.raw.pause_reading()
        await self.wait_until(lambda: bool(offline_notices()), 11,
                              "the server kept a socket that stopped answering pings")
        stalled.raw.resume_reading()
        code, reason = await self.closed_within(stalled.raw, 5)
        if code == 1008:
            self.assertEqual(reason, "Heartbeat timeout")
        else:
            self.assertEqual(code, 1006, (code, reason))
        await self.assertStillSyncs(server, identity, healthy)


class HeartbeatTestsSQLite(HeartbeatTests, SQLiteMixin, TestCase):
    """HeartbeatTests on SQLite."""


class HeartbeatTestsPostgres(HeartbeatTests, PostgresMixin, TestCase):
    """HeartbeatTests on PostgreSQL."""


# --------------------------------------------------------------------------
# 11. Configuration and the server key


class ConfigurationErrorTests(TestCase):
    """A bad setting ends twistd non-zero with one stderr line naming it, never a traceback."""

    def assertOneLineError(self, result: ExitResult, setting: str) -> None:
        self.assertNotEqual(result.code, 0, result.output)
        self.assertNotIn("Traceback", result.output)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, "stderr:\n" + result.stderr)
        self.assertIn(setting, lines[0])

    async def test_bad_option_value(self) -> None:
        """--max-message-bytes abc exits non-zero with one line naming max-message-bytes."""
        result = await make_server(self, args=["--max-message-bytes", "abc"]).start_expect_failure()
        self.assertOneLineError(result, "max-message-bytes")

    async def test_unsupported_database_url(self) -> None:
        """DATABASE_URL=mysql://x exits non-zero with one line naming DATABASE_URL."""
        result = await make_server(self, env={"DATABASE_URL": "mysql://x"}).start_expect_failure()
        self.assertOneLineError(result, "DATABASE_URL")

    async def test_mismatched_server_key_pair(self) -> None:
        """SERVER_PRIVATE_KEY_HEX with a SERVER_PUBLIC_KEY_HEX of another key exits non-zero, names the setting, and never prints the private key."""
        private = "11" * 32
        other_public = bytes(SigningKey(b"\x22" * 32).verify_key).hex()
        result = await make_server(
            self, env={"SERVER_PRIVATE_KEY_HEX": private, "SERVER_PUBLIC_KEY_HEX": other_public}
        ).start_expect_failure()
        self.assertOneLineError(result, "SERVER_")
        self.assertRegex(result.stderr, "SERVER_(PUBLIC|PRIVATE)_KEY_HEX")
        self.assertNotIn(private, result.output.lower())


class ServerKeyTests(ConnectionTestMixin):
    """The server identity key: generated once with mode 0600, stable, never logged (§4.2)."""

    async def identity_pub(self, server: ServerProcess) -> str:
        conn = await self.open_raw(server)
        conn.send_json(RawV1(Identity.generate()).hello())
        pub = (await self.expect(conn, "server_hello"))["payload"]["server_identity_pub"]
        await conn.close()
        return str(pub)

    async def test_generated_key_is_private_and_survives_restart(self) -> None:
        """Without SERVER_* keys the generated key file has mode 0600, the same server_identity_pub comes back after a restart, and the private key is never logged."""
        server = await self.server()
        before = await self.identity_pub(server)
        path = os.path.join(server.data_dir, "server_identity.key")
        self.assertTrue(os.path.isfile(path), "no key file in {}: {}".format(server.data_dir, os.listdir(server.data_dir)))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path, encoding="ascii") as f:
            secret = f.read().strip().lower()
        self.assertRegex(secret, "^([0-9a-f]{64}|[0-9a-f]{128})$")
        self.assertEqual(bytes(SigningKey(bytes.fromhex(secret[:64])).verify_key).hex(), before)

        await server.restart()
        self.assertEqual(await self.identity_pub(server), before)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        everything = (server.log_text() + server.stdout_text() + server.stderr_text()).lower()
        self.assertIn(before, everything, "the log should name the public key (sanity check of the log capture)")
        self.assertNotIn(secret[:64], everything)

    async def test_key_from_environment_is_used_and_not_logged(self) -> None:
        """With a matching SERVER_PRIVATE_KEY_HEX/SERVER_PUBLIC_KEY_HEX pair the server signs with that key and never logs the private half."""
        private = os.urandom(32).hex()
        public = bytes(SigningKey(bytes.fromhex(private)).verify_key).hex()
        server = await self.server(env={"SERVER_PRIVATE_KEY_HEX": private, "SERVER_PUBLIC_KEY_HEX": public})
        self.assertEqual(await self.identity_pub(server), public)
        await server.stop()
        everything = (server.log_text() + server.stdout_text() + server.stderr_text()).lower()
        self.assertNotIn(private, everything)


class ServerKeyTestsSQLite(ServerKeyTests, SQLiteMixin, TestCase):
    """ServerKeyTests on SQLite."""


class ServerKeyTestsPostgres(ServerKeyTests, PostgresMixin, TestCase):
    """ServerKeyTests on PostgreSQL."""


# --------------------------------------------------------------------------
# 12. Application-level ping


class AppPingTests(ConnectionTestMixin):
    """``ping`` is answered with ``pong`` and the server time (§8)."""

    async def test_ping_answered_with_timestamp(self) -> None:
        """An enveloped and a flat ping are each answered with pong {timestamp: now in ms}, and the socket stays open."""
        server = await self.server()
        client = await self.connect(server, Identity.generate())
        for ping in ({"type": "ping", "payload": {}}, {"type": "ping"}):
            mark = len(client.messages)
            t0 = now_ms()
            client.send_raw(ping)
            pong = await client.wait_for("pong", timeout=5, since=mark)
            t1 = now_ms()
            stamp = pong["payload"].get("timestamp")
            self.assertIs(type(stamp), int, pong)
            self.assertGreaterEqual(stamp, t0 - 1000)
            self.assertLessEqual(stamp, t1 + 1000)
        self.assertIsNone(client.close_info)


class AppPingTestsSQLite(AppPingTests, SQLiteMixin, TestCase):
    """AppPingTests on SQLite."""


class AppPingTestsPostgres(AppPingTests, PostgresMixin, TestCase):
    """AppPingTests on PostgreSQL."""
