"""
Admission before parsing (PROTOCOL.md §12), in memory: the per-IP and
node-wide caps at accept, the request-head deadline, the request-body
deadline and minimum rate, and the fd-derived connection budget.

Connections are ``AdmissionFactory.buildProtocol`` + ``StringTransport``
on a ``MemoryReactorClock``; the site is the server's own ``build_site``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, List, Optional, Tuple

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from klein import Klein
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from pocketbridge.server.accept import Admission, AdmissionFactory, connection_budget, ip_key, raise_fd_limit
from pocketbridge.server.api.http import Api
from pocketbridge.server.config import Settings
from pocketbridge.server.web import Root, build_site

UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


class _Pages(Resource):
    """``/quick`` answers at once, ``/slow`` never (a long poll), ``POST /upload`` echoes the body length."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: List[Any] = []

    def render_GET(self, request: Any) -> Any:
        if request.path == b"/slow":
            self.pending.append(request)
            return NOT_DONE_YET
        return b"quick"

    def render_POST(self, request: Any) -> bytes:
        return b"got %d" % len(request.content.read())


class Harness:
    """A site behind an ``AdmissionFactory`` on a ``MemoryReactorClock``."""

    def __init__(self, root: Any = None, **limits: Any) -> None:
        self.clock = MemoryReactorClock()
        self.pages = _Pages()
        self.site = build_site(root if root is not None else self.pages, self.clock)
        options = dict(per_ip=512, node_cap=10_000, reserved=0)
        options.update(limits)
        self.admission = Admission(self.clock, **options)
        self.factory = AdmissionFactory(self.site, self.admission)

    def connect(self, host: str = "10.0.0.1", port: int = 40000) -> Tuple[Any, Optional[StringTransport]]:
        """Accept one connection from ``host``: (protocol, transport), or (None, None) when refused."""
        addr = IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)
        proto = self.factory.buildProtocol(addr)
        if proto is None:
            return None, None
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        return proto, transport

    def close(self, proto: Any) -> None:
        """The peer closed the connection."""
        proto.connectionLost(Failure(ConnectionDone()))

    def trickle(self, proto: Any, transport: StringTransport, data: bytes, every: float) -> float:
        """Send ``data`` one byte per ``every`` seconds while the connection is open; seconds it lasted."""
        elapsed = 0.0
        for i in range(len(data)):
            if transport.disconnecting:
                break
            proto.dataReceived(data[i:i + 1])
            self.clock.advance(every)
            elapsed += every
        return elapsed


class PerIpCapTests(SynchronousTestCase):
    """Open connections per client IP, counted from TCP accept."""

    def test_513th_connection_from_one_ip_is_refused_at_accept(self) -> None:
        """512 connections from one IP are admitted before any byte is read; the 513th is closed at accept."""
        h = Harness()
        conns = [h.connect("10.0.0.1", 1000 + i)[0] for i in range(512)]
        self.assertNotIn(None, conns)
        self.assertEqual(h.connect("10.0.0.1", 9999), (None, None))
        self.assertIsNotNone(h.connect("10.0.0.2", 9999)[0], "another address is not affected")

    def test_a_close_frees_the_slot(self) -> None:
        """After one of the 512 closes, the same IP is admitted again (and only once)."""
        h = Harness()
        conns = [h.connect("10.0.0.1", 1000 + i)[0] for i in range(512)]
        h.close(conns[7])
        self.assertIsNotNone(h.connect("10.0.0.1", 9998)[0])
        self.assertEqual(h.connect("10.0.0.1", 9999), (None, None))
        for proto in conns[:7] + conns[8:]:
            h.close(proto)
        self.assertEqual(h.admission.by_ip, {"10.0.0.1": 1}, "closed connections leave nothing behind")

    def test_ipv6_is_keyed_by_64(self) -> None:
        """Two addresses of one IPv6 /64 share a budget; another /64 does not; IPv4-mapped peers count as IPv4."""
        h = Harness(per_ip=2)
        self.assertIsNotNone(h.connect("2001:db8:1:2::1")[0])
        self.assertIsNotNone(h.connect("2001:db8:1:2::ffff")[0])
        self.assertEqual(h.connect("2001:db8:1:2:abcd::1"), (None, None))
        self.assertIsNotNone(h.connect("2001:db8:1:3::1")[0])
        self.assertEqual(ip_key(IPv6Address("TCP", "::ffff:192.0.2.7", 1)), "192.0.2.7")
        self.assertNotEqual(ip_key(IPv6Address("TCP", "::ffff:192.0.2.7", 1)),
                            ip_key(IPv6Address("TCP", "::ffff:192.0.2.8", 1)))


class NodeCapTests(SynchronousTestCase):
    """The node-wide cap and its slots reserved for /health and /metrics."""

    def _root(self) -> Root:
        app = Klein()

        @app.route("/health")
        def health(request: Any) -> bytes:
            return b"healthy"

        @app.route("/api/things")
        def things(request: Any) -> bytes:
            return b"things"

        node = SimpleNamespace(settings=Settings(), draining=False, trusted_proxies=())
        api = Api(Klein(), node, None)  # type: ignore[arg-type]
        ws = WebSocketServerFactory()
        ws.protocol = WebSocketServerProtocol
        return Root(node, app, ws, api)  # type: ignore[arg-type]

    def test_full_node_answers_health_but_refuses_the_rest(self) -> None:
        """In the cap's last slots a new address gets /health but 503 for the upgrade; past the cap, refused at accept."""
        h = Harness(root=self._root(), per_ip=100, node_cap=4, reserved=2)
        normal = [h.connect("10.0.0.%d" % i) for i in (1, 2)]
        self.assertFalse(any(p.restricted for p, _ in normal))
        self.assertEqual(h.connect("10.0.0.1"), (None, None), "the reserve is not for an address that holds a slot")
        p3, t3 = h.connect("10.0.0.3")
        p4, t4 = h.connect("10.0.0.4")
        self.assertTrue(p3.restricted and p4.restricted)
        self.assertEqual(h.connect("10.0.0.5"), (None, None))
        assert t3 is not None and t4 is not None
        p3.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(t3.value().startswith(b"HTTP/1.1 200"), t3.value()[:80])
        self.assertIn(b"healthy", t3.value())
        self.assertTrue(t3.disconnecting, "a reserved slot serves one request, then closes")
        p4.dataReceived(UPGRADE)
        self.assertTrue(t4.value().startswith(b"HTTP/1.1 503"), t4.value()[:80])
        self.assertIn(b"Server full", t4.value())
        t1 = normal[0][1]
        normal[0][0].dataReceived(b"GET /api/things HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"things", t1.value())

    def test_budget_is_the_fd_limit_minus_the_reserve(self) -> None:
        """fd soft limit 1024, reserve 64, pool 4: 956 connections; a configured cap can only lower it."""
        self.assertEqual(connection_budget(1024, 64, 4), 956)
        self.assertEqual(connection_budget(1024, 64, 4, max_connections=300), 300)
        self.assertEqual(connection_budget(1024, 64, 4, max_connections=5000), 956)
        self.assertEqual(connection_budget(50, 64, 4), 1)
        a = Admission.from_settings(MemoryReactorClock(), Settings(), connection_budget(1024, 64, 4))
        self.assertEqual((a.node_cap, a.per_ip, a.reserved), (956, 512, 16))

    def test_soft_fd_limit_is_raised_to_the_hard_limit(self) -> None:
        """raise_fd_limit sets soft = hard and reports the old soft, new soft and hard limits."""
        calls: List[Any] = []
        fake = SimpleNamespace(RLIMIT_NOFILE=7, RLIM_INFINITY=-1, getrlimit=lambda which: (1024, 524288),
                               setrlimit=lambda which, limits: calls.append((which, limits)))
        self.assertEqual(raise_fd_limit(fake), (1024, 524288, 524288))
        self.assertEqual(calls, [(7, (524288, 524288))])

        def refuse(which: int, limits: Any) -> None:
            raise ValueError("not allowed")

        stuck = SimpleNamespace(RLIMIT_NOFILE=7, RLIM_INFINITY=-1, getrlimit=lambda which: (256, -1), setrlimit=refuse)
        self.assertEqual(raise_fd_limit(stuck), (256, 256, 1 << 20))


class HeadDeadlineTests(SynchronousTestCase):
    """Time to send a complete request head: from accept, not restarted by bytes."""

    def test_head_trickled_a_byte_a_second_is_dropped_at_10_s(self) -> None:
        """A REST head sent one byte per second is dropped 10 s after accept, although bytes keep coming."""
        h = Harness(head_timeout=10.0)
        proto, t = h.connect()
        lasted = h.trickle(proto, t, b"GET /quick HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"a" * 100, 1.0)
        self.assertTrue(t.disconnecting)
        self.assertEqual(lasted, 10.0)
        self.assertEqual(t.value(), b"", "nothing was answered")

    def test_websocket_upgrade_head_has_the_same_deadline(self) -> None:
        """A /ws upgrade head trickled one byte per second is dropped at 10 s too."""
        h = Harness(root=NodeCapTests._root(NodeCapTests()), head_timeout=10.0)
        proto, t = h.connect()
        self.assertEqual(h.trickle(proto, t, UPGRADE, 1.0), 10.0)
        self.assertTrue(t.disconnecting)

    def test_idle_connection_is_dropped_at_10_s(self) -> None:
        """A connection that sends nothing is dropped 10 s after accept (and its slot is freed on close)."""
        h = Harness(per_ip=1)
        proto, t = h.connect()
        h.clock.advance(9.9)
        self.assertFalse(t.disconnecting)
        h.clock.advance(0.2)
        self.assertTrue(t.disconnecting)
        h.close(proto)
        self.assertIsNotNone(h.connect()[0])

    def test_complete_head_stops_the_deadline_while_served(self) -> None:
        """A long poll whose head arrived is not dropped; after its response the next head has 10 s."""
        h = Harness()
        proto, t = h.connect()
        proto.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        h.clock.advance(120)
        self.assertFalse(t.disconnecting)
        request = h.pages.pending.pop()
        request.write(b"late")
        request.finish()
        self.assertIn(b"late", t.value())
        h.clock.advance(9)
        proto.dataReceived(b"GET /quick HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"quick", t.value())
        h.clock.advance(9.9)
        self.assertFalse(t.disconnecting, "each head has its own 10 s")
        h.clock.advance(0.2)
        self.assertTrue(t.disconnecting, "an idle keep-alive connection is dropped")

    def test_upgrade_hands_over_and_the_deadline_is_gone(self) -> None:
        """A complete /ws upgrade is answered 101 and the connection outlives the head deadline."""
        txaio.use_twisted()
        txaio.config.loop = MemoryReactorClock()
        h = Harness(root=NodeCapTests._root(NodeCapTests()), head_timeout=10.0)
        proto, t = h.connect()
        proto.dataReceived(UPGRADE)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 101"), t.value()[:80])
        self.assertFalse(proto._http)
        self.assertIsNone(getattr(t, "producer", None), "the HTTP channel no longer holds the transport's producer slot")
        h.clock.advance(60)
        self.assertFalse(t.disconnecting)


class BodyDeadlineTests(SynchronousTestCase):
    """Time to send a request body: 30 s, and at least 1 KiB/s after the first 10 s."""

    def _post(self, h: Harness, headers: bytes) -> Tuple[Any, StringTransport]:
        proto, t = h.connect()
        proto.dataReceived(b"POST /upload HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        return proto, t

    def test_chunked_body_a_byte_every_5_s_is_dropped_at_10_s(self) -> None:
        """A chunked body trickling one byte every 5 s is dropped when the 10 s grace ends."""
        h = Harness()
        proto, t = self._post(h, b"Transfer-Encoding: chunked\r\n")
        for _ in range(3):
            if t.disconnecting:
                break
            proto.dataReceived(b"1\r\nx\r\n")
            h.clock.advance(5)
        self.assertTrue(t.disconnecting)
        self.assertEqual(h.clock.seconds(), 10.0)
        self.assertEqual(t.value(), b"")

    def test_steady_but_slow_body_is_dropped_at_30_s(self) -> None:
        """A 60 KiB body at 1.5 KiB/s keeps the minimum rate but is dropped at the 30 s deadline."""
        h = Harness()
        proto, t = self._post(h, b"Content-Length: %d\r\n" % (60 * 1024))
        while not t.disconnecting and h.clock.seconds() < 60:
            proto.dataReceived(b"x" * 1536)
            h.clock.advance(1)
        self.assertEqual(h.clock.seconds(), 30.0)
        self.assertEqual(t.value(), b"")

    def test_honest_body_is_served(self) -> None:
        """A 40 KiB body at 2 KiB/s (20 s) is read in full and answered."""
        h = Harness()
        proto, t = self._post(h, b"Content-Length: %d\r\n" % (40 * 1024))
        for _ in range(20):
            h.clock.advance(1)
            proto.dataReceived(b"x" * 2048)
        self.assertIn(b"got 40960", t.value())
        self.assertFalse(t.disconnecting)

    def test_body_checks_are_bounded(self) -> None:
        """A body kept just above the rate is looked at about once a second, never per byte."""
        h = Harness()
        proto, t = self._post(h, b"Content-Length: %d\r\n" % (64 * 1024))
        calls = []
        original = proto._body_check

        def counted() -> None:
            calls.append(h.clock.seconds())
            original()

        proto._body_check = counted
        proto.timer.func = counted
        while not t.disconnecting and h.clock.seconds() < 60:
            proto.dataReceived(b"x" * 113)  # 1.1 KiB/s in 0.1 s steps
            h.clock.advance(0.1)
        self.assertAlmostEqual(h.clock.seconds(), 30.0, delta=0.11)
        self.assertLessEqual(len(calls), 25)
        h.close(proto)
        self.assertEqual(h.clock.getDelayedCalls(), [], "no timer outlives the connection")


class ListenerTests(SynchronousTestCase):
    """How refusals and the accept queue are set up on the listening side."""

    def test_refused_under_a_wrapping_factory_aborts_at_connect(self) -> None:
        """Under TLS (which cannot take None) a refused connection gets a protocol that aborts at once."""
        h = Harness(per_ip=1)
        h.factory.refuse_with_none = False
        h.connect("10.0.0.1")
        refused = h.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 2))
        transport = StringTransport()
        refused.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.admission.open, 1, "a refused connection is not counted")

    def test_listen_backlog_is_added_unless_given(self) -> None:
        """tcp/ssl/unix endpoints get backlog=N (Twisted's default 50 drops SYNs under a connect flood) unless set."""
        from pocketbridge.server.tap import _refuse_with_none, _with_backlog

        self.assertEqual(_with_backlog("tcp:3001:interface=127.0.0.1", 1024), "tcp:3001:interface=127.0.0.1:backlog=1024")
        self.assertEqual(_with_backlog("tcp:3001:backlog=5", 1024), "tcp:3001:backlog=5")
        self.assertEqual(_with_backlog("systemd:domain=INET:index=0", 1024), "systemd:domain=INET:index=0")
        self.assertTrue(_refuse_with_none("tcp:3001"))
        self.assertFalse(_refuse_with_none("ssl:443:privateKey=k.pem"))


class ClientKeyTests(SynchronousTestCase):
    """Every per-IP limit keys a client the same way (PROTOCOL.md §12)."""

    def test_ipv4_mapped_peer_is_its_ipv4_address_everywhere(self) -> None:
        """A dual-stack listener's IPv4 clients get their own key in the upgrade and REST limits too, not one shared /64."""
        from pocketbridge.server.gateway.adapter import client_ip

        self.assertEqual(client_ip("::ffff:192.0.2.7", None, ()), "192.0.2.7")
        self.assertNotEqual(client_ip("::ffff:192.0.2.7", None, ()), client_ip("::ffff:192.0.2.8", None, ()))
        self.assertEqual(client_ip("2001:db8::1", None, ()), client_ip("2001:db8::2", None, ()))
