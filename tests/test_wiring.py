"""
The server's wiring (issue 10 item 3): ``makeService`` builds the service
tree from constructors without opening a socket, the local bus delivers in
memory, and the bus, presence and shared limits use one Redis connection —
checked with a fake command connection and, by the same assertions, with a
real Redis.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Optional, Tuple

from nacl.signing import SigningKey
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pocketbridge.server import tap
from pocketbridge.server.accept import AdmissionFactory
from pocketbridge.server.cluster.jobs import Jobs
from pocketbridge.server.cluster.limits import LocalLimits, RedisLimits
from pocketbridge.server.cluster.presence import SOCKETS_PER_DEVICE, Claim, LocalPresence, RedisPresence
from pocketbridge.server.config import Settings
from pocketbridge.server.context import Node
from pocketbridge.server.fanout.hub import DeliveryHub
from pocketbridge.server.fanout.localbus import LocalBus
from pocketbridge.server.fanout.redisbus import RedisBus
from pocketbridge.server.fanout.redisconn import Commands, RedisConnection
from pocketbridge.server.storage import Outcome
from tests.services import redis_url, require_redis
from tests.test_hub_unit import DEV_A, DEV_B, USER, FakePublisher, FakeStorage, Sink, row

class RecordingSink(Sink):
    """A session that also records notices and closes."""

    def __init__(self, device_id: str = DEV_B) -> None:
        super().__init__(device_id)
        self.notices: List[bytes] = []
        self.closed: List[Tuple[int, str, Optional[bytes]]] = []

    def send_notice(self, frame: bytes) -> None:
        self.notices.append(frame)

    def close_for(self, code: int, reason: str, notice: Optional[bytes]) -> None:
        self.closed.append((code, reason, notice))


def services(top: Any) -> List[Any]:
    return list(top)


class MakeServiceTests(SynchronousTestCase):
    """makeService on a MemoryReactorClock: the tree in dependency order, wired by constructors, no socket."""

    def make(self, *args: str) -> Tuple[MemoryReactorClock, List[Any]]:
        data = self.mktemp()
        os.makedirs(data)
        options = tap.Options()
        options.parseOptions(["--data-dir", data, "--listen", "tcp:3001:interface=127.0.0.1", *args])
        clock = MemoryReactorClock()
        return clock, services(tap.makeService(options, clock))

    def test_embedded_shape_builds_in_order_without_a_socket(self) -> None:
        """Storage, upkeep loops, gateway, web, jobs; the in-process bus, presence and limits; nothing listens yet."""
        clock, tree = self.make()
        self.assertEqual([type(s) for s in tree],
                         [tap._Storage, tap._Loops, tap._Gateway, StreamServerEndpointService, Jobs])
        node: Node = tree[1].node
        self.assertIs(node.clock, clock)
        self.assertIsInstance(node.hub.bus, LocalBus)
        self.assertIsInstance(node.presence, LocalPresence)
        self.assertIsInstance(node.limits, LocalLimits)
        self.assertIs(tree[0].storage, node.storage)
        self.assertEqual((clock.tcpServers, clock.tcpClients), ([], []))

    def test_web_service_listens_on_the_given_reactor(self) -> None:
        """Starting the web service listens on the reactor passed in, behind the accept-time admission."""
        clock, tree = self.make()
        web = tree[3]
        web.startService()
        self.addCleanup(web.stopService)
        [(port, factory, backlog, interface)] = clock.tcpServers
        self.assertEqual((port, interface), (3001, "127.0.0.1"))
        self.assertIsInstance(factory, AdmissionFactory)

    def test_writer_publishes_through_the_hubs_bus(self) -> None:
        """An event the writer stored reaches a session attached to the hub, through the wired bus, at once."""
        _, tree = self.make()
        node: Node = tree[1].node
        sink = Sink()
        node.hub.attach(sink)
        node.hub.known_head(USER, 0)
        node.writer.publish(Outcome("stored", 1, 1, row(1)))
        self.assertEqual(sink.seqs, [1])

    def test_cluster_shape_shares_one_redis_connection(self) -> None:
        """With --redis, one RedisConnection is in the tree and the bus, presence and limits all hold it."""
        clock, tree = self.make("--redis", "redis://127.0.0.1:1/2")
        self.assertEqual([type(s) for s in tree],
                         [tap._Storage, RedisConnection, tap._Loops, tap._Gateway, StreamServerEndpointService, Jobs])
        redis: RedisConnection = tree[1]
        node: Node = tree[2].node
        bus = node.hub.bus
        assert isinstance(bus, RedisBus) and isinstance(node.presence, RedisPresence)
        assert isinstance(node.limits, RedisLimits)
        self.assertIs(bus.redis, redis)
        self.assertIs(node.presence.redis, redis)
        self.assertIs(node.limits.redis, redis)
        self.assertIs(bus.hub, node.hub)
        self.assertEqual(clock.tcpClients, [])
        redis.startService()
        self.addCleanup(redis.stopService)
        # The command connection and the bus's pub/sub connection, both to the URL's server.
        self.assertEqual([(host, port) for host, port, *_ in clock.tcpClients], [("127.0.0.1", 1)] * 2)


class LocalBusTests(SynchronousTestCase):
    """The embedded shape's bus: events and control messages delivered in memory, in the same call."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.hub = DeliveryHub(FakeStorage(head=0))  # type: ignore[arg-type]
        self.node = Node(Settings(), self.hub.storage, None, self.hub, self.clock,  # type: ignore[arg-type]
                         SigningKey(b"\x01" * 32), "n1")
        self.a, self.b = RecordingSink(DEV_A), RecordingSink(DEV_B)
        for sink in (self.a, self.b):
            self.assertTrue(self.successResultOf(self.hub.attach(sink)))  # listening at once
        self.hub.known_head(USER, 0)

    def test_published_event_reaches_every_session_of_the_user(self) -> None:
        """publish_event routes the event to the user's sessions before it returns."""
        self.hub.bus.publish_event(row(1))
        self.assertEqual((self.a.seqs, self.b.seqs), ([1], [1]))

    def test_broadcast_revoke_closes_only_that_device(self) -> None:
        """A revoke broadcast by the node closes the device's sockets 4003 with a device_revoked notice."""
        self.node.broadcast({"kind": "revoke", "user_id": USER, "device_id": DEV_A, "reason": "admin",
                             "timestamp": 5})
        [(code, reason, notice)] = self.a.closed
        self.assertEqual((code, reason), (4003, "Device revoked"))
        self.assertIn(b"device_revoked", notice or b"")
        self.assertEqual(self.b.closed, [])

    def test_notify_skips_the_excluded_device(self) -> None:
        """node.notify reaches the user's other devices, not the one excluded."""
        self.node.notify(USER, "device_paired", {"type": "device_paired"}, exclude_device=DEV_A)
        self.assertEqual(len(self.b.notices), 1)
        self.assertEqual(self.a.notices, [])

    def test_delete_user_closes_all_and_forgets_the_route(self) -> None:
        """delete_user closes every socket of the user and drops its routing state."""
        self.node.broadcast({"kind": "delete_user", "user_id": USER})
        self.assertEqual([c[0] for c in self.a.closed + self.b.closed], [4003, 4003])
        self.assertEqual(self.hub.sinks(USER), [])


class SharedConnectionContract:
    """
    The same checks on a fake command connection and on a real Redis: the
    bus, presence and limits built on one RedisConnection all see it down,
    up and lost together.
    """

    redis: RedisConnection
    clock: Any
    assertEqual: Callable[..., None]
    assertIs: Callable[..., None]
    assertTrue: Callable[..., None]
    assertFalse: Callable[..., None]
    assertIsInstance: Callable[..., None]
    assertRaises: Callable[..., Any]
    failureResultOf: Callable[..., Any]

    async def connected(self) -> Commands:
        raise NotImplementedError

    async def lost(self, proto: Commands) -> None:
        raise NotImplementedError

    async def test_bus_presence_and_limits_share_the_connection(self) -> None:
        """Down: the bus holds, presence fails, limits fall back; up: held news is sent on it; lost: down again."""
        prefix = "pbtest:{}:".format(os.urandom(6).hex())
        hub = DeliveryHub(FakeStorage(head=0),  # type: ignore[arg-type]
                          lambda r: RedisBus(self.clock, self.redis, r, "n1", prefix=prefix))
        bus: RedisBus = hub.bus  # type: ignore[assignment]
        presence = RedisPresence(self.redis, "n1", lambda: int(self.clock.seconds() * 1000), prefix)
        limits = RedisLimits(self.redis, prefix, self.clock.seconds)
        ready: List[Commands] = []
        self.redis.on_ready(ready.append)

        self.assertFalse(self.redis.healthy())
        with self.assertRaises(ConnectionError):
            self.redis.command()
        bus.publish_event(row(1))
        self.assertEqual(bus.held, 1)
        try:
            await presence.claim(USER, DEV_A, "s1", 1, 5, 50)
            raise AssertionError("presence answered without a connection")
        except ConnectionError:
            pass
        self.assertEqual(await limits.take("wiring", "k", 1.0, 1.0), 0.0)  # the local fallback

        proto = await self.connected()
        self.assertEqual(ready, [proto])
        self.assertIs(self.redis.command(), proto)
        self.assertTrue(self.redis.healthy())
        self.assertEqual(bus.held, 0)  # the held news went out on the shared connection
        self.assertIsInstance(await proto.publish(prefix + "probe", b"x"), int)

        await self.lost(proto)
        self.assertFalse(self.redis.healthy())
        with self.assertRaises(ConnectionError):
            self.redis.command()


class FakeConnectionContractTests(SharedConnectionContract, TestCase):
    """The contract with the command protocol faked (FakePublisher, as in test_hub_unit)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = RedisConnection(self.clock, "redis://127.0.0.1:1")

    async def connected(self) -> Commands:
        pub = FakePublisher()
        self.redis._made(pub)  # type: ignore[arg-type]
        return pub  # type: ignore[return-value]

    async def lost(self, proto: Commands) -> None:
        self.redis._lost(proto)


class RealConnectionContractTests(SharedConnectionContract, TestCase):
    """The contract against the test Redis (127.0.0.1:6379), with a key prefix of its own."""

    def setUp(self) -> None:
        require_redis(self)
        self.clock = reactor
        self.redis = RedisConnection(reactor, redis_url())
        self.addCleanup(lambda: self.redis.stopService() if self.redis.running else None)

    async def until(self, condition: Callable[[], bool]) -> None:
        for _ in range(500):
            if condition():
                return
            await task.deferLater(reactor, 0.01, lambda: None)
        raise AssertionError("condition not met within 5 s")

    async def connected(self) -> Commands:
        up: "Deferred[Commands]" = Deferred()
        self.redis.on_ready(lambda p: None if up.called else up.callback(p))
        self.redis.startService()
        up.addTimeout(5, reactor)
        return await up

    async def lost(self, proto: Commands) -> None:
        # A CLIENT KILL from Redis' side would do as well; the command connection
        # stays down until the service's retry (0.2 s or later).
        proto.transport.loseConnection()  # type: ignore[attr-defined]
        await self.until(lambda: not self.redis.healthy())

    async def test_presence_and_limits_reach_redis_on_the_shared_connection(self) -> None:
        """Once up, presence and a token bucket live in Redis (not in a local fallback)."""
        prefix = "pbtest:{}:".format(os.urandom(6).hex())
        presence = RedisPresence(self.redis, "n1", lambda: int(reactor.seconds() * 1000), prefix)
        limits = RedisLimits(self.redis, prefix, reactor.seconds)
        await self.connected()
        self.assertEqual(await presence.claim(USER, DEV_A, "s1", 1, 1, 50), Claim(None, online=True))
        self.assertEqual(await presence.claim(USER, DEV_A, "s2", 1, 1, 50), Claim(SOCKETS_PER_DEVICE))
        self.assertEqual(await presence.user_sockets(USER), {DEV_A: {"n1|s1": 1}})
        self.assertTrue(await presence.remove(USER, DEV_A, "s1"))
        self.assertEqual(await limits.take("wiring", "k", 1.0, 1.0), 0.0)
        self.assertGreater(await limits.take("wiring", "k", 1.0, 1.0), 0.0)
        self.assertEqual(limits.fallback.buckets, {}, "the bucket was kept in Redis, not locally")
