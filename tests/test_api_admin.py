"""
The admin routes (API.md §1.3 and §3): the admin key, node statistics,
revoking and un-revoking a device, and draining a node.

The drain mechanics (``pocketbridge.server.cluster.drain``) are unit-tested with a Clock
and fake sockets; everything else runs against a real server on SQLite and
PostgreSQL, driven by the SDK.
"""

from __future__ import annotations

import base64
import os
import random
import time
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple

import treq
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pocketbridge.server.cluster import drain
from pocketbridge.client import Client, ConnectionClosed, Identity
from pocketbridge.client.rest import RestClient, RestResponse
from tests.class_servers import class_server
from tests.harness import PostgresMixin, ServerProcess, SQLiteMixin, make_server, start_server
from tests.test_api_auth import ADMIN_ENV, ADMIN_KEY, admin_client, admin_headers, admin_post, register_device

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

TIMEOUT = 10.0
STREAM = "clipboard:main"
TYPE = "clipboard:text"


def b64() -> str:
    """A valid ``encrypted_payload``."""
    return base64.b64encode(os.urandom(24)).decode("ascii")


def device_path(user_id: str, device_id: str, action: str) -> str:
    """``/admin/users/{user_id}/devices/{device_id}/{action}``."""
    return "/admin/users/{}/devices/{}/{}".format(user_id, device_id, action)


# ---------------------------------------------------------------- drain, unit


class _FakeSession:
    def __init__(self, proto: "_FakeProto") -> None:
        self.proto = proto

    def close_for(self, code: int, reason: str, notice: Optional[bytes]) -> None:
        self.proto.close(code, reason)

    def close_after_acks(self, code: int, reason: str) -> None:
        # Nothing is awaiting a commit here, so the close goes out at once
        # (Session.close_after_acks does the same with no outcomes pending).
        self.proto.close(code, reason)


class _FakeProto:
    """A socket whose close completes ``close_delay`` s after the close frame (never, with ``stuck``)."""

    def __init__(self, node: "_FakeNode", authenticated: bool = True, stuck: bool = False,
                 close_delay: float = 0.05) -> None:
        self.node = node
        self.session = _FakeSession(self) if authenticated else None
        self.stuck = stuck
        self.close_delay = close_delay
        self.closes: List[Tuple[float, int, str]] = []
        node.connections.add(self)

    def close(self, code: int, reason: str) -> None:
        self.closes.append((self.node.clock.seconds(), code, reason))
        if not self.stuck:
            self.node.clock.callLater(self.close_delay, self.node.connections.discard, self)


class _FakeNode:
    def __init__(self, seed: int = 7) -> None:
        self.clock = Clock()
        self.rng = random.Random(seed)
        self.connections: Set[Any] = set()
        self.draining = False


class DrainUnitTests(SynchronousTestCase):
    """``start_drain`` closes sockets 1001 spread over the window and reports when none is left."""

    def run_clock(self, node: _FakeNode, seconds: float, step: float = 0.01) -> None:
        """Advance the fake clock in small steps."""
        for _ in range(int(round(seconds / step))):
            node.clock.advance(step)

    def test_closes_all_1001_spread_over_window(self) -> None:
        """Every socket is closed once with 1001, at moments spread over [0, window], none after it."""
        node = _FakeNode()
        protos = [_FakeProto(node) for _ in range(40)]
        drain.start_drain(node, 10.0)
        self.assertTrue(node.draining)
        self.run_clock(node, 10.0)
        times = []
        for p in protos:
            self.assertEqual(len(p.closes), 1)
            t, code, reason = p.closes[0]
            self.assertEqual(code, 1001)
            self.assertEqual(reason, "Server going away")
            times.append(t)
        self.assertGreaterEqual(min(times), 0.0)
        self.assertLessEqual(max(times), 10.0 + 1e-6)
        # Spread, not a stampede: every quarter of the window sees some closes.
        quarters = {int(t // 2.5) for t in times if t < 10.0}
        self.assertEqual(quarters, {0, 1, 2, 3})

    def test_fires_when_last_socket_gone(self) -> None:
        """The Deferred fires with the number closed only after the last socket has gone."""
        node = _FakeNode()
        for _ in range(5):
            _FakeProto(node)
        d = drain.start_drain(node, 2.0)
        results: List[int] = []
        d.addCallback(results.append)
        while node.connections:
            self.assertEqual(results, [])
            node.clock.advance(0.01)
        self.run_clock(node, 0.2)
        self.assertEqual(results, [5])

    def test_unauthenticated_socket_closed_directly(self) -> None:
        """A socket still in its handshake is closed 1001 too."""
        node = _FakeNode()
        proto = _FakeProto(node, authenticated=False)
        drain.start_drain(node, 1.0)
        self.run_clock(node, 1.1)
        self.assertEqual([c[1] for c in proto.closes], [1001])

    def test_no_sockets_fires_at_once(self) -> None:
        """Draining an idle node is done at once."""
        node = _FakeNode()
        results: List[int] = []
        drain.start_drain(node, 30.0).addCallback(results.append)
        self.assertEqual(results, [0])
        self.assertTrue(node.draining)

    def test_second_drain_joins_the_first(self) -> None:
        """A second drain neither reschedules nor closes twice; both Deferreds fire together."""
        node = _FakeNode()
        protos = [_FakeProto(node) for _ in range(10)]
        first: List[int] = []
        second: List[int] = []
        drain.start_drain(node, 2.0).addCallback(first.append)
        self.run_clock(node, 1.0)
        drain.start_drain(node, 60.0).addCallback(second.append)
        self.run_clock(node, 1.5)
        self.assertEqual((first, second), ([10], [10]))
        self.assertEqual([len(p.closes) for p in protos], [1] * 10)

    def test_socket_opened_during_drain_closed_at_window_end(self) -> None:
        """A socket whose upgrade was under way when the drain began is closed when the window ends."""
        node = _FakeNode()
        _FakeProto(node, close_delay=5.0)  # a slow close handshake keeps the drain going
        results: List[int] = []
        drain.start_drain(node, 3.0).addCallback(results.append)
        node.clock.advance(0.5)
        late = _FakeProto(node)
        self.run_clock(node, 2.0)
        self.assertEqual(late.closes, [])
        self.run_clock(node, 1.0)
        self.assertEqual([c[1] for c in late.closes], [1001])
        self.run_clock(node, 5.2)
        self.assertEqual(results, [2])

    def test_stuck_socket_does_not_block_forever(self) -> None:
        """A socket that never finishes closing delays the Deferred only until the grace period ends."""
        node = _FakeNode()
        _FakeProto(node, stuck=True)
        results: List[int] = []
        drain.start_drain(node, 1.0).addCallback(results.append)
        self.run_clock(node, 1.0 + drain.GRACE - 0.5, step=0.1)
        self.assertEqual(results, [])
        self.run_clock(node, 1.0, step=0.1)
        self.assertEqual(results, [1])


# ---------------------------------------------------------------- against a server


class AdminKeyTests(_Base):
    """The admin key (API.md §1.3)."""

    async def test_no_key_routes_404(self) -> None:
        """Without ADMIN_API_KEY every admin route answers 404 NOT_FOUND, and nothing happens."""
        server = await start_server(self)
        identity, device_id = await register_device(server)
        client = admin_client(server)
        for method, path in (("GET", "/admin/stats"), ("POST", "/admin/drain"),
                             ("POST", device_path(identity.user_id, device_id, "revoke")),
                             ("POST", device_path(identity.user_id, device_id, "unrevoke"))):
            for headers in ({}, admin_headers()):
                response = await client.request(method, path, headers=headers)
                self.assertEqual((response.status, response.json["code"]), (404, "NOT_FOUND"), path)
        health = await client.get("/health")
        self.assertEqual((health.status, health.json["status"]), (200, "ok"))
        await register_device(server, identity, device_id)  # not revoked

    async def test_short_key_refused_at_startup(self) -> None:
        """A key shorter than 32 characters stops the server at startup with one line naming ADMIN_API_KEY."""
        short = "k" * 31
        result = await make_server(self, env={"ADMIN_API_KEY": short}).start_expect_failure()
        self.assertNotEqual(result.code, 0)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, result.output)
        self.assertIn("ADMIN_API_KEY", lines[0])
        self.assertNotIn(short, result.output)

    async def test_key_of_32_characters_accepted(self) -> None:
        """A key of exactly 32 characters works."""
        key = "K" * 32
        server = await start_server(self, env={"ADMIN_API_KEY": key})
        response = await admin_client(server).get("/admin/stats", headers=admin_headers(key))
        self.assertEqual(response.status, 200, response)

    async def test_wrong_or_missing_key_401(self) -> None:
        """A missing, wrong or differently-schemed key gets 401 ADMIN_AUTH_REQUIRED."""
        server = await start_server(self, env=ADMIN_ENV)
        client = admin_client(server)
        for headers in ({}, admin_headers(ADMIN_KEY[:-1]), admin_headers(ADMIN_KEY + "x"),
                        admin_headers("x" * len(ADMIN_KEY)), {"Authorization": ADMIN_KEY},
                        {"Authorization": "Basic " + ADMIN_KEY}):
            for method, path in (("GET", "/admin/stats"), ("POST", "/admin/drain")):
                response = await client.request(method, path, headers=headers)
                self.assertEqual((response.status, response.json["code"]), (401, "ADMIN_AUTH_REQUIRED"),
                                 (headers, path))
        health = await client.get("/health")
        self.assertEqual(health.json["status"], "ok")  # the refused drain did not start


class AdminRouteTests(_Base):
    """Stats, revoke and unrevoke (API.md §3)."""

    async def server(self, *args: str) -> ServerProcess:
        """A server with the admin key set, shared by the class's tests (tests.class_servers)."""
        return await class_server(self, args=args, env=ADMIN_ENV)

    async def stats(self, server: ServerProcess) -> Dict[str, Any]:
        """GET /admin/stats (200)."""
        response = await admin_client(server).get("/admin/stats", headers=admin_headers())
        self.assertEqual(response.status, 200, response)
        return response.json  # type: ignore[no-any-return]

    async def online(self, server: ServerProcess, identity: Identity, device_id: Optional[str] = None) -> Client:
        """A connected client, closed after the test."""
        client = Client(reactor, server.ws_url, identity, device_id=device_id)
        self.addCleanup(client.close)
        await client.connect()
        return client

    async def wait_stats(self, server: ServerProcess, connections: int) -> Dict[str, Any]:
        """Poll /admin/stats until this node reports ``connections`` sockets (closes finish asynchronously)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            stats = await self.stats(server)
            if stats["nodes"][0]["connections"] == connections or time.monotonic() > deadline:
                return stats
            await deferLater(reactor, 0.05, lambda: None)

    async def test_stats_counts_devices_and_events(self) -> None:
        """Stats show this node's sockets and online devices and the number of stored events."""
        server = await start_server(self, env=ADMIN_ENV)  # node totals: a server of its own
        empty = await self.stats(server)
        health = (await admin_client(server).get("/health")).json
        self.assertEqual(empty, {"nodes": [{"node_id": health["node_id"], "connections": 0, "devices_online": 0}],
                                 "events_stored": 0})
        identity = Identity.generate()
        a = await self.online(server, identity)
        for _ in range(3):
            await a.send_event(STREAM, TYPE, b64(), timeout=TIMEOUT)
        stats = await self.stats(server)
        self.assertEqual(stats["nodes"][0]["connections"], 1)
        self.assertEqual(stats["nodes"][0]["devices_online"], 1)
        self.assertEqual(stats["events_stored"], 3)
        # Two sockets of one device count as two connections and one device.
        same = await self.online(server, identity, a.device_id)
        b = await self.online(server, identity)
        await b.send_event(STREAM, TYPE, b64(), timeout=TIMEOUT)
        stats = await self.stats(server)
        self.assertEqual(stats["nodes"][0]["connections"], 3)
        self.assertEqual(stats["nodes"][0]["devices_online"], 2)
        self.assertEqual(stats["events_stored"], 4)
        for client in (a, same, b):
            await client.close()
        stats = await self.wait_stats(server, 0)
        self.assertEqual((stats["nodes"][0]["connections"], stats["nodes"][0]["devices_online"]), (0, 0))
        self.assertEqual(stats["events_stored"], 4)

    async def test_revoke_closes_socket_4003_and_refuses_requests(self) -> None:
        """Revoking closes the device's socket 4003 within 1 s; its requests get 403 and its handshakes 4003."""
        server = await self.server()
        identity = Identity.generate()
        a = await self.online(server, identity)
        b = await self.online(server, identity)
        closed = a.closed
        response = await admin_post(server, device_path(identity.user_id, a.device_id, "revoke"))
        self.assertEqual((response.status, response.json), (200, {"success": True}))
        closed.addTimeout(1.0, reactor)
        code, _ = await closed
        self.assertEqual(code, 4003)
        self.assertTrue(b.raw is not None and b.raw.is_open)  # the other device stays connected
        refused = await RestClient(reactor, server.http_url, identity, a.device_id).get("/api/devices")
        self.assertEqual((refused.status, refused.json["code"]), (403, "DEVICE_REVOKED"))
        allowed = await RestClient(reactor, server.http_url, identity, b.device_id).get("/api/devices")
        self.assertEqual(allowed.status, 200)
        again = Client(reactor, server.ws_url, identity, device_id=a.device_id)
        failure = await self.assertFailure(again.connect(), ConnectionClosed)
        self.assertEqual(failure.code, 4003)
        # Idempotent.
        second = await admin_post(server, device_path(identity.user_id, a.device_id, "revoke"))
        self.assertEqual((second.status, second.json), (200, {"success": True}))

    async def test_unrevoke_lets_device_back(self) -> None:
        """After unrevoke the device handshakes again and its signed requests succeed."""
        server = await self.server()
        identity, device_id = await register_device(server)
        path = device_path(identity.user_id, device_id, "revoke")
        self.assertEqual((await admin_post(server, path)).status, 200)
        refused = Client(reactor, server.ws_url, identity, device_id=device_id)
        await self.assertFailure(refused.connect(), ConnectionClosed)
        response = await admin_post(server, device_path(identity.user_id, device_id, "unrevoke"))
        self.assertEqual((response.status, response.json), (200, {"success": True}))
        client = await self.online(server, identity, device_id)
        await client.send_event(STREAM, TYPE, b64(), timeout=TIMEOUT)
        rest = await RestClient(reactor, server.http_url, identity, device_id).get("/api/devices")
        self.assertEqual(rest.status, 200, rest)
        # Unrevoking a device that is not revoked is harmless.
        again = await admin_post(server, device_path(identity.user_id, device_id, "unrevoke"))
        self.assertEqual((again.status, again.json), (200, {"success": True}))

    async def test_unknown_device_404(self) -> None:
        """Revoking or unrevoking a device that was never registered gets 404 NOT_FOUND."""
        server = await self.server()
        identity, _ = await register_device(server)
        for action in ("revoke", "unrevoke"):
            for user in (identity.user_id, Identity.generate().user_id):
                response = await admin_post(server, device_path(user, str(uuid.uuid4()), action))
                self.assertEqual((response.status, response.json["code"]), (404, "NOT_FOUND"), action)

    async def test_ids_are_case_insensitive_and_validated(self) -> None:
        """Ids in upper case name the same device; malformed ids get 400 VALIDATION_ERROR naming the field."""
        server = await self.server()
        identity, device_id = await register_device(server)
        upper = await admin_post(server, device_path(identity.user_id.upper(), device_id.upper(), "revoke"))
        self.assertEqual(upper.status, 200, upper)
        refused = await RestClient(reactor, server.http_url, identity, device_id).get("/api/devices")
        self.assertEqual(refused.status, 403)
        bad_user = await admin_post(server, device_path("abc", device_id, "revoke"))
        self.assertEqual((bad_user.status, bad_user.json.get("field")), (400, "user_id"))
        bad_device = await admin_post(server, device_path(identity.user_id, "laptop", "revoke"))
        self.assertEqual((bad_device.status, bad_device.json.get("field")), (400, "device_id"))


class DrainTests(_Base):
    """POST /admin/drain (API.md §3)."""

    async def test_drain(self) -> None:
        """Drain answers 202; /health turns 503 draining; upgrades get 503; open sockets close 1001 within the window."""
        server = await start_server(self, args=["--drain-window", "2"], env=ADMIN_ENV)
        identity = Identity.generate()
        clients = []
        for _ in range(4):
            client = Client(reactor, server.ws_url, identity)
            self.addCleanup(client.close)
            await client.connect()
            clients.append(client)
        closes = [c.closed for c in clients]
        started = time.monotonic()
        response = await admin_post(server, "/admin/drain")
        self.assertEqual((response.status, response.json), (202, {"draining": True, "window_s": 2}))

        health = await admin_client(server).get("/health")
        self.assertEqual((health.status, health.json["status"]), (503, "draining"))
        self.assertEqual(set(health.json), {"status", "version", "node_id", "uptime_s", "services"})
        api_health = await admin_client(server).get("/api/health")
        self.assertEqual((api_health.status, api_health.json["status"]), (503, "draining"))

        upgrade = await treq.get(server.http_url + "/ws", persistent=False, headers={
            "Upgrade": ["websocket"], "Connection": ["Upgrade"], "Sec-WebSocket-Version": ["13"],
            "Sec-WebSocket-Key": [base64.b64encode(os.urandom(16)).decode("ascii")]})
        await treq.content(upgrade)
        self.assertEqual(upgrade.code, 503)
        retry = upgrade.headers.getRawHeaders("Retry-After")
        self.assertTrue(retry and retry[0].isdigit(), retry)
        await self.assertFailure(Client(reactor, server.ws_url, identity).connect(), Exception)

        for d in closes:
            d.addTimeout(2.0 + 2.0, reactor)
        codes = [await d for d in closes]
        self.assertEqual([code for code, _ in codes], [1001] * 4)
        self.assertLess(time.monotonic() - started, 2.0 + 2.0)

        # A second drain is accepted and changes nothing; the node stays draining.
        again = await admin_post(server, "/admin/drain")
        self.assertEqual(again.status, 202)
        self.assertEqual((await admin_client(server).get("/health")).status, 503)

    async def test_drain_loses_no_acked_event(self) -> None:
        """Events acked while the node drains are all in storage after a crash and restart."""
        server = await start_server(self, args=["--drain-window", "1"], env=ADMIN_ENV)
        identity = Identity.generate()
        sender = Client(reactor, server.ws_url, identity)
        self.addCleanup(sender.close)
        await sender.connect()
        closed = sender.closed
        acked: List[str] = []
        unacked: List[str] = []
        done: List[bool] = []
        closed.addBoth(lambda r: done.append(True) or r)

        def record(ack: Dict[str, Any], event_id: str) -> None:
            self.assertIsNot(ack.get("dropped"), True)
            acked.append(event_id)

        def send_batch() -> None:
            for _ in range(20):
                # Once a close frame went either way the SDK refuses to send (and, as of
                # writing, would leave the refused event's Deferred to fail unhandled).
                protocol = sender.raw.protocol if sender.raw is not None else None
                if protocol is None or protocol.state != WebSocketProtocol.STATE_OPEN:
                    return
                event_id = str(uuid.uuid4())
                d = sender.send_event_nowait(STREAM, TYPE, b64(), event_id=event_id)
                d.addCallbacks(record, lambda f, e=event_id: unacked.append(e), callbackArgs=(event_id,))

        send_batch()
        drained: "Deferred[RestResponse]" = Deferred.fromCoroutine(admin_post(server, "/admin/drain"))
        while not done:
            send_batch()
            await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual((await drained).status, 202)
        code, _ = await closed
        self.assertEqual(code, 1001)
        self.assertTrue(acked)

        await server.kill9()  # no graceful shutdown: what was acked must already be durable
        await server.start()
        reader = Client(reactor, server.ws_url, identity)
        self.addCleanup(reader.close)
        await reader.connect()
        stored = {e["event_id"] for e in await reader.catch_up(limit=1000, timeout=TIMEOUT)}
        self.assertEqual(set(acked) - stored, set())


class AdminKeyTestsSQLite(AdminKeyTests, SQLiteMixin, TestCase):
    """Admin key on SQLite."""


class AdminRouteTestsSQLite(AdminRouteTests, SQLiteMixin, TestCase):
    """Admin routes on SQLite."""


class AdminRouteTestsPostgres(AdminRouteTests, PostgresMixin, TestCase):
    """Admin routes on PostgreSQL."""


class DrainTestsSQLite(DrainTests, SQLiteMixin, TestCase):
    """Drain on SQLite."""


class DrainTestsPostgres(DrainTests, PostgresMixin, TestCase):
    """Drain on PostgreSQL."""
