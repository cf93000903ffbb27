"""
Cluster integration tests: two real ``twistd pocketbridge`` nodes sharing one
PostgreSQL database and one Redis (ARCHITECTURE.md "Cluster concerns",
PROTOCOL.md §7, §10, §12), driven with the project's client SDK.

Every test gives its nodes their own ``--redis-prefix`` (the harness does
not), so parallel runs and leftovers never share channels or keys, and
deletes its keys afterwards. A Redis hiccup is simulated on the shared Redis
by killing one node's connections (``CLIENT KILL``, ``tests.redisctl``); a
real outage uses a private ``redis-server`` that the test kills with SIGKILL
and starts again on the same port. The machine's Redis is never restarted.

"Nothing more arrives" is checked with a barrier: an app-level ``ping`` whose
``pong`` comes after everything the node sent that socket before it.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import time
import unittest
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import LoopingCall, deferLater
from twisted.trial.unittest import TestCase

from pocketbridge.client import Client, ConnectionClosed, Identity
from pocketbridge.client.rest import RestClient
from tests.harness import (
    ServerProcess,
    ServiceUnavailable,
    create_database,
    free_port,
    in_ci,
    redis_url,
    require_postgres,
    require_redis,
    start_server,
    wait_until,
)
from tests.redisctl import (
    PrivateRedis,
    RedisAdmin,
    is_pubsub,
    kill_node_connections,
    node_clients,
    redis_server_available,
)

TIMEOUT = 10.0  # seconds any single expected outcome may take
STREAM = "clipboard:main"
TYPE = "clipboard:text"
# REST polling in these tests is a test artifact, not what the REST limit is about.
BASE_ARGS = ["--rest-requests-per-minute", "100000"]


def b64(n: int = 24) -> str:
    """Standard padded base64 of ``n`` random bytes: a valid ``encrypted_payload``."""
    return base64.b64encode(os.urandom(n)).decode("ascii")


def sleep(seconds: float) -> "Deferred[None]":
    """A Deferred that fires after ``seconds`` of real time."""
    return deferLater(reactor, seconds, lambda: None)


def seqs(events: Iterable[Dict[str, Any]]) -> List[int]:
    """The ``seq`` of each event, in order."""
    return [e["seq"] for e in events]


def notices(client: Client, msg_type: str) -> List[Dict[str, Any]]:
    """The payloads of the ``msg_type`` messages the client received so far."""
    return [m["payload"] for m in client.messages if isinstance(m, dict) and m.get("type") == msg_type]


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 when there are none)."""
    total = 0.0
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        got = dict(_LABEL.findall(label_text))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


class Flow:
    """
    Device A sends one event every ``interval`` seconds until ``stop``; the
    send and ack time (``time.monotonic``) of each event are kept.
    """

    def __init__(self, client: Client, interval: float = 0.02) -> None:
        self.client = client
        self.interval = interval
        self.sent_at: List[float] = []
        self.acked_at: Dict[int, float] = {}
        self.pending: List["Deferred[Dict[str, Any]]"] = []
        self.loop = LoopingCall(self._send)
        self.loop.clock = reactor

    def start(self) -> None:
        self.loop.start(self.interval)

    def _send(self) -> None:
        i = len(self.pending)
        self.sent_at.append(time.monotonic())
        d = self.client.send_event_nowait(STREAM, TYPE, b64(), timeout=3 * TIMEOUT)

        def acked(ack: Dict[str, Any]) -> Dict[str, Any]:
            self.acked_at[i] = time.monotonic()
            return ack

        self.pending.append(d.addCallback(acked))

    async def stop(self) -> List[Dict[str, Any]]:
        """Stop sending; the ack of every event sent, in send order."""
        if self.loop.running:
            self.loop.stop()
        acks: List[Dict[str, Any]] = await gatherResults(self.pending, consumeErrors=True)
        return acks


class ClusterTests(TestCase):
    """Two nodes on one PostgreSQL and one Redis."""

    maxDiff = None

    def setUp(self) -> None:
        require_postgres(self)
        require_redis(self)

    # ------------------------------------------------------------ nodes

    async def start_cluster(
        self, n: int = 2, args: Sequence[str] = (), private: Optional[PrivateRedis] = None,
        database_url: Optional[str] = None, parallel: bool = False,
    ) -> List[ServerProcess]:
        """
        ``n`` healthy nodes on one fresh database (or ``database_url``) and one
        Redis prefix, on the shared Redis or on ``private``. The first node
        starts alone (it applies the migrations) unless ``parallel``.
        """
        if database_url is None:
            database_url = create_database(self).url
        prefix = "pbtest:{}:".format(secrets.token_hex(6))
        node_args = BASE_ARGS + ["--redis-prefix", prefix] + list(args)
        if private is None:
            admin = RedisAdmin(redis_url())
            # Registered before the nodes' cleanups, so it runs after they stopped.
            self.addCleanup(admin.delete_prefix, prefix)
        else:
            node_args += ["--redis", private.url]

        def start() -> "Deferred[ServerProcess]":
            return Deferred.fromCoroutine(start_server(
                self, backend="postgresql", database_url=database_url, redis=private is None, args=node_args))

        if parallel:
            nodes: List[ServerProcess] = await gatherResults([start() for _ in range(n)], consumeErrors=True)
            return nodes
        nodes = [await start()]
        if n > 1:
            nodes += await gatherResults([start() for _ in range(n - 1)], consumeErrors=True)
        return nodes

    async def private_redis(self) -> PrivateRedis:
        """A redis-server of this test alone on a free port (skipped, or under CI failed, without the binary)."""
        if not redis_server_available():
            reason = "redis-server is not installed; the Redis restart test needs one"
            if in_ci():
                raise ServiceUnavailable(reason + " -- CI=true, so this is an error, not a skip")
            raise unittest.SkipTest(reason)
        private = PrivateRedis(free_port())
        self.addCleanup(private.cleanup)
        await private.start()
        return private

    async def metric(self, server: ServerProcess, name: str, **labels: str) -> float:
        """A metric of ``server``'s /metrics (summed over the other labels)."""
        status, body = await server.http_get("/metrics")
        self.assertEqual(status, 200, body[:200])
        return metric_sum(body.decode("utf-8"), name, **labels)

    # ------------------------------------------------------------ devices

    async def online(self, server: ServerProcess, identity: Identity, device_id: Optional[str] = None,
                     **kwargs: Any) -> Client:
        """A connected device of ``identity`` on ``server``, closed after the test."""
        client = Client(reactor, server.ws_url, identity, device_id=device_id or str(uuid.uuid4()), **kwargs)
        self.addCleanup(client.close)
        await client.connect()
        return client

    def rest(self, server: ServerProcess, client: Client) -> RestClient:
        """A REST client of ``server`` signing as ``client``'s device."""
        return RestClient(reactor, server.http_url, client.identity, client.device_id)

    async def until(self, check: Callable[[], Any], what: str, timeout: float = TIMEOUT,
                    interval: float = 0.05) -> Any:
        """Poll ``check`` (sync or async) until it returns something true; fail after ``timeout`` s."""
        return await wait_until(self, check, what, timeout, interval)

    async def barrier(self, client: Client) -> None:
        """Wait until everything the node sent ``client`` before now has arrived (ping → pong)."""
        since = len(client.messages)
        client.send_raw({"type": "ping", "payload": {}})
        await client.wait_for("pong", timeout=TIMEOUT, since=since)

    async def send_many(self, client: Client, n: int, streams: Sequence[str] = (STREAM,)) -> List[Dict[str, Any]]:
        """Send ``n`` events at once (round-robin over ``streams``); their acks in send order."""
        ds = [client.send_event_nowait(streams[i % len(streams)], TYPE, b64(), timeout=TIMEOUT) for i in range(n)]
        acks: List[Dict[str, Any]] = await gatherResults(ds, consumeErrors=True)
        return acks

    async def wait_status(self, watcher: Client, device_id: str, online: bool,
                          timeout: float = TIMEOUT) -> Dict[str, Any]:
        """The ``device_status_changed`` of ``device_id`` with ``is_online`` = ``online`` that ``watcher`` gets."""
        deadline = time.monotonic() + timeout
        while True:
            for p in notices(watcher, "device_status_changed"):
                if p.get("device_id") == device_id and p.get("is_online") is online:
                    return p
            left = deadline - time.monotonic()
            if left <= 0:
                self.fail("no device_status_changed is_online={} for {} within {:.1f} s".format(
                    online, device_id, timeout))
            try:
                await watcher.wait_for("device_status_changed", timeout=left, since=None)
            except Exception:
                pass

    async def device_view(self, server: ServerProcess, signer: Client, device_id: str) -> Dict[str, Any]:
        """The entry of ``device_id`` in ``GET /api/devices`` through ``server``, signed by ``signer``."""
        resp = await self.rest(server, signer).get("/api/devices")
        self.assertEqual(resp.status, 200, resp)
        views = {d["device_id"]: d for d in resp.json["devices"]}
        self.assertIn(device_id, views, resp)
        view: Dict[str, Any] = views[device_id]
        return view

    async def socket_count(self, server: ServerProcess, signer: Client, device_id: str) -> Tuple[bool, int]:
        """(connected, sockets) of ``device_id`` from ``GET /api/connection-status`` through ``server``."""
        resp = await self.rest(server, signer).get("/api/connection-status?deviceId=" + device_id)
        self.assertEqual(resp.status, 200, resp)
        [entry] = resp.json["devices"]
        self.assertEqual(entry["device_id"], device_id)
        return entry["connected"], entry["sockets"]

    async def receive_all(self, client: Client, wanted: Sequence[int], timeout: float = 3 * TIMEOUT) -> List[List[int]]:
        """
        Wait until ``client`` has received every seq in ``wanted``. If its
        socket closes meanwhile it connects again (same node) and catches up.
        Fires with the seqs received on each socket, in arrival order.
        """
        done: List[List[int]] = []
        start = 0
        deadline = time.monotonic() + timeout
        while True:
            current = seqs(client.events_received[start:])
            have: Set[int] = set(current).union(*done)
            if set(wanted) <= have and client.close_info is None:
                await self.barrier(client)
                done.append(seqs(client.events_received[start:]))
                return done
            if client.close_info is not None:
                done.append(current)
                start = len(client.events_received)
                await client.connect()
                await client.catch_up(timeout=TIMEOUT)
                continue
            if time.monotonic() > deadline:
                self.fail("device got {} of {} events within {:.0f} s; missing seqs {}".format(
                    len(set(wanted) & have), len(wanted), timeout, sorted(set(wanted) - have)[:20]))
            await sleep(0.05)

    def assertEachOnceInOrder(self, per_socket: List[List[int]], wanted: Sequence[int]) -> None:
        """Each socket got strictly increasing seqs (no event twice) and together they got exactly ``wanted``."""
        for i, got in enumerate(per_socket):
            self.assertEqual(got, sorted(set(got)), "socket {} got events twice or out of seq order".format(i))
        self.assertEqual(sorted(set().union(*per_socket)), sorted(wanted))
        if len(per_socket) == 1:
            self.assertEqual(per_socket[0], list(wanted))

    # ------------------------------------------------------------ 1. relay and catch-up

    async def test_relay_across_nodes_once_in_order_and_catch_up_through_the_other_node(self) -> None:
        """Events sent through node 1 reach a device on node 2 once each in seq order with one-node acks, and after an absence the device catches up through node 1 on exactly what it missed."""
        one, two = await self.start_cluster()
        user = Identity.generate()
        b = await self.online(two, user)
        a = await self.online(one, user)
        streams = ("clipboard:main", "files:main:" + str(uuid.uuid4()))

        sent = []
        ds = []
        for i in range(40):
            stream, payload = streams[i % 2], b64()
            sent.append((stream, payload, a.next_device_seq))
            ds.append(a.send_event_nowait(stream, TYPE, payload, timeout=TIMEOUT))
        acks = await gatherResults(ds, consumeErrors=True)
        # Acks as on one node: arrival order, per-user seq without gaps, per-stream stream_seq.
        self.assertEqual([k["device_seq"] for k in acks], [d for _, _, d in sent])
        self.assertEqual([k["seq"] for k in acks], list(range(1, 41)))
        self.assertEqual([k["stream_seq"] for k in acks], [i // 2 + 1 for i in range(40)])
        self.assertFalse([k for k in acks if k.get("dropped")])

        # A re-sent event is a duplicate: acked with its stored seq and not relayed again.
        dup = await a.send_event(streams[0], TYPE, sent[2][1], event_id=acks[2]["event_id"],
                                 device_seq=acks[2]["device_seq"], timeout=TIMEOUT)
        self.assertEqual((dup["seq"], dup["stream_seq"]), (acks[2]["seq"], acks[2]["stream_seq"]))
        last = await a.send_event(streams[0], TYPE, b64(), timeout=TIMEOUT)
        self.assertEqual(last["seq"], 41)

        await self.until(lambda: b.last_seq >= 41, "node 2 to relay seq 41 to B")
        await self.barrier(b)
        self.assertEqual(seqs(b.events_received), list(range(1, 42)))
        for ack, event, (stream, payload, dseq) in zip(acks, b.events_received, sent):
            self.assertEqual(
                (event["event_id"], event["user_id"], event["device_id"], event["device_seq"], event["stream_id"],
                 event["stream_seq"], event["type"], event["encrypted_payload"]),
                (ack["event_id"], user.user_id, a.device_id, dseq, stream, ack["stream_seq"], TYPE, payload))
        await self.barrier(a)
        self.assertEqual(a.events_received, [], "the sender received its own events")

        # B goes away (node 1 hears of it through the bus), A sends 30 more.
        await b.close()
        await self.wait_status(a, b.device_id, online=False)
        more = await self.send_many(a, 30)
        self.assertEqual([k["seq"] for k in more], list(range(42, 72)))

        # B comes back through node 1.
        back = await self.online(one, user, device_id=b.device_id)
        replayed = await back.catch_up(timeout=TIMEOUT)
        await self.barrier(back)
        self.assertEqual(seqs(replayed), list(range(42, 72)))
        self.assertEqual(seqs(back.events_received), list(range(42, 72)))
        self.assertEqual([e["event_id"] for e in replayed], [k["event_id"] for k in more])

    # ------------------------------------------------------------ 2. Redis outages

    async def test_redis_restart_while_events_flow(self) -> None:
        """While Redis is killed and restarted, the sender on node 1 keeps getting acks, the device on node 2 gets every event once in seq order, and node 2 counts the bus reconnect."""
        private = await self.private_redis()
        one, two = await self.start_cluster(private=private)
        user = Identity.generate()
        b = await self.online(two, user)
        a = await self.online(one, user)
        flow = Flow(a)
        flow.start()
        await sleep(0.5)

        private.kill9()
        killed_at = time.monotonic()
        await sleep(2.0)
        restarted_at = time.monotonic()
        await private.start()
        # Acks kept coming during the outage: storage is the truth.
        during = [i for i, t in enumerate(flow.sent_at) if killed_at + 0.1 <= t <= restarted_at - 0.5]
        self.assertGreater(len(during), 10)
        late = [i for i in during if flow.acked_at.get(i, float("inf")) >= restarted_at]
        self.assertEqual(late, [], "events sent while Redis was down were not acked until it came back")

        async def reconnected() -> bool:
            return await self.metric(two, "pocketbridge_bus_reconnects_total", connection="subscriber") > 0

        await self.until(reconnected, "node 2 to reconnect its bus subscriber", timeout=15)
        await sleep(0.5)
        acks = await flow.stop()
        wanted = [k["seq"] for k in acks]
        self.assertEqual(wanted, list(range(1, len(acks) + 1)))
        per_socket = await self.receive_all(b, wanted)
        self.assertEachOnceInOrder(per_socket, wanted)
        self.assertGreater(await self.metric(two, "pocketbridge_bus_reconnects_total"), 0)

    async def test_killed_redis_connections_lose_no_event(self) -> None:
        """When CLIENT KILL cuts node 2's pub/sub connection just before a burst, and later every Redis connection of both nodes while events flow, the device on node 2 gets every event once in seq order and node 2 counts both reconnects."""
        one, two = await self.start_cluster()
        admin = RedisAdmin(redis_url())
        user = Identity.generate()
        b = await self.online(two, user)
        a = await self.online(one, user)
        assert two.pid is not None and one.pid is not None
        self.assertEqual(len([c for c in node_clients(admin, two.pid) if is_pubsub(c)]), 1,
                         "node 2 should hold exactly one pub/sub connection")

        async def reconnects(n: int) -> bool:
            return await self.metric(two, "pocketbridge_bus_reconnects_total", connection="subscriber") >= n

        # A burst published while node 2 does not listen, then silence: no later
        # notification reveals the gap, so only the catch-up after the reconnect delivers it.
        first = await self.send_many(a, 5)
        self.assertEqual(kill_node_connections(admin, two.pid, pubsub=True), 1)
        burst = await self.send_many(a, 10)
        await self.until(lambda: reconnects(1), "node 2 to reconnect its subscriber")
        wanted = [k["seq"] for k in first + burst]
        self.assertEqual(wanted, list(range(1, 16)))
        await self.until(lambda: b.last_seq >= 15, "node 2 to catch B up after the reconnect")

        # Every connection of both nodes, while events flow.
        flow = Flow(a)
        flow.start()
        await sleep(0.5)
        killed = kill_node_connections(admin, one.pid) + kill_node_connections(admin, two.pid)
        self.assertGreaterEqual(killed, 4, "each node should hold a subscriber and a publisher connection")
        await self.until(lambda: reconnects(2), "node 2 to reconnect its subscriber again")
        await sleep(0.5)
        acks = await flow.stop()
        wanted += [k["seq"] for k in acks]
        self.assertEqual(wanted, list(range(1, len(wanted) + 1)))
        per_socket = await self.receive_all(b, wanted)
        self.assertEachOnceInOrder(per_socket, wanted)
        self.assertEqual(await self.metric(two, "pocketbridge_bus_reconnects_total", connection="subscriber"), 2)

    # ------------------------------------------------------------ 3. revocation and deletion

    async def closes_within(self, clients: Sequence[Client], action: Callable[[], Any]) -> List[Tuple[int, float]]:
        """Run ``action``; each client's (close code, seconds from the action's start to the close)."""
        closed_at: Dict[int, float] = {}
        waits = []
        for i, c in enumerate(clients):
            d = c.closed
            d.addCallback(lambda info, i=i: (closed_at.__setitem__(i, time.monotonic()), info)[1])
            d.addTimeout(TIMEOUT, reactor)
            waits.append(d)
        t0 = time.monotonic()
        await action()
        infos = []
        for i, d in enumerate(waits):
            try:
                code, _ = await d
            except Exception:
                self.fail("socket {} was still open {:.0f} s after the request".format(i, TIMEOUT))
            infos.append((code, closed_at[i] - t0))
        return infos

    async def test_revocation_through_node_1_closes_the_socket_on_node_2_within_a_second(self) -> None:
        """DELETE /api/devices/D signed by A through node 1 sends device_revoked to D's socket on node 2 and closes it 4003 within 1 s."""
        one, two = await self.start_cluster()
        user = Identity.generate()
        a = await self.online(one, user)
        d = await self.online(two, user)

        async def revoke() -> None:
            resp = await self.rest(one, a).delete("/api/devices/" + d.device_id)
            self.assertEqual(resp.status, 200, resp)

        [(code, elapsed)] = await self.closes_within([d], revoke)
        self.assertEqual(code, 4003)
        self.assertLess(elapsed, 1.0, "the revoked socket on node 2 closed after {:.3f} s".format(elapsed))
        self.assertEqual([p["device_id"] for p in notices(d, "device_revoked")], [d.device_id])
        self.assertTrue(a.raw is not None and a.raw.is_open, "the signer's socket was closed too")

    async def test_account_deletion_through_node_1_closes_sockets_on_node_2_within_a_second(self) -> None:
        """DELETE /api/user through node 1 closes the user's sockets on node 2 (and on node 1) with 4003 within 1 s."""
        one, two = await self.start_cluster()
        user = Identity.generate()
        x = await self.online(one, user)
        y = await self.online(two, user)
        z = await self.online(two, user)
        bystander = await self.online(two, Identity.generate())

        async def delete() -> None:
            resp = await self.rest(one, x).delete("/api/user")
            self.assertEqual(resp.status, 200, resp)

        closes = await self.closes_within([y, z, x], delete)
        self.assertEqual([code for code, _ in closes], [4003, 4003, 4003])
        for code, elapsed in closes:
            self.assertLess(elapsed, 1.0, "a socket closed {:.3f} s after the deletion".format(elapsed))
        self.assertTrue(bystander.raw is not None and bystander.raw.is_open, "another user's socket was closed")

    # ------------------------------------------------------------ 4. presence

    async def test_presence_of_a_device_on_node_2_is_seen_through_node_1(self) -> None:
        """Through node 1, a device connected to node 2 is listed online with its socket counted, and offline once it disconnects."""
        one, two = await self.start_cluster(args=["--presence-ttl", "3", "--jobs-interval", "1"])
        user = Identity.generate()
        a = await self.online(one, user)
        b = await self.online(two, user, device_name="On node two")

        self.assertIs((await self.device_view(one, a, b.device_id))["is_online"], True)
        self.assertEqual(await self.socket_count(one, a, b.device_id), (True, 1))
        second = await self.online(two, user, device_id=b.device_id)
        self.assertEqual(await self.socket_count(one, a, b.device_id), (True, 2))

        await second.close()
        await b.close()

        async def offline() -> bool:
            return (await self.device_view(one, a, b.device_id))["is_online"] is False

        await self.until(offline, "node 1 to list B offline")
        self.assertEqual(await self.socket_count(one, a, b.device_id), (False, 0))
        await self.wait_status(a, b.device_id, online=False)

    async def test_devices_stay_online_past_the_presence_ttl(self) -> None:
        """Sockets open longer than --presence-ttl stay online throughout, because their nodes refresh their entries: both nodes list both devices online at every moment and nobody is told they went offline."""
        one, two = await self.start_cluster(args=["--presence-ttl", "2", "--jobs-interval", "1"])
        user = Identity.generate()
        a = await self.online(one, user)
        b = await self.online(two, user)
        started = time.monotonic()
        gaps = []
        # Sample for well past the 2 s lifetime (each node refreshes every 2/3 s).
        while time.monotonic() - started < 4.0:
            for node, signer in ((one, a), (two, b)):
                resp = await self.rest(node, signer).get("/api/devices")
                self.assertEqual(resp.status, 200, resp)
                online = {d["device_id"] for d in resp.json["devices"] if d["is_online"]}
                for name, device in (("A", a), ("B", b)):
                    if device.device_id not in online:
                        gaps.append("{} offline through node {} at {:.2f} s".format(
                            name, 1 if node is one else 2, time.monotonic() - started))
            await sleep(0.1)
        self.assertEqual(gaps, [])
        self.assertEqual(await self.socket_count(one, a, b.device_id), (True, 1))
        await self.barrier(a)
        await self.barrier(b)
        offline = [p for c in (a, b) for p in notices(c, "device_status_changed") if p.get("is_online") is False]
        self.assertEqual(offline, [])

    async def test_devices_of_a_killed_node_go_offline(self) -> None:
        """After node 2 is killed with SIGKILL, node 1 lists its device offline and tells the user's device on node 1, within 8 s."""
        one, two = await self.start_cluster(args=["--presence-ttl", "3", "--jobs-interval", "1"])
        user = Identity.generate()
        a = await self.online(one, user)
        b = await self.online(two, user, device_name="Doomed")
        self.assertIs((await self.device_view(one, a, b.device_id))["is_online"], True)

        killed_at = time.monotonic()
        await two.kill9()
        self.assertEqual([p for p in notices(a, "device_status_changed")
                          if p.get("device_id") == b.device_id and p.get("is_online") is False], [])

        async def offline() -> bool:
            return (await self.device_view(one, a, b.device_id))["is_online"] is False

        await self.until(offline, "node 1 to list the crashed node's device offline", timeout=8.0, interval=0.2)
        left = 8.0 - (time.monotonic() - killed_at)
        notice = await self.wait_status(a, b.device_id, online=False, timeout=max(left, 0.01))
        self.assertEqual((notice["user_id"], notice["device_name"]), (user.user_id, "Doomed"))
        self.assertLess(time.monotonic() - killed_at, 8.0)

    # ------------------------------------------------------------ 5. limits

    async def test_socket_limit_per_device_counts_sockets_on_both_nodes(self) -> None:
        """With --sockets-per-device 2, a device with one socket on each node gets 4029 for a third socket on either node, and a place again once one closes."""
        one, two = await self.start_cluster(args=["--sockets-per-device", "2"])
        user = Identity.generate()
        device_id = str(uuid.uuid4())
        first = await self.online(one, user, device_id=device_id)
        await self.online(two, user, device_id=device_id)
        for node in (one, two):
            third = Client(reactor, node.ws_url, user, device_id=device_id)
            self.addCleanup(third.close)
            with self.assertRaises(ConnectionClosed) as caught:
                await third.connect()
            self.assertEqual(caught.exception.code, 4029, caught.exception)
            self.assertRegex(caught.exception.reason, r"; retry after [1-9][0-9]* s$")
        # Another device of the user has its own quota.
        other = await self.online(two, user)

        await first.close()

        async def one_left() -> bool:
            return await self.socket_count(two, other, device_id) == (True, 1)

        await self.until(one_left, "the closed socket to leave the presence store")
        await self.online(two, user, device_id=device_id)

    # ------------------------------------------------------------ 6. jobs

    async def test_two_nodes_running_jobs_delete_each_expired_row_once(self) -> None:
        """Two nodes running the TTL job every second delete each expired row once: the rows are gone, stored bytes drop by exactly their size and the nodes' row counts add up to the number of rows."""
        import psycopg2

        from pocketbridge.protocol.events import NewEvent
        from pocketbridge.server.storage.postgres import PostgresStorage

        db = create_database(self)
        # A real handshake registers the user and the device (jobs still at the default 60 s).
        [setup] = await self.start_cluster(n=1, database_url=db.url)
        user = Identity.generate()
        device = await self.online(setup, user)
        await device.close()
        await setup.stop()

        now = int(time.time() * 1000)
        expired, size = 1500, 16

        def event(dseq: int, ttl: Optional[int]) -> NewEvent:
            return NewEvent(user.user_id, device.device_id, str(uuid.uuid4()), dseq, STREAM, TYPE, "A" * size, ttl)

        rows = [event(i + 1, now - 3_600_000 - i) for i in range(expired)]
        # Survivors: no ttl, expired but within the 5-minute grace, not expired.
        keep_ttls = [None] * 5 + [now - 60_000] * 5 + [now + 3_600_000] * 5
        keep = [event(expired + 1 + i, ttl) for i, ttl in enumerate(keep_ttls)]
        storage = PostgresStorage(db.url)
        await storage.start()
        try:
            outcomes = await storage.commit_batch(rows + keep, now - 7_200_000, 2**40)
        finally:
            storage.close()
        self.assertEqual(len(outcomes), expired + len(keep))

        def sql(query: str) -> Any:
            conn = psycopg2.connect(db.url)
            try:
                with conn.cursor() as cur:
                    cur.execute(query, (user.user_id,))
                    return cur.fetchone()[0]
            finally:
                conn.close()

        count_sql = "SELECT count(*) FROM events WHERE user_id = %s"
        bytes_sql = "SELECT stored_bytes FROM users WHERE user_id = %s"
        self.assertEqual(sql(count_sql), expired + len(keep))

        nodes = await self.start_cluster(database_url=db.url, parallel=True,
                                         args=["--jobs-interval", "1", "--job-batch", "20"])
        await self.until(lambda: sql(count_sql) == len(keep), "the jobs to delete the expired rows",
                         timeout=15, interval=0.2)

        async def all_counted() -> bool:
            counts = [await self.metric(n, "pocketbridge_job_rows_total", job="event_ttl") for n in nodes]
            return sum(counts) >= expired

        await self.until(all_counted, "the nodes to count the deleted rows")
        await sleep(1.5)  # another run on each node: nothing more may be counted
        per_node = [await self.metric(n, "pocketbridge_job_rows_total", job="event_ttl") for n in nodes]
        self.assertEqual(sum(per_node), expired, "rows counted per node: {}".format(per_node))
        self.assertEqual(int(sql(bytes_sql)), len(keep) * size)
        for n in nodes:
            self.assertGreater(await self.metric(n, "pocketbridge_job_runs_total", job="event_ttl"), 0,
                               "a node never ran the TTL job")

    async def test_admin_stats_lists_every_live_node(self) -> None:
        """/admin/stats through node 1 lists both nodes, with the device connected to node 2 counted there."""
        key = "k" * 40
        env = {"ADMIN_API_KEY": key}
        database_url = create_database(self).url
        prefix = "pbtest:{}:".format(secrets.token_hex(6))
        admin = RedisAdmin(redis_url())
        self.addCleanup(admin.delete_prefix, prefix)
        node_args = BASE_ARGS + ["--redis-prefix", prefix, "--presence-ttl", "3"]
        n1 = await start_server(self, backend="postgresql", database_url=database_url, redis=True, args=node_args, env=env)
        n2 = await start_server(self, backend="postgresql", database_url=database_url, redis=True, args=node_args, env=env)
        await self.online(n2, Identity.generate())
        anon = RestClient(reactor, n1.http_url)

        async def both_nodes() -> Any:
            resp = await anon.get("/admin/stats", sign=False, headers={"Authorization": "Bearer " + key})
            self.assertEqual(resp.status, 200, resp)
            lines = resp.json["nodes"]
            return lines if len(lines) == 2 and sum(n["devices_online"] for n in lines) == 1 else None

        lines = await self.until(both_nodes, "both nodes in /admin/stats", timeout=8)
        self.assertEqual(len({n["node_id"] for n in lines}), 2)
        self.assertEqual([n["devices_online"] for n in lines], [0, 1])  # node 1 (answering) first
