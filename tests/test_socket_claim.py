"""
The socket limits are reserved before the work (PROTOCOL.md §12,
``sockets_per_device`` / ``sockets_per_user``): ``Presence.claim`` counts
and records a socket in one step, and ``admit`` claims before the hub attach
and the storage transaction. In memory, through the real gateway: many
handshakes of one device or one user that all reach ``client_auth`` before
any registration answers get no more sockets than the limit; a slot whose
handshake fails is free again, and its release says nothing to the other
devices unless another socket of the device makes that necessary. Against
LocalPresence and a real Redis, by the same assertions: concurrent claims
past a limit, removal, a claim again, and (Redis) expiry, the node's local
entries and Redis down.
"""

from __future__ import annotations

import os
import struct
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import provider

from pocketbridge.client.handshake import V1Handshake
from pocketbridge.client.keys import Identity
from pocketbridge.server.cluster.presence import (
    REFRESH_CHUNK, SOCKETS_PER_DEVICE, SOCKETS_PER_USER, Claim, LocalPresence, Presence, RedisPresence,
)
from pocketbridge.server.context import CursorBook, Node
from pocketbridge.server.fanout.redisconn import RedisConnection
from pocketbridge.server.gateway.adapter import GatewayProtocol
from pocketbridge.server.gateway.connection import State
from pocketbridge.server.storage import StorageUnavailable
from tests.conn_fakes import (
    DEVICE, FakeTCP, HandshakeStorage, connect, device_state, make_node, send_auth, server_frames,
)
from tests.services import redis_url, require_redis

DEVICE_LIMIT = "Too many sockets for this device; retry after 30 s"
USER_LIMIT = "Too many sockets for this user; retry after 30 s"


def close_of(tcp: FakeTCP) -> Optional[Tuple[int, str]]:
    """(code, reason) of the server's close frame, if it sent one."""
    for op, payload in server_frames(tcp.written()):
        if op == 8:
            return int(struct.unpack("!H", payload[:2])[0]), payload[2:].decode()
    return None


class FailingPresence(LocalPresence):
    """A presence store that is down: every claim fails."""

    def claim(self, user_id: str, device_id: str, socket_id: str, auth_ms: int,
              max_device: int, max_user: int) -> "Deferred[Claim]":
        return fail(ConnectionError("presence store down"))


class ConcurrentHandshakeTests(SynchronousTestCase):
    """Handshakes through the real gateway, their registrations answered when the test says."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.identity = Identity.generate()
        self.user = self.identity.user_id
        self.notices: List[Tuple[str, bool]] = []  # (device, is_online) of device_status_changed

    def make(self, **settings: Any) -> Node:
        node = make_node(self.clock, **settings)
        self.storage = HandshakeStorage()
        node.storage = self.storage  # type: ignore[assignment]
        node.cursors.storage = self.storage  # type: ignore[assignment]
        node.announce_presence = lambda u, d, name, t, online, now: self.notices.append((d, online))  # type: ignore[method-assign]
        return node

    def start(self, node: Node, device_id: str = DEVICE) -> Tuple[GatewayProtocol, FakeTCP]:
        """A connection of ``device_id`` that sent a valid client_auth."""
        proto, tcp = connect(node, self.clock)
        send_auth(proto, tcp, V1Handshake(self.identity, device_id))
        return proto, tcp

    def answer_all(self, revoked: bool = False) -> None:
        """Answer every pending registration and device read (one device row per device)."""
        at = 1 if revoked else None
        for reg in list(self.storage.registrations):
            if not reg.called:
                reg.callback((device_state(self.user, DEVICE, at), False, 0, 0))
        for read in list(self.storage.device_reads):
            if not read.called:
                read.callback(device_state(self.user, DEVICE, at))

    def outcomes(self, conns: List[Tuple[GatewayProtocol, FakeTCP]]) -> List[Any]:
        return ["live" if p.machine.state is State.LIVE else close_of(t) for p, t in conns]

    # ------------------------------------------------------------ the limits hold under concurrency

    def test_concurrent_handshakes_of_one_device_get_one_socket(self) -> None:
        """sockets_per_device=1: of 2 (and of 10) handshakes that all reach client_auth before any registration answers, one goes live, the others are closed 4029."""
        for n in (2, 10):
            node = self.make(sockets_per_device=1)
            conns = [self.start(node) for _ in range(n)]
            self.assertTrue(all(p.machine.state is State.ADMITTING for p, _ in conns))
            self.answer_all()
            self.assertEqual(self.outcomes(conns), ["live"] + [(4029, DEVICE_LIMIT)] * (n - 1))
            self.assertEqual(len(self.storage.registrations), 1, "only the admitted one registered")
            self.assertEqual(node.presence.node_summary(), (1, 1))

    def test_concurrent_handshakes_of_one_user_get_the_user_limit(self) -> None:
        """sockets_per_user=3: 10 devices of one user handshaking at once get 3 sockets; the other 7 are closed 4029 (user)."""
        node = self.make(sockets_per_user=3)
        conns = [self.start(node, str(uuid.UUID(int=i + 1, version=4))) for i in range(10)]
        self.answer_all()
        self.assertEqual(self.outcomes(conns), ["live"] * 3 + [(4029, USER_LIMIT)] * 7)
        self.assertEqual(node.presence.node_summary(), (3, 3))

    def test_concurrent_handshakes_of_a_revoked_device_all_hear_4003(self) -> None:
        """A revoked device at its limit: the admitted handshake and the refused ones are all told 4003, none 4029."""
        node = self.make(sockets_per_device=1)
        conns = [self.start(node) for _ in range(3)]
        self.answer_all(revoked=True)
        self.assertEqual([c[0] for c in self.outcomes(conns)], [4003] * 3)
        self.assertEqual(node.presence.node_summary(), (0, 0))

    # ------------------------------------------------------------ a failed handshake gives its slot back

    def test_a_failed_handshake_frees_its_slot_and_leaves_no_trace(self) -> None:
        """sockets_per_device=1: after a handshake fails (revoked at registration or on the bus while subscribed, storage error, client gone or timed out while ADMITTING) the next one goes live; no notice, no last_seen write."""
        def revoked(proto: GatewayProtocol) -> None:
            self.storage.registrations[0].callback((device_state(self.user, DEVICE, 1), False, 0, 0))

        def storage_error(proto: GatewayProtocol) -> None:
            self.storage.registrations[0].errback(StorageUnavailable("down"))

        def gone(proto: GatewayProtocol) -> None:
            proto.onClose(False, 1006, "gone")
            self.storage.registrations[0].callback((device_state(self.user), False, 0, 0))

        def revoked_on_the_bus(proto: GatewayProtocol) -> None:
            proto.node.hub.on_control({"kind": "revoke", "user_id": self.user, "device_id": DEVICE,
                                       "reason": "revoked", "timestamp": 1})
            self.storage.registrations[0].callback((device_state(self.user), False, 0, 0))

        def timed_out(proto: GatewayProtocol) -> None:
            self.clock.advance(30.1)
            self.storage.registrations[0].callback((device_state(self.user), False, 0, 0))

        cases: List[Tuple[Callable[[GatewayProtocol], None], Optional[int]]] = [
            (revoked, 4003), (revoked_on_the_bus, 4003), (storage_error, 1013), (gone, None), (timed_out, 1008)]
        for end, code in cases:
            self.notices.clear()
            node = self.make(sockets_per_device=1)
            first, tcp = self.start(node)
            end(first)
            self.assertEqual(close_of(tcp)[0] if code else None, code, end.__name__)  # type: ignore[index]
            self.assertNotEqual(first.machine.state, State.LIVE)
            self.assertEqual(node.presence.node_summary(), (0, 0), end.__name__)
            second, tcp2 = self.start(node)
            self.answer_all()
            self.assertIs(second.machine.state, State.LIVE, end.__name__)
            self.assertEqual(self.notices, [(DEVICE, True)], end.__name__)  # only the live one's
            self.clock.advance(CursorBook.close_delay)
            self.assertEqual(self.storage.last_seen, [], end.__name__)

    def test_release_hands_online_over_to_the_socket_that_stays(self) -> None:
        """A first handshake (its claim came online) fails after a second one of the device went live (its claim found the device online): the others are told the device is online then, once."""
        node = self.make(sockets_per_device=2)
        first, _ = self.start(node)
        second, _ = self.start(node)
        self.storage.registrations[1].callback((device_state(self.user), False, 0, 0))
        self.assertIs(second.machine.state, State.LIVE)
        self.assertEqual(self.notices, [])
        self.storage.registrations[0].errback(StorageUnavailable("down"))
        self.assertEqual(self.notices, [(DEVICE, True)])
        self.assertEqual(node.presence.node_summary(), (1, 1))

    def test_release_of_the_last_slot_tells_offline_when_the_live_socket_left(self) -> None:
        """The device's live socket closes while a second handshake holds a slot (no offline notice then); the second fails: last_seen is written, then the others are told offline."""
        node = self.make(sockets_per_device=2)
        live, _ = self.start(node)
        self.answer_all()
        self.assertEqual(self.notices, [(DEVICE, True)])
        pending, _ = self.start(node)
        live.onClose(True, 1000, "")
        self.clock.advance(CursorBook.close_delay)
        self.assertEqual((self.notices, self.storage.last_seen), ([(DEVICE, True)], []))
        self.storage.registrations[1].errback(StorageUnavailable("down"))
        self.assertEqual(self.notices, [(DEVICE, True)])  # the notice follows the write
        self.clock.advance(CursorBook.close_delay)
        self.assertEqual([list(s) for s in self.storage.last_seen], [[(self.user, DEVICE)]])
        self.assertEqual(self.notices, [(DEVICE, True), (DEVICE, False)])

    def test_presence_down_admits_without_limits(self) -> None:
        """When the claim fails (presence store down) the handshake is admitted without limits and with no online notice; a warning says so."""
        warnings: List[str] = []

        @provider(ILogObserver)
        def observe(event: Dict[str, Any]) -> None:
            if "socket limits not checked" in event.get("log_format", ""):
                warnings.append(event["log_format"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        node = self.make(sockets_per_device=1)
        node.presence = FailingPresence()
        conns = [self.start(node) for _ in range(2)]
        self.answer_all()
        self.assertEqual(self.outcomes(conns), ["live", "live"])
        self.assertEqual(self.notices, [])
        self.assertEqual(len(warnings), 2)


class PresenceContract:
    """The same claims and answers on LocalPresence and on RedisPresence (a real Redis)."""

    USER = "ab" * 32
    DEV_A = "0b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b"
    DEV_B = "1b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b"
    DEV_C = "2b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b"

    assertEqual: Callable[..., None]
    assertTrue: Callable[..., None]

    async def make(self) -> Presence:
        raise NotImplementedError

    async def claims(self, presence: Presence, calls: List[Tuple[str, str]], max_device: int,
                     max_user: int) -> List[Claim]:
        """Every (device, socket) claim issued at once, before any is answered."""
        ds = [presence.claim(self.USER, dev, sock, 1000, max_device, max_user) for dev, sock in calls]
        return list(await gatherResults(ds))

    async def test_concurrent_claims_past_the_device_limit(self) -> None:
        """Six claims of one device at once, max_device=2: exactly two held (the first came online), four refused by the device limit."""
        presence = await self.make()
        got = await self.claims(presence, [(self.DEV_A, "s%d" % i) for i in range(6)], 2, 50)
        self.assertEqual(got, [Claim(None, True), Claim(None, False)] + [Claim(SOCKETS_PER_DEVICE)] * 4)
        self.assertEqual(presence.node_summary(), (2, 1))
        self.assertEqual(sorted((await presence.user_sockets(self.USER))[self.DEV_A]), ["n1|s0", "n1|s1"]
                         if isinstance(presence, RedisPresence) else ["s0", "s1"])

    async def test_concurrent_claims_past_the_user_limit(self) -> None:
        """Three devices claiming two sockets each at once, max_user=4: four held, the last two refused by the user limit; the device limit is named first when both are reached."""
        presence = await self.make()
        calls = [(d, d[:2] + str(i)) for d in (self.DEV_A, self.DEV_B, self.DEV_C) for i in range(2)]
        got = await self.claims(presence, calls, 5, 4)
        self.assertEqual([c.refused for c in got], [None] * 4 + [SOCKETS_PER_USER] * 2)
        self.assertEqual([c.online for c in got], [True, False, True, False, False, False])
        self.assertEqual(await self.claims(presence, [(self.DEV_A, "x")], 2, 4), [Claim(SOCKETS_PER_DEVICE)])
        self.assertEqual(presence.node_summary(), (4, 2))

    async def test_remove_frees_a_slot_and_says_when_the_device_went_offline(self) -> None:
        """max_device=2: a third claim is refused until one socket is removed; only removing the last one says offline, and a claim after that comes online."""
        presence = await self.make()
        answers: List[Any] = []
        for step in ("s1", "s2", "s3", "-s1", "s3", "-s2", "-s3", "-s3", "s4"):
            if step.startswith("-"):
                answers.append(await presence.remove(self.USER, self.DEV_A, step[1:]))
            else:
                answers.append((await self.claims(presence, [(self.DEV_A, step)], 2, 50))[0])
        self.assertEqual(answers, [Claim(None, True), Claim(None, False), Claim(SOCKETS_PER_DEVICE), False,
                                   Claim(None, False), False, True, False, Claim(None, True)])
        self.assertEqual(presence.node_summary(), (1, 1))

    async def test_a_claim_again_counts_once(self) -> None:
        """A socket claimed twice holds one slot (max_device=1 still admits it; the user count is unchanged)."""
        presence = await self.make()
        got = await self.claims(presence, [(self.DEV_A, "s1"), (self.DEV_A, "s1"), (self.DEV_B, "s2")], 1, 2)
        self.assertEqual(got, [Claim(None, True), Claim(None, True), Claim(None, True)])
        self.assertEqual(presence.node_summary(), (2, 2))
        self.assertEqual(await self.claims(presence, [(self.DEV_C, "s3")], 1, 2), [Claim(SOCKETS_PER_USER)])


class LocalPresenceContractTests(PresenceContract, TestCase):
    """The contract on the in-process presence."""

    async def make(self) -> Presence:
        return LocalPresence()


class _NoScan(dict):  # type: ignore[type-arg]
    """A dict that fails any walk over all its entries (lookups by key still work)."""

    def _scan(self, *args: Any) -> Any:
        raise AssertionError("walked over every user's presence")

    items = values = keys = __iter__ = _scan


class LocalPresenceCostTests(SynchronousTestCase):
    """LocalPresence answers from the user's own entries and counters: nothing walks over other users."""

    def test_no_operation_walks_every_user(self) -> None:
        """With 1,000 other users online, claim, user_sockets, node_summary and remove never iterate over all users."""
        presence = LocalPresence()
        for i in range(1000):
            presence.claim("%064x" % i, PresenceContract.DEV_A, "s%d" % i, 1, 5, 50)
        presence.users = _NoScan(presence.users)
        user = PresenceContract.USER
        self.assertEqual(self.successResultOf(presence.claim(user, PresenceContract.DEV_A, "mine", 7, 5, 50)),
                         Claim(None, True))
        self.assertEqual(self.successResultOf(presence.user_sockets(user)), {PresenceContract.DEV_A: {"mine": 7}})
        self.assertEqual(presence.node_summary(), (1001, 1001))
        self.assertTrue(self.successResultOf(presence.remove(user, PresenceContract.DEV_A, "mine")))
        self.assertEqual(presence.node_summary(), (1000, 1000))
        self.assertEqual(self.successResultOf(presence.user_sockets(user)), {})


class RedisPresenceContractTests(PresenceContract, TestCase):
    """The contract on RedisPresence against the test Redis (127.0.0.1:6379), with a key prefix of its own."""

    def setUp(self) -> None:
        require_redis(self)
        self.now = 1_700_000_000_000
        self.prefix = "pbtest:{}:".format(os.urandom(6).hex())
        self.redis = RedisConnection(reactor, redis_url())
        self.addCleanup(self.cleanup)

    async def cleanup(self) -> None:
        if self.redis.healthy():
            conn = self.redis.command()
            await conn.delete(self.prefix + "presence:users")
            await conn.delete(self.prefix + "presence:" + self.USER)
        if self.redis.running:
            await self.redis.stopService()

    async def make(self, node_id: str = "n1") -> RedisPresence:
        if not self.redis.running:
            up: "Deferred[Any]" = Deferred()
            self.redis.on_ready(lambda p: None if up.called else up.callback(p))
            self.redis.startService()
            up.addTimeout(5, reactor)
            await up
        return RedisPresence(self.redis, node_id, lambda: self.now, self.prefix)

    async def test_claims_of_two_nodes_share_the_limits(self) -> None:
        """Two nodes' claims count together; each node's ``local`` holds only its own held sockets."""
        one, two = await self.make("n1"), await self.make("n2")
        a = one.claim(self.USER, self.DEV_A, "s1", 5, 1, 50)
        b = two.claim(self.USER, self.DEV_A, "s2", 6, 1, 50)
        c = two.claim(self.USER, self.DEV_B, "s3", 7, 1, 50)
        self.assertEqual(list(await gatherResults([a, b, c])),
                         [Claim(None, True), Claim(SOCKETS_PER_DEVICE), Claim(None, True)])
        self.assertEqual(one.local, {(self.USER, self.DEV_A, "s1"): 5})
        self.assertEqual(two.local, {(self.USER, self.DEV_B, "s3"): 7})
        self.assertEqual(await one.user_sockets(self.USER), {self.DEV_A: {"n1|s1": 5}, self.DEV_B: {"n2|s3": 7}})
        self.assertTrue(await two.remove(self.USER, self.DEV_B, "s3"))
        self.assertEqual(two.local, {})

    async def test_expired_entries_do_not_count(self) -> None:
        """A socket whose entry expired (its node stopped refreshing) holds no slot: the device comes online again; the sweep still reports nothing for a device with a live socket."""
        presence = await self.make()
        self.assertEqual((await self.claims(presence, [(self.DEV_A, "s1")], 1, 1))[0], Claim(None, True))
        self.now += presence.ttl_ms - 1
        self.assertEqual((await self.claims(presence, [(self.DEV_A, "s2")], 1, 1))[0], Claim(SOCKETS_PER_DEVICE))
        self.now += 2
        self.assertEqual((await self.claims(presence, [(self.DEV_A, "s2")], 1, 1))[0], Claim(None, True))
        self.assertEqual(await presence.sweep(self.now), [])
        self.assertEqual(await presence.user_sockets(self.USER), {self.DEV_A: {"n1|s2": 1000}})

    async def test_refresh_renews_every_entry_in_few_round_trips(self) -> None:
        """600 sockets of this node: a refresh keeps all of them live past their first lifetime, in ceil(600 / REFRESH_CHUNK) commands to Redis."""
        presence = await self.make()
        devices = ["%08x-0000-4000-8000-000000000000" % d for d in range(30)]
        sockets = [(devices[i % 30], "s%d" % i) for i in range(600)]
        held = await self.claims(presence, sockets, 1000, 1000)
        self.assertEqual({c.refused for c in held}, {None})
        real = presence._conn()
        sent: List[str] = []

        class Counting:
            def __getattr__(self, name: str) -> Any:
                sent.append(name)
                return getattr(real, name)

        self.now += presence.ttl_ms - 1000
        self.patch(presence, "_conn", lambda: Counting())
        await presence.refresh()
        self.assertEqual(len(sent), -(-600 // REFRESH_CHUNK))
        self.assertEqual(set(sent), {"eval"})
        self.patch(presence, "_conn", lambda: real)
        self.now += 2000  # past the first lifetime, inside the renewed one
        live = await presence.user_sockets(self.USER)
        self.assertEqual(sum(len(s) for s in live.values()), 600)
        self.assertEqual(len(live), 30)
        members = await real.smembers(presence.users_key)
        self.assertEqual({m.decode() if isinstance(m, bytes) else m for m in members}, {self.USER})
        ttl_left = await real.execute_command("PTTL", presence._key(self.USER))
        self.assertGreater(int(ttl_left), presence.ttl_ms - 5000)

    async def test_redis_down_the_claim_fails_and_remove_forgets_it(self) -> None:
        """Without a connection the claim raises and the socket stays in ``local`` (the caller admits it; the refresh records it later) until removed."""
        presence = RedisPresence(RedisConnection(reactor, "redis://127.0.0.1:1"), "n1", lambda: self.now, self.prefix)
        failure = self.failureResultOf(presence.claim(self.USER, self.DEV_A, "s1", 5, 1, 1), ConnectionError)
        self.assertIn("unavailable", failure.getErrorMessage())
        self.assertEqual(presence.local, {(self.USER, self.DEV_A, "s1"): 5})
        self.failureResultOf(presence.remove(self.USER, self.DEV_A, "s1"), ConnectionError)
        self.assertEqual(presence.local, {})
