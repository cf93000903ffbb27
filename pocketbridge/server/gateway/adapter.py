"""
The WebSocket gateway: a thin Autobahn adapter (STYLE.md §4). Autobahn
callbacks become inputs of the connection's lifecycle machine
(``pocketbridge.server.gateway.connection``, docs/architecture.md "The connection
lifecycle"); the handshake steps go to ``ServerHandshake``, what a valid
``client_auth`` leads to goes to ``session_admission``, and frames of an
attached session go to the ``Session``. The adapter owns the frame codec
(v2 AEAD), the message-size limits and the heartbeat.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pocketbridge.protocol import crypto, wire

from pocketbridge.server import metrics
from pocketbridge.server.gateway.connection import HANDSHAKE, HEARTBEAT_CLOSE_GRACE, LIVE, PRE_LIVE, ConnectionMachine, Heartbeat, Input, State
from pocketbridge.server.gateway.handshake import ServerHandshake
from pocketbridge.server.gateway.flow import FlowControl, Outbound
from pocketbridge.server.gateway.inbound import WS_PING, WS_PONG
from pocketbridge.server.gateway.session import Session
from pocketbridge.server.gateway.admission import FailureToken, admit, check_upgrade, client_ip, depart, peer_host
from pocketbridge.server.gateway.options import with_factory_options
from pocketbridge.server.gateway.ports import _Conn, _Gate
from pocketbridge.server.storage import StorageUnavailable
from pocketbridge.protocol.wire import Malformed, ProtocolError

if TYPE_CHECKING:
    from pocketbridge.server.context import Node

log = Logger()

__all__ = ["GatewayProtocol", "_Conn", "client_ip", "make_factory"]  # _Conn: tests build Sessions with it


# Autobahn's own two bases annotate ``peer`` and ``_transport_details``
# differently; that disagreement is inside Autobahn, not here.
class GatewayProtocol(FlowControl, WebSocketServerProtocol):  # type: ignore[misc]
    """One WebSocket connection: Autobahn callbacks in, machine inputs out."""

    node: Any = None  # set in onConnect, from the factory

    def __init__(self) -> None:
        super().__init__()
        self.machine = ConnectionMachine(None, self._entered)  # the clock is the node's (onConnect)
        self.session: Optional[Session] = None
        self.handshake: Optional[ServerHandshake] = None
        self.token: Optional[FailureToken] = None
        self.ip = ""
        self.unexpected = 0  # frames before authentication that were no handshake step (§4.3)
        self.queued: Optional[List[Tuple[str, Dict[str, Any]]]] = None  # frames read while admitting
        self.heartbeat: Optional[Heartbeat] = None  # from onConnect
        self.failure_wait = 0.0
        self.outbound: Optional[Outbound] = None
        self.read_held = False  # the transport is paused (mirrors what was last applied)
        self.in_rx = False  # inside Autobahn's frame loop
        self.cipher_in: Optional[crypto.FrameCipher] = None
        self.cipher_out: Optional[crypto.FrameCipher] = None
        self.session_id = uuid.uuid4().hex

    # -------------------------------------------------------------- the machine

    def _entered(self, old: State, new: State, event: Input) -> None:
        """The work of each transition (the timers of ``old`` are cancelled already)."""
        if new is State.AWAIT_HELLO:
            self._opened()
        elif new is State.ADMITTING:
            self._apply_hold()  # nothing more is read until the session decides
        elif new is State.JOINING:
            # Frames that arrived during admission go first, in arrival order;
            # the session holds them until the head is known.
            session = self.session
            assert session is not None
            queued, self.queued = self.queued, None
            for msg_type, fields in queued or ():
                session.on_frame(msg_type, fields)
            self._apply_hold()  # read again: the session pauses reading itself until the head is known
        elif new is State.LIVE:
            self._live()
        elif new is State.CLOSING:
            if event is Input.HEARTBEAT_LOST:
                self.machine.call_later(HEARTBEAT_CLOSE_GRACE, self._drop)
            elif old in PRE_LIVE:
                # Before authentication the peer has shown nothing worth waiting
                # for: an honest client answers the close at once, a flooder would
                # keep Autobahn parsing its frames until the close-handshake timeout.
                self.machine.call_later(self.node.settings.preauth_close_grace, self._drop)
        elif new is State.ABORTED:
            cast(Any, self.transport).abortConnection()
        elif new is State.GONE:
            self._gone()

    # -------------------------------------------------------------- connection

    def onConnect(self, request: Any) -> "Deferred[None]":  # type: ignore[override]  # Autobahn waits on a Deferred
        node = self.factory.node
        self.node = node
        self.machine.clock = node.clock
        self.heartbeat = Heartbeat(self.machine, node.settings.heartbeat_interval, node.settings.heartbeat_timeout,
                                   self.sendPing, self._heartbeat_lost)
        forwarded = request.headers.get("x-forwarded-for")
        transport: Any = self.transport  # the TCP transport: getPeer() has .host
        self.ip = client_ip(peer_host(transport.getPeer()), forwarded, node.trusted_proxies)
        if node.draining:
            raise ConnectionDeny(503, "Server draining")
        self.token = FailureToken(node.limits, self.ip, node.settings.handshake_failures_per_ip)
        return Deferred.fromCoroutine(self._check_upgrade())

    async def _check_upgrade(self) -> None:
        assert self.token is not None
        self.failure_wait = await check_upgrade(self.node, self.ip, self.token)

    def onOpen(self) -> None:
        self.machine.feed(Input.OPENED)
        wait = self.failure_wait
        if wait > 0:  # no handshake-failure token for this IP (§12)
            metrics.LIMIT_HITS.labels(limit="handshake_failures_per_ip").inc()
            self.close(4029, "Too many failed handshakes; retry after {} s".format(max(1, int(wait + 0.999))))
            return
        s = self.node.settings
        self.handshake = ServerHandshake(self.node.server_key, require_v2=s.require_v2)
        self.machine.call_later(s.handshake_timeout, self._handshake_timeout, states=HANDSHAKE)

    def _opened(self) -> None:
        node = self.node
        try:
            cast(Any, self.transport).setTcpNoDelay(True)
        except Exception:
            pass
        metrics.CONNECTIONS.labels(state="open").inc()
        node.connections.add(self)
        s = node.settings
        self.outbound = Outbound(
            self.transport, node.clock, s.preauth_outbound_bytes, s.outbound_pause_bytes, s.outbound_resume_bytes,
            s.slow_consumer_timeout, self)
        try:
            cast(Any, self.transport).registerProducer(self.outbound, True)
        except Exception as e:  # a transport without producer support: resume from the timer only
            log.warn("outbound flow control unavailable: {error}", error=str(e))
        self.maxMessagePayloadSize = s.max_preauth_message_bytes
        self.maxFramePayloadSize = s.max_preauth_message_bytes
        self._forget_upgrade()

    def _forget_upgrade(self) -> None:
        """
        Drop Autobahn's record of the HTTP upgrade (the request and response
        text, the headers, the request line): ``onConnect`` has read what it
        needed, and Autobahn's server side reads none of these public
        attributes once the connection is open, yet each socket would keep
        them (~1.5 KB) for its whole life. Each gets an empty value of its type.
        """
        self.http_headers = {}
        self.http_request_data = b""
        self.http_response_data = ""
        self.http_status_line = ""
        self.http_request_uri = ""

    def _open(self) -> bool:
        """Frames are handled and written: the machine and Autobahn both say the connection is open."""
        return self.machine.is_open and self.state == self.STATE_OPEN

    def _handshake_timeout(self) -> None:
        self._handshake_failed(1008, "Handshake timeout", "timeout")

    def _handshake_failed(self, code: int, reason: str, result: str) -> None:
        if not self._open():
            return  # closing already: one failure per connection
        metrics.HANDSHAKES.labels(result=result).inc()
        if self.token is not None:
            self.token.spend()
        self.close(code, reason)

    def close(self, code: int, reason: str) -> None:
        """Send a close frame with any code (Autobahn's sendClose allows only 1000/3000–4999)."""
        self._close(code, reason, Input.CLOSE)

    def _close(self, code: int, reason: str, event: Input) -> None:
        if self.state in (self.STATE_CLOSING, self.STATE_CLOSED) or not self.machine.accepts(event):
            return
        metrics.CLOSES.labels(code=str(code)).inc()
        self.machine.feed(event)  # CLOSING: the close frame is sent even past the outbound ceiling
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)
        # Read again (a paused socket would never see the peer's close reply);
        # the session ignores any frame that still arrives.
        self._apply_hold()

    def _drop(self) -> None:
        if self.transport is not None:
            self.machine.feed(Input.DROP)

    # -------------------------------------------------------------- frames

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        # Never async: Autobahn would discard the coroutine.
        if not self._open():
            return  # after our close frame nothing more is handled
        if self.cipher_in is not None:
            decrypted = self._decrypt(payload, isBinary)
            if decrypted is None:
                return
            payload = decrypted
        try:
            msg_type, fields = wire.parse_message(payload)
        except Malformed:
            self._fail(1008, "Invalid message format", "malformed")
            return
        if self.session is not None and self.machine.has_session:
            self.session.on_frame(msg_type, fields)
        elif self.machine.state is State.ADMITTING:
            if self.queued is None:
                self.queued = []
            self.queued.append((msg_type, fields))
        else:
            self._preauth(msg_type, fields)

    def _decrypt(self, payload: bytes, is_binary: bool) -> Optional[bytes]:
        """v2: every frame after server_hello is AES-GCM in a binary frame (§5)."""
        assert self.cipher_in is not None
        if self.cipher_in.counter >= crypto.MAX_FRAME_COUNTER - 1:
            self._close_any(1001, "Session key rotation required")
            return None
        if not is_binary:
            self._fail(1008, "Decrypt failed", "decrypt_failed")
            return None
        try:
            return self.cipher_in.open(payload)
        except crypto.CryptoError:
            self._fail(1008, "Decrypt failed", "decrypt_failed")
            return None

    def _fail(self, code: int, reason: str, result: str) -> None:
        """A client error: a handshake failure before the session, a session close after."""
        if self.session is not None and self.machine.has_session:
            self.session.close(code, reason)
        else:
            self._handshake_failed(code, reason, result)

    def _close_any(self, code: int, reason: str) -> None:
        if self.session is not None and self.machine.has_session:
            self.session.close(code, reason)
        else:
            self.close(code, reason)

    def send_frame(self, data: bytes) -> None:
        """Send one message: plain text in v1, an encrypted binary frame in v2; nothing once closing."""
        if not self._open():
            return
        if self.cipher_out is None:
            self.sendMessage(data, False)
            return
        if self.cipher_out.counter >= crypto.MAX_FRAME_COUNTER - 1:
            self._close_any(1001, "Session key rotation required")
            return
        self.sendMessage(self.cipher_out.seal(data), True)

    def _preauth(self, msg_type: str, fields: Dict[str, Any]) -> None:
        hs = self.handshake
        if hs is None:
            return
        state = self.machine.state
        if self.cipher_in is not None and msg_type != "client_auth":
            # v2: client_auth must be the first encrypted frame.
            self._handshake_failed(1008, "Expected client_auth", "bad_format")
            return
        try:
            if msg_type == "client_hello" and state is State.AWAIT_HELLO:
                hello = hs.client_hello(fields)
                self.sendMessage(wire.encode("server_hello", hello))
                if hs.keys is not None:
                    k_c2s, k_s2c = hs.keys
                    self.cipher_in = crypto.FrameCipher(k_c2s)
                    self.cipher_out = crypto.FrameCipher(k_s2c)
                self.machine.feed(Input.HELLO)
                return
            if msg_type == "client_auth" and state is State.AWAIT_AUTH:
                auth = hs.client_auth(fields)
                # The handshake is done with (its ephemeral key included): nothing
                # after AUTH reads it, and a socket would keep it for its whole life.
                self.handshake = None
                self.machine.feed(Input.AUTH)
                d = Deferred.fromCoroutine(admit(self.node, _Gate(self), _Conn(self), auth, self.session_id))
                d.addErrback(self._auth_error)
                return
        except ProtocolError as e:
            result = "bad_signature" if e.reason == "Invalid client signature" else "bad_format"
            self._handshake_failed(e.code, e.reason, result)
            return
        self._count_unexpected()

    def _count_unexpected(self) -> None:
        self.unexpected += 1
        if self.unexpected > self.node.settings.max_preauth_messages:
            self._handshake_failed(1008, "Too many messages before authentication", "too_many_messages")

    def onPing(self, payload: bytes) -> None:
        """A WebSocket ping is a client frame (§12): rate-limited like any other, answered in order."""
        if not self._open():
            return
        if self.session is not None and self.machine.has_session:
            self.session.on_frame(WS_PING, {"payload": payload})
            return
        self._count_unexpected()  # before authentication: an unexpected message (§4.3)
        self.send_pong(payload)

    def send_pong(self, payload: bytes) -> None:
        if self._open():
            self.sendPong(payload)

    def onPong(self, payload: bytes) -> None:
        if not self._open():
            return
        if self.session is not None and self.machine.has_session:
            self.session.on_frame(WS_PONG, {})
        else:
            self._count_unexpected()  # no ping is sent before authentication

    def pong_received(self) -> None:
        """A pong was read (heartbeat, §1)."""
        if self.heartbeat is not None:
            self.heartbeat.pong()

    # -------------------------------------------------------------- admission's results

    def _attached(self, session: Session) -> None:
        self.session = session
        self.machine.feed(Input.ATTACHED)

    def _established(self, session: Session, frame: bytes, age: float, expires_at: int) -> None:
        self.send_frame(frame)
        if self.machine.state is not State.JOINING:
            return  # dropped while sending (the pre-auth ceiling)
        self.machine.feed(Input.ESTABLISHED)
        self.machine.call_later(age, session.expire, states=LIVE)
        if session.warns_before_expiry:
            self.machine.call_later(max(0.0, age - 300), self._expiring_soon, expires_at, states=LIVE)
        assert self.heartbeat is not None
        self.heartbeat.start()

    def _live(self) -> None:
        """Authenticated: the contract's message sizes and outbound bounds replace the pre-auth ones."""
        metrics.HANDSHAKES.labels(result="ok").inc()
        metrics.CONNECTIONS.labels(state="authenticated").inc()
        if self.token is not None:
            self.token.give_back()
            self.token = None  # no handshake failure can follow: nothing left to spend or give back
        s = self.node.settings
        self.maxMessagePayloadSize = s.max_message_bytes
        self.maxFramePayloadSize = s.max_message_bytes
        out = self.outbound
        if out is not None:
            out.limit = max(s.outbound_max_bytes, s.outbound_pause_bytes)
            out.flow = True
            if out.tcp is not None:
                # Twisted tells the producer the buffer is empty only if it paused it first.
                out.tcp.bufferSize = min(out.tcp.bufferSize, s.outbound_pause_bytes)

    def _expiring_soon(self, expires_at: int) -> None:
        left = max(0, (expires_at - self.node.now_ms()) // 1000)
        self.send_frame(wire.encode("session_expiring_soon", {"expires_in_seconds": left, "expires_at": expires_at}))

    def _auth_error(self, failure: Failure) -> None:
        if failure.check(StorageUnavailable):
            metrics.HANDSHAKES.labels(result="storage_error").inc()
            self.close(1013, "Storage unavailable")
            return
        log.failure("handshake bug", failure)
        self.close(1011, "Internal error")

    # -------------------------------------------------------------- heartbeat (LIVE only)

    def _heartbeat_lost(self) -> None:
        if self.session is not None:
            self.session.stopped = True
        self._close(1008, "Heartbeat timeout", Input.HEARTBEAT_LOST)

    def reading_paused(self, paused: bool) -> None:
        """Paused reading does not count against the heartbeat."""
        if self.heartbeat is not None:
            self.heartbeat.reading_paused(paused)

    # -------------------------------------------------------------- end

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self.machine.feed(Input.LOST)

    def _gone(self) -> None:
        """GONE: every timer is cancelled; give back what the connection held."""
        node = self.node
        if node is None:
            return  # lost before the upgrade request was read
        if self.outbound is not None:
            self.outbound.stop()
        if self.token is not None:
            self.token.give_back()
        reached = self.machine.reached
        if reached is State.UPGRADING:
            return  # never opened (upgrade denied): not counted, not listed
        node.connections.discard(self)
        metrics.CONNECTIONS.labels(state="open").dec()
        if reached is State.LIVE:
            metrics.CONNECTIONS.labels(state="authenticated").dec()
        if self.session is not None:
            depart(node, self.session, self.session_id)


def make_factory(node: "Node") -> WebSocketServerFactory:
    """The Autobahn factory for ``/ws``: no compression, close frames on protocol errors."""
    factory = WebSocketServerFactory()
    factory.protocol = GatewayProtocol
    factory.node = node  # type: ignore[attr-defined]  # read by GatewayProtocol.onConnect
    factory.setProtocolOptions(
        failByDrop=False,
        autoPingInterval=0,
        openHandshakeTimeout=node.settings.handshake_timeout,
        closeHandshakeTimeout=5,
        maxFramePayloadSize=node.settings.max_preauth_message_bytes,
        maxMessagePayloadSize=node.settings.max_preauth_message_bytes,
        autoFragmentSize=0,
        perMessageCompressionAccept=lambda offers: None,
        webStatus=False,
    )
    factory.protocol = with_factory_options(GatewayProtocol, factory)  # options copied once, not per connection
    return factory
