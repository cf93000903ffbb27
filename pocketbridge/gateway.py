"""
The WebSocket gateway: a thin Autobahn adapter around ``ServerHandshake`` and
``Session`` (STYLE.md §4). It owns timers (handshake deadline, heartbeat,
session expiry), message-size limits and the connection-level limits.
"""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any, Dict, List, Optional, Tuple, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import crypto, metrics, wire
from .handshake import AuthRequest, ServerHandshake
from .outbound import FlowControl, Outbound
from .session import WS_PING, WS_PONG, Session
from .session_v2 import V2Session
from .storage import StorageUnavailable
from .wire import Malformed, ProtocolError

log = Logger()


def client_ip(peer_host: str, forwarded_for: Optional[str], trusted: Tuple[str, ...]) -> str:
    """
    The client's address (PROTOCOL.md §12): the peer unless it is a trusted
    proxy; IPv6 by /64, except an IPv4-mapped address (a dual-stack
    listener), which is its IPv4 address (all of them share one /64).
    """
    ip = peer_host
    if forwarded_for and peer_host in trusted:
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        for hop in reversed(hops):
            if hop not in trusted:
                ip = hop
                break
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(str(addr) + "/64", strict=False))
    return ip


class GatewayProtocol(FlowControl, WebSocketServerProtocol):
    """One WebSocket connection."""

    node: Any = None  # set by the factory

    def __init__(self) -> None:
        super().__init__()
        self.session: Optional[Session] = None
        self.handshake: Optional[ServerHandshake] = None
        self.ip = ""
        self.unexpected = 0
        self.authenticating = False
        self.queued: List[Tuple[str, Dict[str, Any]]] = []
        self.timers: List[Any] = []
        self.gone = False
        self.last_pong = 0.0
        self.paused_since: Optional[float] = None
        self.paused_total = 0.0
        self.failure_wait = 0.0
        self.hs_reserved = False  # holds a handshake-failure token until it succeeds or ends (§12)
        self.outbound: Optional[Outbound] = None
        self.dropped = False
        self.closing_frame = False
        # Reading stops while authenticating or while the session says so; frames
        # Autobahn already buffered wait in ``self.data`` too.
        self.hold_auth = False
        self.hold_session = False
        self.read_held = False
        self.in_rx = False
        self.established = False
        self.cipher_in: Optional[crypto.FrameCipher] = None
        self.cipher_out: Optional[crypto.FrameCipher] = None
        self.session_id = uuid.uuid4().hex

    # -------------------------------------------------------------- connection

    def onConnect(self, request: Any) -> "Deferred[None]":  # type: ignore[override]  # Autobahn waits on a Deferred
        node = self.factory.node
        self.node = node
        forwarded = request.headers.get("x-forwarded-for")
        transport: Any = self.transport  # the TCP transport: getPeer() has .host
        self.ip = client_ip(transport.getPeer().host, forwarded, node.trusted_proxies)
        if node.draining:
            raise ConnectionDeny(503, "Server draining")
        return Deferred.fromCoroutine(self._admit())

    async def _admit(self) -> None:
        """The per-IP limits, shared by all nodes; runs before the upgrade is answered."""
        s = self.node.settings
        limits = self.node.limits
        if await limits.take("conn_ip", self.ip, s.conn_per_ip_rate, s.conn_per_ip_burst) > 0:
            metrics.LIMIT_HITS.labels(limit="connections_per_ip").inc()
            raise ConnectionDeny(429, "Too many connections")
        # Reserve one failure now (refunded unless the client fails the
        # handshake), so concurrent handshakes never overshoot the budget;
        # without a token the connection is closed 4029 right after the upgrade.
        wait = await limits.take("hs_fail", self.ip, *self._failure_budget())
        if wait > 0:
            self.failure_wait = wait
        else:
            self.hs_reserved = True
        return None

    def _refund_failure_token(self) -> None:
        if self.hs_reserved:
            self.hs_reserved = False
            self.node.limits.refund("hs_fail", self.ip, *self._failure_budget()).addErrback(
                lambda f: log.warn("could not refund a handshake token: {e}", e=f.getErrorMessage()))

    def _failure_budget(self) -> Tuple[float, float]:
        n = self.node.settings.handshake_failures_per_ip
        return n / 60.0, float(n)

    def onOpen(self) -> None:
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
            s.slow_consumer_timeout, self._outbound_paused, self._outbound_resumed, self._outbound_stalled)
        try:
            cast(Any, self.transport).registerProducer(self.outbound, True)
        except Exception as e:  # a transport without producer support: resume from the timer only
            log.warn("outbound flow control unavailable: {error}", error=str(e))
        self.maxMessagePayloadSize = s.max_preauth_message_bytes
        self.maxFramePayloadSize = s.max_preauth_message_bytes
        wait = self.failure_wait
        if wait > 0:
            metrics.LIMIT_HITS.labels(limit="handshake_failures_per_ip").inc()
            self.close(4029, "Too many failed handshakes; retry after {} s".format(max(1, int(wait + 0.999))))
            return
        self.handshake = ServerHandshake(node.server_key, require_v2=s.require_v2)
        self.timers.append(node.clock.callLater(s.handshake_timeout, self._handshake_timeout))

    def _handshake_timeout(self) -> None:
        if self.session is None and not self.gone:
            self._handshake_failed(1008, "Handshake timeout", "timeout")

    def _handshake_failed(self, code: int, reason: str, result: str) -> None:
        if self.gone or self.state != self.STATE_OPEN:
            return  # closing already: one failure per connection
        metrics.HANDSHAKES.labels(result=result).inc()
        if self.hs_reserved:
            self.hs_reserved = False  # the reserved token is spent
        else:
            self.node.limits.charge("hs_fail", self.ip, *self._failure_budget()).addErrback(
                lambda f: log.warn("could not count a handshake failure: {e}", e=f.getErrorMessage()))
        self.close(code, reason)

    def close(self, code: int, reason: str) -> None:
        """Send a close frame with any code (Autobahn's sendClose allows only 1000/3000–4999)."""
        if self.gone or self.state in (self.STATE_CLOSING, self.STATE_CLOSED):
            return
        metrics.CLOSES.labels(code=str(code)).inc()
        self.closing_frame = True  # a close frame is sent even past the outbound ceiling
        try:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)
        finally:
            self.closing_frame = False
        # Read again (a paused socket would never see the peer's close reply);
        # the session ignores any frame that still arrives.
        self.hold_auth = self.hold_session = False
        self._apply_hold()
        if code == 1008 and reason == "Heartbeat timeout":
            self.timers.append(self.node.clock.callLater(5, self._drop))
        elif not self.established:
            # Before authentication the peer has shown nothing worth waiting
            # for: an honest client answers the close at once, a flooder would
            # keep Autobahn parsing its frames until the close-handshake timeout.
            self.timers.append(self.node.clock.callLater(self.node.settings.preauth_close_grace, self._drop))

    def _drop(self) -> None:
        if not self.gone and not self.dropped and self.transport is not None:
            self.dropped = True
            cast(Any, self.transport).abortConnection()

    # -------------------------------------------------------------- frames

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        # Never async: Autobahn would discard the coroutine.
        if self.gone or self.state != self.STATE_OPEN:
            return  # after our close frame nothing more is handled
        if self.cipher_in is not None:
            decrypted = self._decrypt(payload, isBinary)
            if decrypted is None:
                return
            payload = decrypted
        try:
            msg_type, fields = wire.parse_message(payload)
        except Malformed:
            if self.session is None:
                self._handshake_failed(1008, "Invalid message format", "malformed")
            else:
                self.session.close(1008, "Invalid message format")
            return
        if self.session is not None:
            self.session.on_frame(msg_type, fields)
        elif self.authenticating:
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
            self._fail_v2(1008, "Decrypt failed")
            return None
        try:
            return self.cipher_in.open(payload)
        except crypto.CryptoError:
            self._fail_v2(1008, "Decrypt failed")
            return None

    def _fail_v2(self, code: int, reason: str) -> None:
        if self.session is None:
            self._handshake_failed(code, reason, "decrypt_failed")
        else:
            self.session.close(code, reason)

    def _close_any(self, code: int, reason: str) -> None:
        if self.session is not None:
            self.session.close(code, reason)
        else:
            self.close(code, reason)

    def send_frame(self, data: bytes) -> None:
        """Send one message: plain text in v1, an encrypted binary frame in v2; nothing once closing."""
        if self.gone or self.dropped or self.state != self.STATE_OPEN:
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
        if self.cipher_in is not None and msg_type != "client_auth":
            # v2: client_auth must be the first encrypted frame.
            self._handshake_failed(1008, "Expected client_auth", "bad_format")
            return
        try:
            if msg_type == "client_hello" and not hs.hello_done:
                hello = hs.client_hello(fields)
                self.sendMessage(wire.encode("server_hello", hello))
                if hs.keys is not None:
                    k_c2s, k_s2c = hs.keys
                    self.cipher_in = crypto.FrameCipher(k_c2s)
                    self.cipher_out = crypto.FrameCipher(k_s2c)
                return
            if msg_type == "client_auth" and hs.hello_done:
                auth = hs.client_auth(fields)
                self.authenticating = True
                self.hold_auth = True  # nothing more is read until the session decides
                self._apply_hold()
                d = Deferred.fromCoroutine(self._authenticate(auth))
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
        if self.gone or self.state != self.STATE_OPEN:
            return
        if self.session is not None:
            self.session.on_frame(WS_PING, {"payload": payload})
            return
        self._count_unexpected()  # before authentication: an unexpected message (§4.3)
        self.send_pong(payload)

    def send_pong(self, payload: bytes) -> None:
        if not self.gone and not self.dropped and self.state == self.STATE_OPEN:
            self.sendPong(payload)

    def onPong(self, payload: bytes) -> None:
        if self.gone or self.state != self.STATE_OPEN:
            return
        if self.session is not None:
            self.session.on_frame(WS_PONG, {})
        else:
            self._count_unexpected()  # no ping is sent before authentication

    def pong_received(self) -> None:
        """A pong was read (heartbeat, §1)."""
        self.last_pong = self.node.clock.seconds()
        self.paused_total = 0.0
        if self.paused_since is not None:
            self.paused_since = self.last_pong

    def _ended(self) -> bool:
        """True once the connection is closing or gone (a handshake step that awaited must stop)."""
        return self.gone or self.state != self.STATE_OPEN

    async def _authenticate(self, auth: AuthRequest) -> None:
        node = self.node
        s = node.settings
        storage = node.storage
        device = await storage.get_device(auth.user_id, auth.device_id)
        if self._ended():
            return
        if device is not None and device.revoked_at is not None:
            self._handshake_failed(4003, "Device revoked", "revoked")
            return
        presence = node.presence
        try:
            device_sockets, user_sockets = await presence.counts(auth.user_id, auth.device_id)
        except Exception as e:  # presence store down: admit (limits are best effort)
            log.warn("presence unavailable, socket limits not checked: {error}", error=str(e))
            device_sockets = user_sockets = 0
        if self._ended():
            return
        if device_sockets >= s.sockets_per_device:
            metrics.LIMIT_HITS.labels(limit="sockets_per_device").inc()
            metrics.HANDSHAKES.labels(result="limited").inc()
            self.close(4029, "Too many sockets for this device; retry after 30 s")
            return
        if user_sockets >= s.sockets_per_user:
            metrics.LIMIT_HITS.labels(limit="sockets_per_user").inc()
            metrics.HANDSHAKES.labels(result="limited").inc()
            self.close(4029, "Too many sockets for this user; retry after 30 s")
            return
        now = node.now_ms()
        session_class = V2Session if auth.protocol_version == 2 else Session
        session = session_class(
            node, _Conn(self), auth.user_id, auth.device_id, self.session_id, auth.protocol_version,
            auth.device_name, auth.device_type,
        )
        # Subscribe first, then read the head (§7.3): whatever commits after the
        # head read reaches this session live. ``subscribed`` fires once the bus
        # listens for the user (Redis confirmed the SUBSCRIBE).
        subscribed = node.hub.attach(session)
        self.session = session
        # Frames that arrived during the handshake go first, in arrival order;
        # the session holds them until the head is known.
        queued, self.queued = self.queued, []
        self.authenticating = False
        for msg_type, fields in queued:
            session.on_frame(msg_type, fields)
        # Read again: the session pauses reading itself until the head is known.
        self.hold_auth = False
        self._apply_hold()
        await subscribed
        if self._ended():
            return
        device, created, head, purged_below = await storage.register_and_read_head(
            auth.user_id, auth.device_id, auth.device_name, auth.device_type, now)
        if self._ended():
            return
        if device.revoked_at is not None:  # revoked between the two reads
            self._handshake_failed(4003, "Device revoked", "revoked")
            return
        # Name and type are those stored at registration (§4.4), not this handshake's.
        session.device_name, session.device_type = device.name, device.type
        try:
            online = await presence.add(auth.user_id, auth.device_id, self.session_id, now)
        except Exception as e:
            log.warn("presence unavailable: {error}", error=str(e))
            online = False
        if self._ended():
            return
        node.hub.known_head(auth.user_id, head)
        age = s.session_max_age * (1.0 - node.rng.uniform(0.0, 0.05))
        expires_at = now + int(age * 1000)
        self.send_frame(wire.encode("session_established", {
            "type": "session_established",
            "device_id": auth.device_id,
            "last_ack_device_seq": device.last_device_seq,
            "expires_at": expires_at,
            "session_id": self.session_id,
            "protocol_version": auth.protocol_version,
            "server_time": node.now_ms(),
        }))
        metrics.HANDSHAKES.labels(result="ok").inc()
        metrics.CONNECTIONS.labels(state="authenticated").inc()
        self.established = True
        self._refund_failure_token()
        log.debug("session {session_id} established (v{version}, new device: {created})",
                 session_id=self.session_id, version=auth.protocol_version, created=created)
        self.maxMessagePayloadSize = s.max_message_bytes
        self.maxFramePayloadSize = s.max_message_bytes
        self._cancel_timers()
        clock = node.clock
        self.last_pong = clock.seconds()
        self.timers.append(clock.callLater(age, session.expire))
        if auth.protocol_version == 2:
            self.timers.append(clock.callLater(max(0.0, age - 300), self._expiring_soon, expires_at))
        self._schedule_ping()
        self._register_outbound()
        if online:
            node.announce_presence(auth.user_id, auth.device_id, device.name, device.type, True, now)
        if created:
            node.notify(auth.user_id, "device_paired", {
                "type": "device_paired", "device_id": auth.device_id, "device_name": device.name,
                "device_type": device.type, "timestamp": now,
            }, exclude_device=auth.device_id)
        if isinstance(session, V2Session):
            session.established(head, device.delivered_seq, device.last_device_seq, auth.resume_from, purged_below)
        else:
            session.established(head, device.delivered_seq, device.last_device_seq)

    def _expiring_soon(self, expires_at: int) -> None:
        if self.session is not None and not self.gone:
            left = max(0, (expires_at - self.node.now_ms()) // 1000)
            self.send_frame(wire.encode("session_expiring_soon", {"expires_in_seconds": left, "expires_at": expires_at}))

    def _auth_error(self, failure: Failure) -> None:
        if failure.check(StorageUnavailable):
            metrics.HANDSHAKES.labels(result="storage_error").inc()
            self.close(1013, "Storage unavailable")
            return
        log.failure("handshake bug", failure)
        self.close(1011, "Internal error")

    def _register_outbound(self) -> None:
        """Authenticated: the contract's outbound bounds replace the pre-auth ceiling."""
        out = self.outbound
        if out is not None:
            s = self.node.settings
            out.limit = max(s.outbound_max_bytes, s.outbound_pause_bytes)
            out.flow = True
            if out.tcp is not None:
                # Twisted tells the producer the buffer is empty only if it paused it first.
                out.tcp.bufferSize = min(out.tcp.bufferSize, s.outbound_pause_bytes)

    # -------------------------------------------------------------- heartbeat

    def _schedule_ping(self) -> None:
        self.timers.append(self.node.clock.callLater(self.node.settings.heartbeat_interval, self._ping))

    def _ping(self) -> None:
        if self.gone:
            return
        now = self.node.clock.seconds()
        paused = self.paused_total + (now - self.paused_since if self.paused_since is not None else 0.0)
        if now - self.last_pong - paused > self.node.settings.heartbeat_timeout:
            if self.session is not None:
                self.session.stopped = True
            self.close(1008, "Heartbeat timeout")
            return
        self.sendPing()
        self._schedule_ping()

    def reading_paused(self, paused: bool) -> None:
        """Bookkeeping so paused time does not count against the heartbeat."""
        now = self.node.clock.seconds()
        if paused and self.paused_since is None:
            self.paused_since = now
        elif not paused and self.paused_since is not None:
            self.paused_total += now - self.paused_since
            self.paused_since = None

    # -------------------------------------------------------------- end

    def _cancel_timers(self) -> None:
        for t in self.timers:
            if t.active():
                t.cancel()
        self.timers = []

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        if self.gone:
            return
        self.gone = True
        node = self.node
        if node is None:
            return
        self._cancel_timers()
        if self.outbound is not None:
            self.outbound.stop()
        self._refund_failure_token()
        node.connections.discard(self)
        metrics.CONNECTIONS.labels(state="open").dec()
        session = self.session
        if session is not None:
            if self.established:
                metrics.CONNECTIONS.labels(state="authenticated").dec()
            session.lost()
            node.hub.detach(session)
            node.cursors.flush()
            d = node.presence.remove(session.user_id, session.device_id, self.session_id)
            d.addCallback(self._removed, session)
            d.addErrback(lambda f: log.warn("presence update failed: {e}", e=f.getErrorMessage()))

    def _removed(self, offline: bool, session: Session) -> None:
        if not offline:
            return
        node = self.node
        now = node.now_ms()
        # Persist last_seen first, then tell the other devices (a REST read after
        # the notice sees the new value).
        d = node.storage.touch_device(session.user_id, session.device_id, now)
        d.addErrback(lambda f: log.warn("last_seen write failed: {e}", e=f.getErrorMessage()))
        d.addCallback(lambda _: node.announce_presence(
            session.user_id, session.device_id, session.device_name, session.device_type, False, now))


class _Conn:
    """The ``Conn`` a Session uses, backed by the Autobahn protocol."""

    __slots__ = ("proto",)

    def __init__(self, proto: GatewayProtocol) -> None:
        self.proto = proto

    def send(self, data: bytes) -> None:
        self.proto.send_frame(data)

    def close(self, code: int, reason: str) -> None:
        self.proto.close(code, reason)

    def pause_reading(self) -> None:
        self.proto.hold_session = True
        self.proto._apply_hold()

    def resume_reading(self) -> None:
        self.proto.hold_session = False
        self.proto._apply_hold()

    def send_pong(self, payload: bytes) -> None:
        self.proto.send_pong(payload)

    def pong_received(self) -> None:
        self.proto.pong_received()


def make_factory(node: Any) -> WebSocketServerFactory:
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
    return factory
