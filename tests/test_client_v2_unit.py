"""
Unit tests of the v2 client SDK: no sockets, no sleeps.

The handshake tests feed the PROTOCOL.md §13 inputs to ``V2Handshake``. The
loopback tests run the real ``Client``/``RawConnection``/Autobahn client
against an Autobahn server over ``twisted.test.iosim`` on a Clock; that
server answers with the real server's sans-IO ``ServerHandshake`` and
``FrameCipher``, so the fake cannot drift from the server's crypto.
"""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Dict, List, Optional

import orjson
import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.protocol import crypto, wire
from pocketbridge.client import (
    Client,
    ConnectionClosed,
    DecryptFailed,
    DeviceKeys,
    EventRejected,
    HandshakeError,
    Identity,
    RawConnection,
    ReconnectingClient,
    RetryPolicy,
    ServerKeyChanged,
    V2Codec,
    V2Handshake,
    server_address,
)
from pocketbridge.client.testing import LoopbackEndpoint
from pocketbridge.server.gateway.handshake import ServerHandshake

# PROTOCOL.md §13
V = {
    "user_id": "d04ab232742bb4ab3a1368bd4615e4e6d0224ab71a016baf8520a332c9778737",
    "server_identity_pub": "a09aa5f47a6759802ff955f8dc2d2a14a5c99d23be97f864127ff9383455a4f0",
    "client_ephemeral_pub": "0451a7580833898ea1b183cbd7350a4099078c6ef1c1e18e970cd7683035f25e7d0110522712b0b5a7cff081685486984a94e6831edac46e7360fa9d834a7a81a1",
    "server_ephemeral_pub": "045b36890dacbd7c9a96bb74a1ee28b3d2d75b72e09a20ef25cf8e6fd8a9f0350d0e14bed8d4682a34d83538bdff5b96e89a6666ec0db5745d02fa1210072df75a",
    "th": "a3fb4aad4c0fb8a6969a1228f98c30efd17356174a4efb7148d22b0905d736fd",
    "server_signature": "eca2b172d05bdf4319b94d5a4acc669e008a379e6af12219b6c1073316716a5d4bcf882982b002a005735d670ca32187a6a08ec09991ea55d763281d405eeb06",
    "client_signature": "8c051204b9c634fe3ee6ed0537c24d3e79f14e70bb6e13c4cb405f50998a9f18763bdab93fcb5e086ced3666ec3136827bdec4198125905806ed72d961ca2d01",
    "k_c2s": "5f26cdef4a8eb32f3403686005e41c32ed81312d8fa99716ee793fad39a06dd3",
    "k_s2c": "f39c51b441eb96a7e3060717050f53939d2135a170bc76437e391cb2729b845b",
    "v1_server_signature": "8d3f8c4305d4f3af18a805bc815110d3f87151e2bd7be2bc3a01a1a1cc45f36578f06891604e9bcb0d8c19d18f7f3328db928277b86c3b62c299cb7823b1a802",
}
FIRST_FRAME_PLAINTEXT = (
    b'{"type":"session_established","payload":{"device_id":"0b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b",'
    b'"last_ack_device_seq":0}}'
)
FIRST_FRAME = bytes.fromhex(
    "827cae7f775868d25d2c1b9bd5786a40eaad0af98c5f88f1d206375b71daa48f90ef132e9b39b0223976c32ed79aadaa7afcc06ab879"
    "d6b751afb316ccbb23a48d359ee9b96915538d01a8f2cbf2bdc82ec575a97f294afcc9521b9c59986273173c5a46b4aace8f8a025f2faa"
    "a237746890544a41eb921b0d1b005aaecd4d255061482ab7"
)
DEVICE_ID = "0b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b"
VECTOR_IDENTITY = Identity.from_seed(bytes([0x11]) * 32)
SERVER_KEY = crypto.signing_key_from_seed(bytes([0x22]) * 32)
OTHER_SERVER_KEY = crypto.signing_key_from_seed(bytes([0x55]) * 32)
URL = "ws://test:3001/ws"
ADDRESS = "test:3001"
OTHER_DEVICE = "11111111-1111-4111-8111-111111111111"


def vector_handshake(**kwargs: Any) -> V2Handshake:
    """A V2Handshake with the §13 client inputs."""
    kwargs.setdefault("server_address", ADDRESS)
    return V2Handshake(
        VECTOR_IDENTITY, DEVICE_ID, ephemeral=crypto.ephemeral_from_scalar(bytes([0x33]) * 32), nonce_c="aa" * 32,
        **kwargs,
    )


def vector_server_hello(**changes: Any) -> Dict[str, Any]:
    """The §13 v2 server_hello payload, with optional changes."""
    payload: Dict[str, Any] = {
        "type": "server_hello",
        "server_ephemeral_pub": V["server_ephemeral_pub"],
        "nonce_s": "bb" * 32,
        "server_identity_pub": V["server_identity_pub"],
        "server_signature": V["server_signature"],
        "protocol_version": 2,
    }
    payload.update(changes)
    return payload


def hello_signed_by(key: Any) -> Dict[str, Any]:
    """A correct v2 server_hello for the §13 transcript, but from the server identity ``key``."""
    pub = bytes(key.verify_key)
    th = crypto.v2_transcript(bytes.fromhex(V["client_ephemeral_pub"]), bytes([0xAA]) * 32,
                              bytes.fromhex(V["server_ephemeral_pub"]), bytes([0xBB]) * 32, pub)
    return vector_server_hello(server_identity_pub=pub.hex(),
                               server_signature=key.sign(crypto.v2_server_message(th)).signature.hex())


class V2HandshakeVectorTests(SynchronousTestCase):
    """The v2 handshake against the PROTOCOL.md §13 vectors."""

    def started(self, **kwargs: Any) -> V2Handshake:
        """A vector handshake whose client_hello was sent."""
        hs = vector_handshake(**kwargs)
        hs.client_hello()
        return hs

    def test_client_hello_announces_version_2(self) -> None:
        """client_hello carries the §13 point and nonce and protocol_version 2."""
        self.assertEqual(vector_handshake().client_hello(), {"type": "client_hello", "payload": {
            "client_ephemeral_pub": V["client_ephemeral_pub"], "nonce_c": "aa" * 32, "protocol_version": 2}})

    def test_transcript_signatures_and_keys(self) -> None:
        """The §13 server_hello verifies; TH, client_signature, k_c2s and k_s2c equal the vectors."""
        hs = self.started()
        auth = hs.on_server_hello(vector_server_hello())
        assert hs.transcript is not None and hs.k_c2s is not None and hs.k_s2c is not None
        self.assertEqual(hs.transcript.hex(), V["th"])
        self.assertEqual(hs.k_c2s.hex(), V["k_c2s"])
        self.assertEqual(hs.k_s2c.hex(), V["k_s2c"])
        self.assertEqual(auth, {"type": "client_auth", "payload": {
            "user_id": V["user_id"], "device_id": DEVICE_ID, "client_signature": V["client_signature"],
            "device_type": "cli"}})

    def test_first_server_frame_vector_through_the_codec(self) -> None:
        """The codec opens the §13 encrypted session_established (counter 0); a server-side codec seals it to the same bytes."""
        hs = self.started()
        hs.on_server_hello(vector_server_hello())
        self.assertEqual(hs.codec().decode(FIRST_FRAME, True), orjson.loads(FIRST_FRAME_PLAINTEXT))
        server_side = V2Codec(bytes.fromhex(V["k_s2c"]), bytes.fromhex(V["k_c2s"]))
        self.assertEqual(server_side.encode(orjson.loads(FIRST_FRAME_PLAINTEXT)), (FIRST_FRAME, True))

    def test_client_auth_is_the_first_encrypted_frame_with_counter_0(self) -> None:
        """client_auth sealed by the codec is AES-GCM under k_c2s with nonce 0…0 and opens with the server's cipher."""
        hs = self.started(resume_from=12)
        auth = hs.on_server_hello(vector_server_hello())
        codec = hs.codec()
        frame, binary = codec.encode(auth)
        self.assertTrue(binary)
        expected = AESGCM(bytes.fromhex(V["k_c2s"])).encrypt(bytes(12), orjson.dumps(auth), None)
        self.assertEqual(frame, expected)
        fields = wire.parse_message(crypto.FrameCipher(bytes.fromhex(V["k_c2s"])).open(frame))
        self.assertEqual(fields, ("client_auth", auth["payload"]))
        self.assertEqual(auth["payload"]["resume_from"], 12)
        self.assertEqual(codec.send_counter, 1)

    def test_codec_counts_each_direction_and_rejects_replays_and_text(self) -> None:
        """Frames must arrive in counter order: a repeated frame, a text frame or a wrong key fails to decrypt."""
        hs = self.started()
        hs.on_server_hello(vector_server_hello())
        client = hs.codec()
        server = V2Codec(bytes.fromhex(V["k_s2c"]), bytes.fromhex(V["k_c2s"]))
        one, _ = server.encode({"type": "a", "payload": {}})
        two, _ = server.encode({"type": "b", "payload": {}})
        self.assertEqual(client.decode(one, True)["type"], "a")
        self.assertRaises(DecryptFailed, client.decode, one, True)  # a replay uses the wrong counter
        self.assertRaises(DecryptFailed, client.decode, two, False)  # text frames are refused
        self.assertEqual(client.decode(two, True)["type"], "b")
        stranger = V2Codec(os.urandom(32), os.urandom(32))
        self.assertRaises(DecryptFailed, stranger.decode, one, True)

    def test_forged_v2_server_signature_aborts(self) -> None:
        """A flipped bit in the v2 server_signature, or a v1-style signature, fails the handshake and pins nothing."""
        flipped = ("0" if V["server_signature"][0] != "0" else "1") + V["server_signature"][1:]
        for signature in (flipped, V["v1_server_signature"]):
            pins: Dict[str, str] = {}
            hs = self.started(pins=pins)
            with self.subTest(signature=signature[:8]):
                self.assertRaises(HandshakeError, hs.on_server_hello, vector_server_hello(server_signature=signature))
                self.assertEqual(pins, {})
                self.assertIsNone(hs.k_c2s)

    def test_server_answering_version_1_aborts(self) -> None:
        """A v2 client aborts unless server_hello reads the integer 2 (1, true, "2", absent)."""
        for version in (1, True, "2", None):
            hs = self.started()
            with self.subTest(version=version):
                with self.assertRaises(HandshakeError) as caught:
                    hs.on_server_hello(vector_server_hello(protocol_version=version))
                self.assertIn("protocol_version", str(caught.exception))

    def test_bad_fields_abort(self) -> None:
        """An off-curve ephemeral key or a short nonce_s fails the handshake."""
        for change in ({"server_ephemeral_pub": "04" + "00" * 64}, {"nonce_s": "bb"}):
            hs = self.started()
            with self.subTest(change=change):
                self.assertRaises(HandshakeError, hs.on_server_hello, vector_server_hello(**change))

    def test_session_established_checked(self) -> None:
        """session_established must name our device, carry an integer last_ack_device_seq and not say version 1."""
        for bad in ({"device_id": DEVICE_ID}, {"device_id": DEVICE_ID, "last_ack_device_seq": 0, "protocol_version": 1},
                    {"device_id": OTHER_DEVICE, "last_ack_device_seq": 0}):
            hs = self.started()
            hs.on_server_hello(vector_server_hello())
            self.assertRaises(HandshakeError, hs.on_session_established, bad)
        hs = self.started()
        hs.on_server_hello(vector_server_hello())
        est = hs.on_session_established({"device_id": DEVICE_ID, "last_ack_device_seq": 3, "protocol_version": 2})
        self.assertEqual(est["last_ack_device_seq"], 3)


class PinningTests(SynchronousTestCase):
    """Trust on first use of the v2 server key (PROTOCOL.md §5: clients SHOULD pin)."""

    def setUp(self) -> None:
        self.path = os.path.join(os.path.abspath(self.mktemp()), "device.json")
        self.keys = DeviceKeys(VECTOR_IDENTITY, DEVICE_ID)

    def handshake(self, **kwargs: Any) -> V2Handshake:
        """A vector handshake whose pins are the device key file's."""
        hs = vector_handshake(pins=self.keys.server_pins, **kwargs)
        hs.client_hello()
        return hs

    def test_first_use_pins_and_the_pin_is_saved(self) -> None:
        """The first verified server key is stored for host:port and survives save/load of the key file."""
        hs = self.handshake()
        hs.on_server_hello(vector_server_hello())
        self.assertEqual(hs.pin_status, "new")
        self.assertEqual(self.keys.server_pins, {ADDRESS: V["server_identity_pub"]})
        self.keys.save(self.path)
        loaded = DeviceKeys.load(self.path)
        self.assertEqual(loaded.pinned_server_key(URL), V["server_identity_pub"])
        self.assertIsNone(loaded.pinned_server_key("ws://test:3002/ws"))

    def test_pinned_key_enforced(self) -> None:
        """Once pinned, a correctly signed hello from another server key aborts with ServerKeyChanged; the pin stays."""
        self.handshake().on_server_hello(vector_server_hello())
        again = self.handshake()
        again.on_server_hello(vector_server_hello())
        self.assertEqual(again.pin_status, "pinned")
        other = hello_signed_by(OTHER_SERVER_KEY)
        with self.assertRaises(ServerKeyChanged) as caught:
            self.handshake().on_server_hello(other)
        self.assertIn(ADDRESS, str(caught.exception))
        self.assertIn(other["server_identity_pub"], str(caught.exception))
        self.assertEqual(self.keys.server_pins[ADDRESS], V["server_identity_pub"])

    def test_pin_is_per_address(self) -> None:
        """Another host:port is a first use of its own; the first pin is untouched."""
        self.handshake().on_server_hello(vector_server_hello())
        hs = self.handshake(server_address="other:443")
        hs.on_server_hello(hello_signed_by(OTHER_SERVER_KEY))
        self.assertEqual(hs.pin_status, "new")
        self.assertEqual(len(self.keys.server_pins), 2)

    def test_explicit_server_key_overrides_and_repins(self) -> None:
        """server_key= accepts a replaced key and re-pins it; a server_key that does not match aborts."""
        self.handshake().on_server_hello(vector_server_hello())
        other = hello_signed_by(OTHER_SERVER_KEY)
        hs = self.handshake(server_key=other["server_identity_pub"])
        hs.on_server_hello(other)
        self.assertEqual(hs.pin_status, "given")
        self.assertEqual(self.keys.server_pins[ADDRESS], other["server_identity_pub"])
        self.assertRaises(HandshakeError, self.handshake(server_key="ab" * 32).on_server_hello, other)

    def test_server_address(self) -> None:
        """Pins are keyed by lowercase host:port with default ports filled in."""
        self.assertEqual(server_address("ws://Example.COM/ws"), "example.com:80")
        self.assertEqual(server_address("wss://example.com/ws"), "example.com:443")
        self.assertEqual(server_address("ws://127.0.0.1:3001/ws"), "127.0.0.1:3001")
        self.assertEqual(server_address("ws://[::1]:3001/ws"), "[::1]:3001")

    def test_key_file_without_pins_still_loads(self) -> None:
        """A key file written before pins existed loads with no pins; malformed pins are refused."""
        doc = self.keys.to_dict()
        del doc["server_pins"]
        self.assertEqual(DeviceKeys.from_dict(doc).server_pins, {})
        from pocketbridge.client import KeyFileError
        doc["server_pins"] = {ADDRESS: "nothex"}
        self.assertRaises(KeyFileError, DeviceKeys.from_dict, doc)


# ---------------------------------------------------------------- loopback


class V2ServerProtocol(WebSocketServerProtocol):
    """One socket of ``V2ScriptedServer``: the real server handshake and ciphers, scripted after auth."""

    factory: "_V2Factory"

    def onOpen(self) -> None:
        """Start a server handshake with the §13 server ephemeral key and nonce_s."""
        self.script: V2ScriptedServer = self.factory.script
        self.handshake = ServerHandshake(
            self.script.signing_key,
            make_ephemeral=lambda: crypto.ephemeral_from_scalar(bytes([0x44]) * 32),
            random_bytes=lambda n: bytes([0xBB]) * n,
        )
        self.cipher_in: Optional[crypto.FrameCipher] = None
        self.cipher_out: Optional[crypto.FrameCipher] = None
        self.authenticated = False
        self.received: List[Any] = []
        self.script.protocols.append(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Decrypt (after server_hello), run the handshake, then the script's hook."""
        if self.cipher_in is not None:
            if not isBinary:
                self.close_with(1008, "Decrypt failed")
                return
            payload = self.cipher_in.open(payload)
        msg_type, fields = wire.parse_message(payload)
        self.received.append(orjson.loads(payload))
        if msg_type == "client_hello" and not self.handshake.hello_done:
            hello = self.handshake.client_hello(fields)
            if self.script.mutate_server_hello is not None:
                self.script.mutate_server_hello(hello)
            self.sendMessage(wire.encode("server_hello", hello), False)
            if self.handshake.keys is not None:
                self.cipher_in = crypto.FrameCipher(self.handshake.keys[0])
                self.cipher_out = crypto.FrameCipher(self.handshake.keys[1])
        elif msg_type == "client_auth" and not self.authenticated:
            self.script.first_frame_types.append(self.received[-1]["type"])
            auth = self.handshake.client_auth(fields)
            self.script.auths.append(fields)
            self.authenticated = True
            self.send({"type": "session_established", "payload": {
                "device_id": auth.device_id, "last_ack_device_seq": 0, "expires_at": 0, "session_id": "s",
                "protocol_version": 2, "server_time": 0}})
            if self.script.on_authenticated is not None:
                self.script.on_authenticated(self)
        elif self.authenticated:
            self.script.received.append(self.received[-1])
            if self.script.on_message is not None:
                self.script.on_message(self, self.received[-1])
        else:
            self.script.first_frame_types.append(msg_type)
            self.close_with(1008, "Expected client_auth")

    def send(self, obj: Any) -> None:
        """Send one message as an encrypted binary frame."""
        assert self.cipher_out is not None
        self.sendMessage(self.cipher_out.seal(orjson.dumps(obj)), True)

    def close_with(self, code: int, reason: str = "") -> None:
        """Send a close frame with any code."""
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8"), isReply=False)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        """Remember the client's close code."""
        self.close_seen = (code, reason)


class _V2Factory(WebSocketServerFactory):
    protocol = V2ServerProtocol

    def __init__(self, script: "V2ScriptedServer", clock: Any) -> None:
        super().__init__("ws://test/ws", reactor=clock)
        self.script = script


class V2ScriptedServer:
    """A fake v2 server for client unit tests (see ``V2ServerProtocol``)."""

    def __init__(self, clock: Any) -> None:
        self.signing_key = SERVER_KEY
        self.protocols: List[V2ServerProtocol] = []
        self.auths: List[Dict[str, Any]] = []
        self.received: List[Any] = []
        self.first_frame_types: List[str] = []
        self.mutate_server_hello: Optional[Callable[[Dict[str, Any]], None]] = None
        self.on_authenticated: Optional[Callable[[V2ServerProtocol], None]] = None
        self.on_message: Optional[Callable[[V2ServerProtocol, Any], None]] = None
        self.endpoint = LoopbackEndpoint(_V2Factory(self, clock), clock)

    def connector(self, reactor: Any, url: str, headers: Any) -> Any:
        """A ``Client(connector=...)`` reaching this server."""
        return RawConnection.open(reactor, url, headers, endpoint=self.endpoint)

    def flush(self) -> None:
        """Deliver everything in flight, both ways."""
        self.endpoint.flush()

    @property
    def current(self) -> V2ServerProtocol:
        """The most recent server socket."""
        return self.protocols[-1]

    def sent(self, msg_type: str) -> List[Dict[str, Any]]:
        """Payloads of the client's messages of ``msg_type`` after authentication."""
        return [m["payload"] for m in self.received if m.get("type") == msg_type]


def event(seq: int, event_id: Optional[str] = None) -> Dict[str, Any]:
    """A relayed event from another device of the §13 user."""
    return {"event_id": event_id or "00000000-0000-7000-8000-%012d" % seq, "user_id": V["user_id"],
            "device_id": OTHER_DEVICE, "device_seq": seq, "stream_id": "s", "stream_seq": seq, "type": "t",
            "encrypted_payload": "aGk=", "created_at": 1, "seq": seq}


def page(*seqs: int, has_more: bool = False) -> Dict[str, Any]:
    """A replay_response message holding events with these seqs."""
    return {"type": "replay_response", "payload": {"type": "replay_response", "events": [event(n) for n in seqs],
                                                   "has_more": has_more, "page_size": len(seqs),
                                                   "total_events": len(seqs)}}


class V2LoopbackTestCase(SynchronousTestCase):
    """Base: a Clock as Autobahn's loop and a V2ScriptedServer."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        old = txaio.config.loop
        txaio.config.loop = self.clock
        self.addCleanup(setattr, txaio.config, "loop", old)
        self.server = V2ScriptedServer(self.clock)

    def make_client(self, **kwargs: Any) -> Client:
        """A v2 Client of the §13 user wired to the scripted server."""
        kwargs.setdefault("device_id", DEVICE_ID)
        return Client.v2(self.clock, URL, VECTOR_IDENTITY, connector=self.server.connector, **kwargs)

    def connected(self, client: Optional[Client] = None, **kwargs: Any) -> Client:
        """A connected v2 Client."""
        client = client or self.make_client(**kwargs)
        d = client.connect()
        self.server.flush()
        self.successResultOf(d)
        return client

    def push(self, *messages: Dict[str, Any]) -> None:
        """Send messages from the server's current socket and deliver them."""
        for message in messages:
            self.server.current.send(message)
        self.server.flush()


class ClientV2LoopbackTests(V2LoopbackTestCase):
    """Client(protocol_version=2) + RawConnection + Autobahn against a scripted v2 server."""

    def test_connect_sends_vector_auth_as_first_encrypted_frame(self) -> None:
        """Over the wire the client verifies the §13 v2 hello and its first encrypted frame is client_auth with the §13 signature."""
        client = self.make_client(handshake_factory=lambda c: vector_handshake(pins=c.server_pins))
        d = client.connect()
        self.server.flush()
        est = self.successResultOf(d)
        self.assertEqual(est["protocol_version"], 2)
        self.assertEqual(self.server.first_frame_types, ["client_auth"])
        self.assertEqual(self.server.auths[0]["client_signature"], V["client_signature"])
        self.assertEqual(client.server_pins, {ADDRESS: V["server_identity_pub"]})

    def test_v1_default_is_kept(self) -> None:
        """Client() without protocol_version still speaks v1 (existing callers); Client.v2 and for_device speak v2."""
        self.assertEqual(Client(self.clock, URL, VECTOR_IDENTITY).protocol_version, 1)
        self.assertEqual(self.make_client().protocol_version, 2)
        self.assertEqual(Client.for_device(self.clock, URL, DeviceKeys(VECTOR_IDENTITY, DEVICE_ID)).protocol_version, 2)
        self.assertRaises(ValueError, Client, self.clock, URL, VECTOR_IDENTITY, protocol_version=3)

    def test_server_answering_version_1_fails_connect(self) -> None:
        """A server_hello with protocol_version 1 fails connect with HandshakeError and closes the socket."""
        self.server.mutate_server_hello = lambda hello: hello.update(protocol_version=1)
        client = self.make_client()
        d = client.connect()
        self.server.flush()
        self.failureResultOf(d, HandshakeError)
        self.assertEqual(self.server.auths, [])
        self.assertIsNotNone(client.raw.close_info)

    def test_pages_then_caught_up_acked_cumulatively(self) -> None:
        """Pushed pages reach catch_up in seq order, each page is acked with its last seq, caught_up gives H."""
        client = self.connected()
        done = client.catch_up()
        self.push(page(1, 2, 3, has_more=True), page(4, 5))
        self.assertNoResult(done)
        self.push({"type": "caught_up", "payload": {"seq": 5}})
        self.assertEqual([e["seq"] for e in self.successResultOf(done)], [1, 2, 3, 4, 5])
        self.assertEqual(self.server.sent("ack"), [{"seq": 3}, {"seq": 5}])
        self.assertEqual(self.successResultOf(client.wait_caught_up()), 5)
        self.assertEqual(client.last_received_seq, 5)

    def test_duplicates_dropped_by_event_id(self) -> None:
        """An event received twice (at-least-once) reaches next_event once; the repeat is acked, not re-acked."""
        client = self.connected()
        self.push({"type": "caught_up", "payload": {"seq": 0}},
                  {"type": "event", "payload": event(6)}, {"type": "event", "payload": event(6)},
                  {"type": "event", "payload": event(7)})
        got = [self.successResultOf(client.next_event())["seq"] for _ in range(2)]
        self.assertEqual(got, [6, 7])
        self.assertNoResult(client.next_event(timeout=None))
        self.assertEqual(self.server.sent("ack"), [{"seq": 6}, {"seq": 7}])

    def test_live_acks_coalesced_with_ack_interval(self) -> None:
        """With ack_interval, three live events produce one cumulative ack after the interval."""
        self.connected(ack_interval=0.05)
        self.push({"type": "caught_up", "payload": {"seq": 0}},
                  *[{"type": "event", "payload": event(n)} for n in (1, 2, 3)])
        self.assertEqual(self.server.sent("ack"), [])
        self.clock.advance(0.05)
        self.server.flush()
        self.assertEqual(self.server.sent("ack"), [{"seq": 3}])

    def test_on_event_runs_before_the_ack(self) -> None:
        """on_event has the event before the server is told it was received."""
        acks_seen: List[int] = []
        self.connected(on_event=lambda e: acks_seen.append(len(self.server.sent("ack"))))
        self.push({"type": "caught_up", "payload": {"seq": 0}}, {"type": "event", "payload": event(1)})
        self.assertEqual(acks_seen, [0])
        self.assertEqual(self.server.sent("ack"), [{"seq": 1}])

    def test_errors_and_acks_in_arrival_order(self) -> None:
        """Three sends answered ack, seq_conflict error, ack resolve, fail with EventRejected, resolve."""
        def answer(proto: V2ServerProtocol, msg: Any) -> None:
            if msg["type"] != "event":
                return
            p = msg["payload"]
            if p["device_seq"] == 2:
                proto.send({"type": "error", "payload": {"code": "seq_conflict", "message": "used",
                                                         "in_reply_to": "event", "event_id": p["event_id"],
                                                         "device_seq": 2}})
            else:
                proto.send({"type": "ack", "payload": {"device_seq": p["device_seq"], "event_id": p["event_id"],
                                                       "seq": p["device_seq"], "stream_seq": 1}})
        self.server.on_message = answer
        client = self.connected()
        ds = [client.send_event("s", "t", "aGk=") for _ in range(3)]
        self.server.flush()
        self.assertEqual(self.successResultOf(ds[0])["seq"], 1)
        rejected = self.failureResultOf(ds[1], EventRejected).value
        self.assertEqual((rejected.code, rejected.payload["device_seq"]), ("seq_conflict", 2))
        self.assertEqual(self.successResultOf(ds[2])["seq"], 3)

    def test_error_for_another_message_does_not_fail_a_send(self) -> None:
        """An error in reply to an ack is recorded in errors and leaves pending sends alone."""
        client = self.connected()
        d = client.send_event("s", "t", "aGk=")
        self.push({"type": "error", "payload": {"code": "bad_request", "message": "x", "in_reply_to": "ack"}})
        self.assertNoResult(d)
        self.assertEqual(client.errors[-1]["code"], "bad_request")

    def test_replay_request_waits_for_the_running_catch_up(self) -> None:
        """replay_request during a catch-up is sent after its caught_up, and the replayed events are delivered again."""
        client = self.connected()
        self.push(page(1, 2, 3))
        for _ in range(3):
            self.successResultOf(client.next_event())
        d = client.replay_request(resume_from=1)
        self.server.flush()
        self.assertEqual(self.server.sent("replay_request"), [])
        self.push({"type": "caught_up", "payload": {"seq": 3}})
        self.assertEqual(self.server.sent("replay_request"), [{"resume_from": 1}])
        self.assertNoResult(d)
        self.push(page(2, 3), {"type": "caught_up", "payload": {"seq": 3}})
        self.assertEqual(self.successResultOf(d), 3)
        self.assertEqual([self.successResultOf(client.next_event())["seq"] for _ in range(2)], [2, 3])
        # The re-sent events are acked again, so a server window holding them reopens.
        self.assertEqual(self.server.sent("ack"), [{"seq": 3}, {"seq": 3}])

    def test_resync_required_reported(self) -> None:
        """resync_required reaches on_resync and client.resync."""
        seen: List[Dict[str, Any]] = []
        client = self.connected(on_resync=seen.append)
        self.push({"type": "resync_required", "payload": {"reason": "retention", "oldest_seq": 40}})
        self.assertEqual(seen, [{"reason": "retention", "oldest_seq": 40}])
        self.assertEqual(client.resync, seen[0])

    def test_text_frame_from_server_closes_1008(self) -> None:
        """A text frame from the server after the handshake makes the client close 1008 Decrypt failed."""
        client = self.connected()
        closed = client.closed
        self.server.current.sendMessage(b'{"type":"ping","payload":{}}', False)
        self.server.flush()
        self.successResultOf(closed)
        self.assertEqual((self.server.current.remoteCloseCode, self.server.current.remoteCloseReason),
                         (1008, "Decrypt failed"))

    def test_last_received_seq_saved_and_used_as_resume_from(self) -> None:
        """for_device saves the pin and last_received_seq; the next connection sends it as resume_from."""
        path = os.path.join(os.path.abspath(self.mktemp()), "device.json")
        keys = DeviceKeys(VECTOR_IDENTITY, DEVICE_ID)
        client = Client.for_device(self.clock, URL, keys, keys_path=path, connector=self.server.connector)
        self.connected(client)
        self.assertNotIn("resume_from", self.server.auths[0])
        self.push(page(1, 2), {"type": "caught_up", "payload": {"seq": 2}}, {"type": "event", "payload": event(7)})
        closing = client.close()
        self.server.flush()
        self.successResultOf(closing)
        loaded = DeviceKeys.load(path)
        self.assertEqual(loaded.last_received_seq, 7)
        self.assertEqual(loaded.server_pins, {ADDRESS: V["server_identity_pub"]})
        again = Client.for_device(self.clock, URL, loaded, keys_path=path, connector=self.server.connector)
        self.connected(again)
        self.assertEqual(self.server.auths[1]["resume_from"], 7)
        self.connected(Client.for_device(self.clock, URL, loaded, connector=self.server.connector, resume=False))
        self.assertNotIn("resume_from", self.server.auths[2])

    def test_changed_server_key_refused(self) -> None:
        """A client whose pin differs from the server's key fails connect with ServerKeyChanged and sends no client_auth."""
        client = self.make_client()
        client.server_pins[ADDRESS] = crypto.public_hex(OTHER_SERVER_KEY)
        d = client.connect()
        self.server.flush()
        self.failureResultOf(d, ServerKeyChanged)
        self.assertEqual(self.server.auths, [])

    def test_wait_caught_up_timeout_and_close(self) -> None:
        """wait_caught_up times out without caught_up and fails with ConnectionClosed once closed."""
        client = self.connected()
        d = client.wait_caught_up(timeout=2)
        self.clock.advance(2.1)
        self.failureResultOf(d, DeferTimeoutError)
        pending = client.wait_caught_up()
        self.server.current.close_with(4008, "Slow consumer")
        self.server.flush()
        self.assertEqual(self.failureResultOf(pending, ConnectionClosed).value.code, 4008)


class ReconnectV2Tests(V2LoopbackTestCase):
    """ReconnectingClient with a v2 Client."""

    def test_4008_reconnects_soon_and_resumes(self) -> None:
        """After a 4008 close the client reconnects within 1 s with resume_from = the last seq it received."""
        self.server.on_authenticated = lambda proto: (
            proto.send(page(1, 2, 3)), proto.send({"type": "caught_up", "payload": {"seq": 3}}))
        runner = ReconnectingClient(self.clock, self.make_client(), policy=RetryPolicy(rng=random.Random(3)))
        d = runner.run()
        self.server.flush()
        self.server.current.close_with(4008, "Slow consumer")
        self.server.flush()
        self.clock.advance(1.0)
        self.server.flush()
        self.assertEqual(len(self.server.auths), 2)
        self.assertEqual(self.server.auths[1]["resume_from"], 3)
        runner.stop()
        self.server.flush()
        self.successResultOf(d)

    def test_changed_server_key_stops_the_loop(self) -> None:
        """A pin mismatch ends run() with ServerKeyChanged and no retry."""
        client = self.make_client()
        client.server_pins[ADDRESS] = crypto.public_hex(OTHER_SERVER_KEY)
        d = ReconnectingClient(self.clock, client).run()
        self.server.flush()
        self.clock.advance(120)
        self.server.flush()
        self.failureResultOf(d, ServerKeyChanged)
        self.assertEqual(len(self.server.protocols), 1)
