"""
``twistd pocketbridge --workers 2`` as real processes on PostgreSQL and Redis
(issue 11 item 2, docs/operations.md "Workers").

Which worker holds a client's socket is read from ``/proc``: the server side
of the connection (``/proc/net/tcp``) is a socket inode, and the worker whose
file descriptors include that inode accepted it. The supervisor must never
be that process.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import uuid
from typing import Any, Dict, List, Optional, Set, Tuple

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from pocketbridge.client import Client, Identity
from pocketbridge.server.workers import EMBEDDED_REFUSAL
from tests.abuse import sleep
from tests.harness import ServerProcess, free_port, make_server, require_postgres, require_redis, wait_until

STREAM = "clipboard:main"
TYPE = "clipboard:text"
TIMEOUT = 10.0
ARGS = ["--workers", "2", "--shutdown-window", "1", "--rest-requests-per-minute", "100000"]


def payload() -> str:
    return base64.b64encode(os.urandom(24)).decode()


def children(pid: int) -> Set[int]:
    """The live child processes of ``pid``."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/{}/stat".format(name)) as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(name))
    return found


def alive(pid: int) -> bool:
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


def _server_socket_inode(server_port: int, client_port: int) -> Optional[str]:
    """The inode of the server side of 127.0.0.1:client_port -> 127.0.0.1:server_port."""
    local = "0100007F:{:04X}".format(server_port)
    remote = "0100007F:{:04X}".format(client_port)
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if cols[1] == local and cols[2] == remote:
                return cols[9]
    return None


def owner(server_port: int, client: Client, candidates: Set[int]) -> Optional[int]:
    """Which of ``candidates`` (pids) holds the server side of ``client``'s socket."""
    assert client.raw is not None and client.raw.protocol is not None
    transport: Any = client.raw.protocol.transport
    client_port = transport.getHost().port
    inode = _server_socket_inode(server_port, client_port)
    if inode is None:
        return None
    target = "socket:[{}]".format(inode)
    for pid in candidates:
        try:
            fds = os.listdir("/proc/{}/fd".format(pid))
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink("/proc/{}/fd/{}".format(pid, fd)) == target:
                    return pid
            except OSError:
                continue
    return None


def stored_events(database_url: str) -> Set[Tuple[str, int]]:
    """(user_id, seq) of every event in the database."""
    import psycopg2

    conn = psycopg2.connect(database_url, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT user_id, seq FROM events")
            return {(str(u), int(s)) for u, s in cur.fetchall()}
    finally:
        conn.close()


class WorkersTests(TestCase):
    """A supervisor and two workers sharing one listening socket."""

    timeout = 150

    def setUp(self) -> None:
        require_postgres(self)
        require_redis(self)

    async def start(self) -> Tuple[ServerProcess, Set[int]]:
        """A healthy supervisor whose two workers both answer /health; (server, worker pids)."""
        server = make_server(self, "postgresql", args=ARGS, redis=True)
        await server.start(timeout=40)
        assert server.pid is not None
        seen: Set[int] = set()

        async def both_answer() -> bool:
            workers = children(server.pid)  # type: ignore[arg-type]
            code, body = await server.http_get("/health")
            if code == 200:
                seen.add(int(body.decode().split('"node_id":"')[1].split('"')[0].rsplit(":", 1)[1]))
            return len(workers) == 2 and workers <= seen

        await wait_until(self, both_answer, "both workers to answer /health", 40, interval=0.1)
        return server, children(server.pid)

    async def device(self, server: ServerProcess, identity: Optional[Identity] = None,
                     device_id: Optional[str] = None, version: int = 2) -> Client:
        client = Client(reactor, server.ws_url, identity or Identity.generate(),
                        device_id=device_id or str(uuid.uuid4()), protocol_version=version, handshake_timeout=TIMEOUT)
        self.addCleanup(client.close)
        await client.connect()
        return client

    async def spread(self, server: ServerProcess, workers: Set[int], at_least: int = 2,
                     most: int = 60) -> Dict[int, List[Client]]:
        """Clients (new users) connected until each worker holds ``at_least`` of them; by worker pid."""
        assert server.pid is not None
        by_worker: Dict[int, List[Client]] = {pid: [] for pid in workers}
        for _ in range(most):
            client = await self.device(server)
            pid = owner(server.port, client, workers | {server.pid})
            self.assertNotEqual(pid, server.pid, "the supervisor accepted a connection")
            self.assertIn(pid, workers)
            by_worker[pid].append(client)  # type: ignore[index]
            if all(len(c) >= at_least for c in by_worker.values()):
                return by_worker
        self.fail("{} connections did not reach both workers: {}".format(
            most, {pid: len(c) for pid, c in by_worker.items()}))

    async def send(self, client: Client, n: int) -> Set[Tuple[str, int]]:
        acks = await gatherResults([client.send_event_nowait(STREAM, TYPE, payload(), timeout=TIMEOUT)
                                    for _ in range(n)], consumeErrors=True)
        return {(client.identity.user_id, int(a["seq"])) for a in acks}

    async def test_metrics_listen_is_served_by_the_supervisor_for_every_worker(self) -> None:
        """With --metrics-listen, the supervisor answers /health (200: both workers alive) and /metrics with each worker's samples labelled worker="0" and worker="1"."""
        port = free_port()
        server = make_server(self, "postgresql", args=ARGS + ["--metrics-listen", "tcp:{}:interface=127.0.0.1".format(port)],
                             redis=True)
        await server.start(timeout=40)
        base = "http://127.0.0.1:{}".format(port)

        async def all_alive() -> bool:
            try:
                response = await treq.get(base + "/health", persistent=False)
                body = await treq.content(response)
            except Exception:
                return False
            return response.code == 200 and json.loads(body)["alive"] == 2

        await wait_until(self, all_alive, "the supervisor's /health to see both workers", 40, interval=0.2)

        async def both_labelled() -> bool:
            response = await treq.get(base + "/metrics", persistent=False)
            text = (await treq.content(response)).decode("utf-8")
            return response.code == 200 and 'worker="0"' in text and 'worker="1"' in text \
                and "pocketbridge_" in text

        await wait_until(self, both_labelled, "/metrics to carry both workers' samples", 30, interval=0.2)

    # ---------------------------------------------------------------- (a)

    async def test_connections_land_on_both_workers_never_on_the_supervisor(self) -> None:
        """With --workers 2 the SDK's connections are served by both worker processes and none by the supervisor, whose log relays both workers' lines."""
        server, workers = await self.start()
        self.assertEqual(len(workers), 2)
        by_worker = await self.spread(server, workers)
        for clients in by_worker.values():
            acked = await self.send(clients[0], 3)
            self.assertEqual(len(acked), 3)
        log = server.log_text()
        self.assertIn("[worker 0]", log)
        self.assertIn("[worker 1]", log)

    # ---------------------------------------------------------------- (b)

    async def test_a_killed_worker_is_replaced_and_its_clients_carry_on(self) -> None:
        """SIGKILL of one worker: the supervisor starts a new one (new pid), the clients it held reconnect and send on, and every acknowledged event is in PostgreSQL."""
        server, workers = await self.start()
        by_worker = await self.spread(server, workers)
        acked: Set[Tuple[str, int]] = set()
        for clients in by_worker.values():
            for client in clients:
                acked |= await self.send(client, 10)
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        dropped = by_worker[victim]
        for client in dropped:
            assert client.raw is not None
            info = await client.raw.closed
            self.assertNotEqual(info[0], 1000)
        seen: List[Set[int]] = []

        def replaced() -> bool:
            # One scan per check: two scans could see the victim still dying in
            # the first and not yet replaced in the second.
            now = children(server.pid)  # type: ignore[arg-type]
            seen.append(now)
            return len(now) == 2 and victim not in now and len(now - workers) == 1

        await wait_until(self, replaced, "a replacement worker", 30, interval=0.1)
        replacement = seen[-1] - workers
        self.assertEqual(len(replacement), 1)
        for client in dropped:
            await client.connect()
            acked |= await self.send(client, 10)
        for client in by_worker[sorted(workers)[1]]:
            acked |= await self.send(client, 5)
        self.assertEqual(acked - stored_events(server.database_url or ""), set(), "acknowledged but not stored")
        log = server.log_text()
        self.assertIn("(pid {}) died".format(victim), log)
        self.assertIn("killed by signal 9", log)

    # ---------------------------------------------------------------- (c)

    async def test_sigterm_drains_every_worker_and_the_tree_exits(self) -> None:
        """SIGTERM to the supervisor: clients on both workers are closed 1001, supervisor and workers exit, and every acknowledged event is in PostgreSQL (and every stored one was acknowledged)."""
        server, workers = await self.start()
        by_worker = await self.spread(server, workers, at_least=2)
        clients = [c for cs in by_worker.values() for c in cs]
        acked: Set[Tuple[str, int]] = set()
        stop = [False]

        async def send_loop(client: Client) -> None:
            while not stop[0] and client.raw is not None and client.raw.close_info is None:
                d = client.send_event_nowait(STREAM, TYPE, payload(), timeout=TIMEOUT)

                def ok(ack: Any, user: str = client.identity.user_id) -> None:
                    if isinstance(ack, dict) and type(ack.get("seq")) is int:
                        acked.add((user, ack["seq"]))

                d.addCallbacks(ok, lambda f: None)
                await sleep(0.01)

        loops = [Deferred.fromCoroutine(send_loop(c)) for c in clients]
        await sleep(1.0)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        closes = []
        for client in clients:
            assert client.raw is not None
            closes.append(await client.raw.closed)
        stop[0] = True
        for d in loops:
            await d
        code = await server._wait_exit(30)
        self.assertIn(code, (0, -signal.SIGTERM), "supervisor exit")
        self.assertEqual({c[0] for c in closes}, {1001})
        for pid in workers:
            self.assertFalse(alive(pid), "worker {} outlived its supervisor".format(pid))
        stored = stored_events(server.database_url or "")
        self.assertGreater(len(acked), 20)
        self.assertEqual(acked - stored, set(), "acknowledged but not stored")
        self.assertEqual(stored - acked, set(), "stored but never acknowledged")

    # ---------------------------------------------------------------- (d)

    async def test_events_cross_workers_exactly_once(self) -> None:
        """A device on one worker receives every event another device of the same user sends through the other worker, once each, seq without gaps."""
        server, workers = await self.start()
        user = Identity.generate()
        receiver = await self.device(server, user)
        home = owner(server.port, receiver, workers)
        sender = None
        for _ in range(60):
            candidate = await self.device(server, user)
            if owner(server.port, candidate, workers) not in (home, None):
                sender = candidate
                break
            await candidate.close()
        assert sender is not None, "no second device landed on the other worker"
        acked = await self.send(sender, 60)
        self.assertEqual(sorted(s for _, s in acked), list(range(1, 61)))
        await wait_until(self, lambda: receiver.last_seq >= 60, "the other worker to deliver seq 60", 30)
        since = len(receiver.messages)
        receiver.send_raw({"type": "ping", "payload": {}})
        await receiver.wait_for("pong", timeout=TIMEOUT, since=since)
        self.assertEqual([e["seq"] for e in receiver.events_received], list(range(1, 61)))


# -------------------------------------------------------------------- (e)


class RefusalTests(TestCase):
    """The shapes --workers cannot serve are refused with one line and exit code 2."""

    timeout = 60

    async def refused(self, server: ServerProcess) -> str:
        self.addCleanup(server.cleanup)
        result = await server.start_expect_failure(timeout=30)
        self.assertEqual(result.code, 2, result.output)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        return lines[0]

    async def test_embedded_shape_is_refused(self) -> None:
        """SQLite and the in-process bus: one line on stderr, exit 2, no SQLite file created."""
        server = ServerProcess(args=["--workers", "2"])
        line = await self.refused(server)
        self.assertEqual(line, "pocketbridge: " + EMBEDDED_REFUSAL)
        self.assertFalse(os.path.exists(os.path.join(server.data_dir, "pocketbridge.sqlite3")))

    async def test_postgresql_without_redis_is_refused(self) -> None:
        """PostgreSQL alone is not enough: the in-process bus would not reach the other workers."""
        require_postgres(self)
        server = make_server(self, "postgresql", args=["--workers", "auto"] if (os.cpu_count() or 1) > 1
                             else ["--workers", "2"])
        line = await self.refused(server)
        self.assertEqual(line, "pocketbridge: " + EMBEDDED_REFUSAL)

    async def test_a_non_tcp_listen_endpoint_is_refused(self) -> None:
        """A unix: (or ssl:) endpoint cannot be shared this way: one line naming the endpoint kind."""
        require_postgres(self)
        require_redis(self)
        server = make_server(self, "postgresql", args=["--workers", "2", "--listen", "unix:/tmp/pb-never.sock"],
                             redis=True)
        line = await self.refused(server)
        self.assertIn("--workers needs a plain tcp: or tcp6: --listen endpoint (got unix:)", line)
