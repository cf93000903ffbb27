"""
``RawConnection``: one client WebSocket to a PocketBridge server with a
queue of decoded messages, and nothing else (no handshake, no acks).

Integration tests use it to send malformed things; ``Client`` uses it as its
transport. The Autobahn protocol class is a thin adapter that forwards
open/message/close to the ``RawConnection``.

Frames are decoded by a codec: ``JsonCodec`` (v1: one JSON document per text
or binary frame) or ``V2Codec`` (v2: AES-256-GCM in binary frames, one
counter per direction, PROTOCOL.md §5), which a v2 handshake installs with
``set_codec`` right after ``server_hello``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, cast

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.util import parse_url
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger

from pocketbridge.client._util import WaitQueue
from pocketbridge.client.codec import (
    ABNORMAL_CLOSE,
    NO_STATUS,
    CloseInfo,
    ConnectionClosed,
    DecryptFailed,
    JsonCodec,
    KeyRotationRequired,
    MalformedMessage,
    V2Codec,
)

log = Logger()

# The codecs and exceptions live in ``codec``; callers keep importing them from here.
__all__ = [
    "ABNORMAL_CLOSE", "NO_STATUS", "CloseInfo", "ConnectionClosed", "DecryptFailed", "JsonCodec",
    "KeyRotationRequired", "MalformedMessage", "RawConnection", "V2Codec", "endpoint_for_url",
]


class _BridgeProtocol(WebSocketClientProtocol):
    """Forwards Autobahn callbacks to the RawConnection (``self.factory.connection``)."""

    def connectionMade(self) -> None:
        """Disable Nagle: acks and small events must not wait for 40 ms timers."""
        self.factory.connection.protocol = self
        super().connectionMade()
        try:
            self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        except (AttributeError, OSError):
            pass  # not a TCP transport (tests, Unix sockets)

    def onConnect(self, response: Any) -> None:
        """Remember the HTTP upgrade response (headers, status)."""
        self.factory.connection._upgrade_response = response

    def onOpen(self) -> None:
        """The upgrade succeeded."""
        self.factory.connection._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """A complete message arrived. Deliberately a plain ``def`` (Autobahn drops coroutines)."""
        self.factory.connection._received(payload, isBinary)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        """Report the peer's close code when it sent one, else Autobahn's."""
        if self.remoteCloseCode is not None:
            code, reason = self.remoteCloseCode, self.remoteCloseReason
        elif wasClean and code is None:
            code = NO_STATUS
        self.factory.connection._closed(code if code is not None else ABNORMAL_CLOSE, reason or "")


class _BridgeFactory(WebSocketClientFactory):
    """A factory for exactly one connection, pointing back at its RawConnection."""

    protocol = _BridgeProtocol

    def __init__(self, connection: "RawConnection", url: str, headers: Optional[Mapping[str, str]], reactor: Any,
                 open_timeout: float) -> None:
        super().__init__(url, headers=dict(headers or {}), reactor=reactor)
        self.connection = connection
        self.setProtocolOptions(
            autoFragmentSize=0,
            maxFramePayloadSize=0,
            maxMessagePayloadSize=0,
            perMessageCompressionOffers=[],
            openHandshakeTimeout=open_timeout,
            # Our close may sit unread while the server pauses reading (§12);
            # give it time to read the acks before it, rather than drop them.
            closeHandshakeTimeout=5,
            serverConnectionDropTimeout=1,
            tcpNoDelay=True,
            autoPingInterval=0,
        )


def endpoint_for_url(reactor: Any, url: str, timeout: float = 10.0) -> IStreamClientEndpoint:
    """A client endpoint for a ``ws://`` or ``wss://`` URL (TLS verified against the host name)."""
    is_secure, host, port, _resource, _path, _params = parse_url(url)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if is_secure:
        from twisted.internet.ssl import optionsForClientTLS
        from twisted.internet.endpoints import wrapClientTLS

        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    return endpoint


class RawConnection:
    """
    An open WebSocket with a queue of decoded messages.

    Create with ``await RawConnection.open(reactor, url)``. Messages are
    queued for ``next_message`` until ``set_receiver`` installs a callback.
    Reactor thread only.
    """

    def __init__(self, reactor: Any, url: str) -> None:
        self.reactor = reactor
        self.url = url
        self.codec: Any = JsonCodec()
        self.protocol: Optional[_BridgeProtocol] = None
        self._is_open = False
        self.close_info: Optional[CloseInfo] = None
        self._upgrade_response: Any = None
        self._queue: WaitQueue[Any] = WaitQueue(reactor)
        self._receiver: Optional[Callable[[Any], None]] = None
        self._on_malformed: Optional[Callable[[MalformedMessage], None]] = None
        self._open_d: "Deferred[None]" = Deferred(canceller=lambda d: self.abort())
        self._close_waiters: list["Deferred[CloseInfo]"] = []
        #: Set to True to keep every received frame as ``(is_binary, payload)`` in ``frames``.
        self.record_frames = False
        self.frames: List[Tuple[bool, bytes]] = []

    @classmethod
    def open(
        cls,
        reactor: Any,
        url: str,
        headers: Optional[Mapping[str, str]] = None,
        *,
        endpoint: Optional[IStreamClientEndpoint] = None,
        timeout: float = 10.0,
    ) -> "Deferred[RawConnection]":
        """
        Connect and complete the WebSocket upgrade within ``timeout`` seconds.

        Fails with the endpoint's error (e.g. ``ConnectionRefusedError``),
        ``ConnectionClosed`` if the socket closed before opening (a refused
        upgrade is 1006 with Autobahn's reason), or ``defer.TimeoutError``.
        """
        conn = cls(reactor, url)
        factory = _BridgeFactory(conn, url, headers, reactor, timeout)
        if endpoint is None:
            endpoint = endpoint_for_url(reactor, url, timeout)

        async def connect() -> RawConnection:
            """TCP (and TLS), then the WebSocket upgrade."""
            await endpoint.connect(factory)
            await conn._open_d
            return conn

        d = Deferred.fromCoroutine(connect())
        d.addTimeout(timeout, reactor)
        return d

    # ------------------------------------------------------------ callbacks

    def _opened(self, protocol: _BridgeProtocol) -> None:
        """Autobahn: the upgrade succeeded."""
        self.protocol = protocol
        self._is_open = True
        if not self._open_d.called:
            self._open_d.callback(None)

    def _received(self, payload: bytes, is_binary: bool) -> None:
        """Autobahn: a whole message arrived; decode and queue or deliver it."""
        if self.record_frames:
            self.frames.append((is_binary, payload))
        try:
            message = self.codec.decode(payload, is_binary)
        except MalformedMessage as e:
            log.warn("Server sent an undecodable frame ({size} bytes)", size=len(payload))
            if self._receiver is not None:
                if self._on_malformed is not None:
                    self._on_malformed(e)
            else:
                self._queue.put(e)
            return
        if self._receiver is not None:
            self._receiver(message)
        else:
            self._queue.put(message)

    def _closed(self, code: int, reason: str) -> None:
        """Autobahn: the socket closed; fail waiters and fire ``closed``."""
        if self.close_info is not None:
            return
        self.close_info = (code, reason)
        exc = ConnectionClosed(code, reason)
        if not self._open_d.called:
            self._open_d.errback(exc)
        self._queue.fail(exc)
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(self.close_info)

    # ------------------------------------------------------------ receiving

    def next_message(self, timeout: Optional[float] = 5.0) -> "Deferred[Any]":
        """
        The next decoded message (normally a dict). Fails with
        ``ConnectionClosed`` once the socket is closed and the queue is empty,
        ``MalformedMessage`` for an undecodable frame, ``defer.TimeoutError``
        after ``timeout`` seconds (None waits for ever).
        """
        d = self._queue.get(timeout)

        def unwrap(message: Any) -> Any:
            """Raise a queued MalformedMessage instead of returning it."""
            if isinstance(message, MalformedMessage):
                raise message
            return message

        return d.addCallback(unwrap)

    def set_receiver(
        self, receiver: Callable[[Any], None], on_malformed: Optional[Callable[[MalformedMessage], None]] = None
    ) -> None:
        """Deliver messages to ``receiver`` from now on, starting with the queued ones."""
        self._receiver = receiver
        self._on_malformed = on_malformed
        for item in self._queue.drain():
            if isinstance(item, MalformedMessage):
                if on_malformed is not None:
                    on_malformed(item)
            else:
                receiver(item)

    def set_codec(self, codec: Any) -> None:
        """Replace the frame codec (v2: after ``server_hello``)."""
        self.codec = codec

    @property
    def closed(self) -> "Deferred[CloseInfo]":
        """A new Deferred firing with ``(code, reason)`` when the socket has closed."""
        if self.close_info is not None:
            return succeed(self.close_info)
        d: "Deferred[CloseInfo]" = Deferred()
        self._close_waiters.append(d)
        return d

    @property
    def is_open(self) -> bool:
        """True between the upgrade and the close."""
        return self._is_open and self.close_info is None

    @property
    def transport(self) -> Any:
        """The underlying TCP/TLS transport (tests pause reading with it)."""
        return self.protocol.transport if self.protocol is not None else None

    @property
    def upgrade_headers(self) -> Dict[str, Any]:
        """The HTTP headers of the upgrade response."""
        response = self._upgrade_response
        return dict(getattr(response, "headers", {}) or {})

    def pause_reading(self) -> None:
        """Stop reading from the socket (the server then sees TCP backpressure)."""
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        """Undo ``pause_reading``."""
        if self.transport is not None:
            self.transport.resumeProducing()

    # ------------------------------------------------------------ sending

    def _check_open(self) -> _BridgeProtocol:
        """The protocol, or ConnectionClosed when sending is impossible."""
        if self.close_info is not None:
            raise ConnectionClosed(*self.close_info)
        if self.protocol is None or not self._is_open:
            raise ConnectionClosed(ABNORMAL_CLOSE, "not open")
        if self.protocol.state != WebSocketProtocol.STATE_OPEN:
            # A close frame went one way or the other; Autobahn refuses to send.
            code = self.protocol.remoteCloseCode
            raise ConnectionClosed(code if code is not None else 1000, "closing")
        return self.protocol

    def send_json(self, obj: Any) -> bytes:
        """
        Send one message through the codec (v1: a JSON text frame; v2: a
        sealed binary frame); returns the frame payload as sent (tests resend
        it to prove replay protection). v2: ``KeyRotationRequired`` when the
        send counter is exhausted; the connection is then closed.
        """
        protocol = self._check_open()
        try:
            payload, is_binary = self.codec.encode(obj)
        except KeyRotationRequired:
            self.close(1000, "Session key rotation required")
            raise
        protocol.sendMessage(payload, isBinary=is_binary)
        return payload

    def send_text(self, text: str) -> None:
        """Send ``text`` as one text frame, bypassing the codec."""
        self._check_open().sendMessage(text.encode("utf-8", "surrogatepass"), isBinary=False)

    def send_bytes(self, data: bytes, binary: bool = True) -> None:
        """Send raw bytes as one binary (or, with ``binary=False``, text) frame."""
        self._check_open().sendMessage(data, isBinary=binary)

    def close(self, code: int = 1000, reason: Optional[str] = None) -> "Deferred[CloseInfo]":
        """Start the closing handshake; the result fires like ``closed``."""
        if self.close_info is not None:
            return succeed(self.close_info)
        d = self.closed
        if self._is_open and self.protocol is not None:
            if self.protocol.state == WebSocketProtocol.STATE_OPEN:
                if code == 1000 or 3000 <= code <= 4999:
                    self.protocol.sendClose(code, reason)
                else:
                    # sendClose refuses the 1xxx protocol codes (e.g. 1008 after a decrypt failure).
                    reason_bytes = (reason or "").encode("utf-8")[:123]
                    self.protocol.sendCloseFrame(code=code, reasonUtf8=reason_bytes, isReply=False)
            # else: a closing handshake is already under way
        else:
            self.abort()
        return d

    def abort(self) -> None:
        """Drop the TCP connection without a closing handshake."""
        if self.protocol is not None and self.protocol.transport is not None:
            cast(Any, self.protocol.transport).abortConnection()  # the TCP transport (ITransport lacks it)
