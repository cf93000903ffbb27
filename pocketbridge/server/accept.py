"""
Admission before parsing (PROTOCOL.md §12): what a client may hold open
before the server has read a single complete request.

- ``Admission`` counts open connections per client IP and per node, from TCP
  accept to close, in O(1) per connect and disconnect.
- ``AdmissionFactory`` wraps a listening factory (the Site): a connection
  over a cap is closed at accept, before any HTTP is parsed. Near the node
  cap a connection is admitted *restricted*: it may only ask for ``/health``
  or ``/metrics`` (one request, then closed); anything else, the WebSocket
  upgrade included, gets 503.
- ``AdmittedConnection`` owns one timer per connection: the request-head
  deadline (from accept, or from the end of the previous response; bytes do
  not restart it) and then the request-body deadline and minimum rate.
  Twisted Web reports head and body progress through ``AdmittedRequest``.
  When ``/ws`` takes the transport over, the timer is cancelled: from then
  on the gateway's handshake deadline applies.

The client IP at accept is the TCP peer (IPv6 by /64): ``X-Forwarded-For``
cannot be read before HTTP, so behind a proxy every client counts as the
proxy (docs/operations.md).
"""

from __future__ import annotations

import resource as _resource
from typing import Any, Dict, Optional, Tuple, cast

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

from pocketbridge.server import metrics
from pocketbridge.server.api.http import LimitedRequest
from pocketbridge.server.gateway.admission import client_ip, peer_host

log = Logger()

#: Paths a restricted connection (the last slots below the node cap) may ask for.
RESTRICTED_PATHS = frozenset([b"/health", b"/api/health", b"/metrics"])
_WARN_EVERY = 60.0  # seconds between two "cap reached" warnings of one kind
_NO_LIMIT = 1 << 20  # stands for an unlimited RLIMIT_NOFILE


def raise_fd_limit(rlimit: Any = _resource) -> Tuple[int, int, int]:
    """
    Raise the soft RLIMIT_NOFILE to the hard limit: ``(old_soft, soft, hard)``.

    A hard limit of "unlimited" is reported as 2**20; when the kernel refuses
    the raise (e.g. macOS above OPEN_MAX) the soft limit stays as it was.
    """
    soft, hard = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
    old = soft
    if soft != hard:
        try:
            rlimit.setrlimit(rlimit.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    unlimited = rlimit.RLIM_INFINITY

    def show(n: int) -> int:
        return _NO_LIMIT if n == unlimited else n

    return show(old), show(soft), show(hard)


def connection_budget(fd_soft_limit: int, fd_reserve: int, db_pool_size: int, max_connections: int = 0) -> int:
    """
    Client connections one node may hold open: the soft fd limit minus the
    reserve (storage, Redis, logs, listening sockets) and the database pool;
    ``max_connections`` (0 = none) can only lower it. At least 1.
    """
    budget = fd_soft_limit - fd_reserve - db_pool_size
    if max_connections:
        budget = min(budget, max_connections)
    return max(1, budget)


def ip_key(addr: Optional[IAddress]) -> str:
    """The per-IP key of a peer address at accept: ``client_ip`` of its host (IPv6 by /64)."""
    return client_ip(peer_host(addr).split("%", 1)[0], None, ())


class Admission:
    """
    Open-connection counts of one node, shared by its listeners.

    ``reserved`` slots at the top of ``node_cap`` admit only restricted
    connections (``/health``, ``/metrics``), and only from an address that
    holds no other connection. Counting is O(1); the per-IP table holds only
    addresses with an open connection.
    """

    def __init__(self, clock: Any, *, per_ip: int, node_cap: int, reserved: int = 0,
                 head_timeout: float = 10.0, body_timeout: float = 30.0, body_grace: float = 10.0,
                 body_min_rate: float = 1024.0) -> None:
        self.clock = clock
        self.per_ip = per_ip
        self.node_cap = node_cap
        self.reserved = min(reserved, node_cap // 2)
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.body_grace = body_grace
        self.body_min_rate = body_min_rate
        self.open = 0
        self.by_ip: Dict[str, int] = {}
        self._warned: Dict[str, float] = {}

    @classmethod
    def from_settings(cls, clock: Any, settings: Any, node_cap: int, reserved: Optional[int] = None) -> "Admission":
        """An Admission with the limits of ``settings`` for ``node_cap`` connections (see ``connection_budget``)."""
        return cls(clock, per_ip=settings.conn_open_per_ip, node_cap=node_cap,
                   reserved=settings.reserved_connections if reserved is None else reserved,
                   head_timeout=settings.request_head_timeout, body_timeout=settings.request_body_timeout,
                   body_grace=settings.request_body_grace, body_min_rate=settings.request_body_min_rate)

    def admit(self, key: str) -> Optional[bool]:
        """
        Count a new connection from ``key``: None = refused (nothing counted),
        False = admitted, True = admitted restricted (health and metrics only).
        """
        held = self.by_ip.get(key, 0)
        if held >= self.per_ip:
            self._refused("connections_open_per_ip", "a client address holds {cap} open connections; "
                          "refusing more at accept", self.per_ip)
            return None
        restricted = self.open >= self.node_cap - self.reserved
        # The reserved slots go only to an address that holds nothing else
        # here (a monitor's probe), so whoever filled the node cannot take them.
        if self.open >= self.node_cap or (restricted and held > 0):
            self._refused("connections_per_node", "the node holds {cap} open connections (its fd budget); "
                          "refusing new ones at accept", self.node_cap)
            return None
        self.by_ip[key] = held + 1
        self.open += 1
        if restricted:
            metrics.LIMIT_HITS.labels(limit="connections_per_node_restricted").inc()
        return restricted

    def release(self, key: str) -> None:
        """A counted connection closed."""
        self.open -= 1
        held = self.by_ip.get(key, 0) - 1
        if held > 0:
            self.by_ip[key] = held
        else:
            self.by_ip.pop(key, None)

    def _refused(self, limit: str, message: str, cap: int) -> None:
        metrics.LIMIT_HITS.labels(limit=limit).inc()
        now = self.clock.seconds()
        if now - self._warned.get(limit, -_WARN_EVERY) >= _WARN_EVERY:
            self._warned[limit] = now
            log.warn(message, cap=cap)


class _Refused(Protocol):
    """Closes its connection at once (when a wrapping factory, e.g. TLS, cannot take None)."""

    def makeConnection(self, transport: Any) -> None:
        transport.abortConnection()


class AdmittedConnection(ProtocolWrapper):
    """
    One admitted connection: releases its slot on close and runs the head
    and body deadlines with a single timer.
    """

    factory: "AdmissionFactory"

    def __init__(self, factory: "AdmissionFactory", wrapped: Any, key: str, restricted: bool) -> None:
        self._http = True  # until a protocol (the WebSocket) takes the transport over
        super().__init__(cast(Any, factory), wrapped)
        self.key = key
        self.restricted = restricted
        self.admission = factory.admission
        self.timer: Any = None
        self.channel: Any = None  # the HTTPChannel, once a request has been seen
        self.body_started = 0.0
        self.body_bytes = 0

    # The gateway sets the TCP transport's buffer size through its transport (us).
    @property
    def bufferSize(self) -> int:
        return int(cast(Any, self.transport).bufferSize)

    @bufferSize.setter
    def bufferSize(self, value: int) -> None:
        cast(Any, self.transport).bufferSize = value

    @property  # type: ignore[override]
    def wrappedProtocol(self) -> Any:
        return self.__dict__.get("_wrapped")

    @wrappedProtocol.setter
    def wrappedProtocol(self, protocol: Any) -> None:
        old = self.__dict__.get("_wrapped")
        self.__dict__["_wrapped"] = protocol
        if old is not None and protocol is not None and protocol is not old:
            # /ws took the transport over: no more HTTP requests on this connection.
            self._http = False
            self._cancel()
            self._release_http_producer()
            self.channel = None  # the HTTP channel and its upgrade request would stay for the socket's life

    def _release_http_producer(self) -> None:
        """
        Unregister the HTTP channel, the only producer registered during the
        HTTP phase, so the protocol that took over can register its own
        (the transport allows one).
        """
        transport: Any = self.transport
        if transport is None or getattr(transport, "producer", None) is None:
            return
        try:
            transport.unregisterProducer()
        except Exception:  # a transport without a registered producer after all
            pass

    def makeConnection(self, transport: Any) -> None:
        self._arm(self.admission.head_timeout, self._head_expired)
        super().makeConnection(transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel()
        self.connected = False
        self.channel = None
        self.admission.release(self.key)
        super().connectionLost(reason)

    # ---------------------------------------------------- called by AdmittedRequest

    def head_received(self, channel: Any, has_body: bool) -> None:
        """The request head is complete: stop its deadline; start the body's if one follows."""
        self.channel = channel
        self._cancel()
        if has_body and self._http:
            self.body_started = self.admission.clock.seconds()
            self.body_bytes = 0
            first = min(self.admission.body_grace, self.admission.body_timeout)
            self._arm(first, self._body_check)

    def body_received(self, n: int) -> None:
        """``n`` more body bytes arrived (O(1); no timer work)."""
        self.body_bytes += n

    def body_complete(self) -> None:
        """The request is complete and goes to the application: no deadline while it is served."""
        self._cancel()

    def response_finished(self) -> None:
        """The response is written: the next request head has its deadline from now."""
        if self._http and self.connected:
            self._arm(self.admission.head_timeout, self._head_expired)

    # ---------------------------------------------------------------- timers

    def _arm(self, seconds: float, call: Any) -> None:
        self._cancel()
        self.timer = self.admission.clock.callLater(seconds, call)

    def _cancel(self) -> None:
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    def _head_expired(self) -> None:
        self.timer = None
        if getattr(self.channel, "_waitingForTransport", False):
            # The previous response is still in the send buffer (a slow
            # reader, not a slow writer): the next head's clock has not started.
            self._arm(self.admission.head_timeout, self._head_expired)
            return
        self._drop("request_head_timeout")

    def _body_check(self) -> None:
        self.timer = None
        a = self.admission
        elapsed = a.clock.seconds() - self.body_started
        if elapsed >= a.body_timeout - 1e-9:
            self._drop("request_body_timeout")
            return
        if self.body_bytes < a.body_min_rate * elapsed:
            self._drop("request_body_rate")
            return
        # Next look when the bytes so far no longer cover the rate, at least
        # 1 s later (a bounded number of checks per body), at most the deadline.
        due = max(self.body_bytes / a.body_min_rate if a.body_min_rate else a.body_timeout, elapsed + 1.0)
        self._arm(min(due, a.body_timeout) - elapsed, self._body_check)

    def _drop(self, limit: str) -> None:
        metrics.LIMIT_HITS.labels(limit=limit).inc()
        transport = self.transport
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]  # TCP and TLS transports have it


class AdmissionFactory(WrappingFactory):
    """
    Wraps a listening factory: applies ``admission`` at accept. A refused
    connection is closed at once (``buildProtocol`` returns None, or, under a
    wrapping factory that cannot take None such as TLS, a protocol that
    aborts on connect).
    """

    protocol = AdmittedConnection  # type: ignore[assignment]
    noisy = False

    def __init__(self, wrapped: Any, admission: Admission, refuse_with_none: bool = True) -> None:
        super().__init__(wrapped)
        self.admission = admission
        self.refuse_with_none = refuse_with_none

    def buildProtocol(self, addr: Any) -> Any:
        key = ip_key(addr)
        restricted = self.admission.admit(key)
        if restricted is None:
            return None if self.refuse_with_none else _Refused()
        try:
            inner = self.wrappedFactory.buildProtocol(addr)
        except BaseException:
            self.admission.release(key)
            raise
        if inner is None:
            self.admission.release(key)
            return None
        return AdmittedConnection(self, inner, key, restricted)

    def registerProtocol(self, p: Any) -> None:
        """Not tracked: ``Admission`` counts (WrappingFactory's dict would cost memory per connection)."""

    def unregisterProtocol(self, p: Any) -> None:
        """See ``registerProtocol``."""


def admitted_connection(request: Any) -> Optional[AdmittedConnection]:
    """The ``AdmittedConnection`` a request arrived on, if any."""
    channel = getattr(request, "channel", None)
    transport = getattr(channel, "transport", None)
    return transport if isinstance(transport, AdmittedConnection) else None


class AdmittedRequest(LimitedRequest):
    """
    ``LimitedRequest`` that reports head and body progress to its
    ``AdmittedConnection``; on a restricted connection it is the last request.
    """

    def gotLength(self, length: Optional[int]) -> None:
        conn = admitted_connection(self)
        if conn is not None:
            conn.head_received(self.channel, length != 0)
            if conn.restricted:
                self.channel.persistent = False
                self.responseHeaders.setRawHeaders(b"connection", [b"close"])
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        conn = admitted_connection(self)
        if conn is not None:
            conn.body_received(len(data))
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        conn = admitted_connection(self)
        if conn is not None:
            conn.body_complete()
        super().requestReceived(command, path, version)

    def finish(self) -> None:
        conn = admitted_connection(self)
        if conn is not None and not self._disconnected and not self.finished:
            # Before the channel replays pipelined bytes (inside finish), so a
            # head parsed there cancels this deadline rather than the reverse.
            conn.response_finished()
        super().finish()
