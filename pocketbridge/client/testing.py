"""
In-memory test helpers for code that uses the client SDK: a scripted
Autobahn WebSocket server joined to the real client stack by
``twisted.test.iosim``, so tests run on a ``Clock`` without sockets.

    clock = Clock()
    txaio.config.loop = clock         # Autobahn's timers follow txaio's loop
    server = ScriptedServer(clock)
    client = Client(clock, "ws://test/ws", identity, connector=server.connector)
    d = client.connect(); server.flush(); est = successResultOf(d)

``ScriptedServer`` answers the v1 handshake honestly (it verifies the
client's signature with the same crypto as the real server) with the §13
server key, ephemeral key and nonce, and hands every later message to
``on_message(protocol, message)``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

import orjson
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.test import iosim
from zope.interface import implementer

from pocketbridge.protocol import crypto
from pocketbridge.client.connection import RawConnection

SERVER_SEED = bytes([0x22]) * 32
SERVER_EPHEMERAL_SCALAR = bytes([0x44]) * 32
NONCE_S = "bb" * 32


@implementer(IStreamClientEndpoint)
class LoopbackEndpoint:
    """An endpoint whose connections go to ``server_factory`` through an ``iosim`` pump."""

    def __init__(self, server_factory: Factory, clock: Any) -> None:
        self.server_factory = server_factory
        self.clock = clock
        self.pumps: List[iosim.IOPump] = []
        self.refuse_next: Optional[BaseException] = None

    def connect(self, protocol_factory: IProtocolFactory) -> "Deferred[IProtocol]":
        """Connect at once (or fail with ``refuse_next`` once)."""
        if self.refuse_next is not None:
            exc, self.refuse_next = self.refuse_next, None
            from twisted.internet.defer import fail

            return fail(exc)
        addr = IPv4Address("TCP", "127.0.0.1", 40000 + len(self.pumps))
        client = protocol_factory.buildProtocol(addr)
        server = self.server_factory.buildProtocol(addr)
        assert client is not None and server is not None
        pump = iosim.connect(
            server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), greet=False, clock=self.clock
        )
        self.pumps.append(pump)
        return succeed(client)

    def flush(self) -> None:
        """Move bytes both ways on every connection until nothing moves."""
        for pump in list(self.pumps):
            pump.flush()


class ScriptedServerProtocol(WebSocketServerProtocol):
    """One server-side socket of a ``ScriptedServer``."""

    factory: "_ScriptedFactory"
    nonce_c: str = ""

    def onOpen(self) -> None:
        """Register with the scripted server."""
        self.script: ScriptedServer = self.factory.script
        self.received: List[Any] = []
        self.authenticated = False
        self.script.protocols.append(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Record, then run the handshake or the test's hook."""
        message = orjson.loads(payload)
        self.received.append(message)
        self.script.received.append(message)
        self.script.handle(self, message)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        """Remember how the socket ended."""
        self.close_seen = (code, reason)

    def send(self, obj: Any) -> None:
        """Send one JSON text message."""
        self.sendMessage(orjson.dumps(obj), isBinary=False)

    def close_with(self, code: int, reason: str = "") -> None:
        """Send a close frame with any code (``sendClose`` refuses 1001, 1008, …)."""
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8"), isReply=False)


class _ScriptedFactory(WebSocketServerFactory):
    """The server factory, pointing back at its ScriptedServer."""

    protocol = ScriptedServerProtocol  # type: ignore[assignment]  # its factory is declared as _ScriptedFactory

    def __init__(self, script: "ScriptedServer", clock: Any) -> None:
        super().__init__("ws://test/ws", reactor=clock)
        self.script = script


class ScriptedServer:
    """
    A fake v1 server for client unit tests.

    ``last_ack_device_seq`` goes into ``session_established``;
    ``mutate_server_hello(payload)`` may tamper with ``server_hello``;
    ``on_authenticated(protocol)`` runs right after ``session_established``;
    ``on_message(protocol, message)`` gets every later message.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.signing_key = crypto.signing_key_from_seed(SERVER_SEED)
        self.ephemeral_pub = crypto.point_bytes(crypto.ephemeral_from_scalar(SERVER_EPHEMERAL_SCALAR)).hex()
        self.last_ack_device_seq = 0
        self.protocols: List[ScriptedServerProtocol] = []
        self.received: List[Any] = []
        self.client_auths: List[Dict[str, Any]] = []
        self.mutate_server_hello: Optional[Callable[[Dict[str, Any]], None]] = None
        self.on_authenticated: Optional[Callable[[ScriptedServerProtocol], None]] = None
        self.on_message: Optional[Callable[[ScriptedServerProtocol, Any], None]] = None
        self.factory = _ScriptedFactory(self, clock)
        self.endpoint = LoopbackEndpoint(self.factory, clock)

    def connector(self, reactor: Any, url: str, headers: Optional[Mapping[str, str]]) -> "Deferred[RawConnection]":
        """A ``Client(connector=...)`` that opens a RawConnection to this server."""
        return RawConnection.open(reactor, url, headers, endpoint=self.endpoint)

    def flush(self) -> None:
        """Deliver everything in flight, both ways."""
        self.endpoint.flush()

    @property
    def current(self) -> ScriptedServerProtocol:
        """The most recently opened server socket."""
        return self.protocols[-1]

    def handle(self, proto: ScriptedServerProtocol, message: Any) -> None:
        """The v1 handshake, then ``on_message``."""
        msg_type = message.get("type") if isinstance(message, dict) else None
        payload = message.get("payload") if isinstance(message, dict) else None
        if not isinstance(payload, dict):
            payload = message if isinstance(message, dict) else {}
        if not proto.authenticated and msg_type == "client_hello":
            proto.nonce_c = payload["nonce_c"]
            hello: Dict[str, Any] = {
                "type": "server_hello",
                "server_ephemeral_pub": self.ephemeral_pub,
                "nonce_s": NONCE_S,
                "server_identity_pub": crypto.public_hex(self.signing_key),
                "protocol_version": 1,
            }
            digest = crypto.v1_server_digest(
                hello["server_identity_pub"], self.ephemeral_pub, proto.nonce_c, NONCE_S
            )
            hello["server_signature"] = self.signing_key.sign(digest).signature.hex()
            if self.mutate_server_hello is not None:
                self.mutate_server_hello(hello)
            proto.send({"type": "server_hello", "payload": hello})
        elif not proto.authenticated and msg_type == "client_auth":
            self.client_auths.append(payload)
            digest = crypto.v1_client_digest(
                payload["user_id"], payload["device_id"], proto.nonce_c, NONCE_S, self.ephemeral_pub
            )
            if not crypto.verify_ed25519(
                bytes.fromhex(payload["user_id"]), digest, bytes.fromhex(payload["client_signature"])
            ):
                proto.close_with(1008, "Invalid client signature")
                return
            proto.authenticated = True
            proto.send({
                "type": "session_established",
                "payload": {
                    "type": "session_established",
                    "device_id": payload["device_id"].lower(),
                    "last_ack_device_seq": self.last_ack_device_seq,
                    "expires_at": 0,
                    "session_id": "s",
                    "protocol_version": 1,
                    "server_time": 0,
                },
            })
            if self.on_authenticated is not None:
                self.on_authenticated(proto)
        elif proto.authenticated and self.on_message is not None:
            self.on_message(proto, message)
