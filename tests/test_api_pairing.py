"""
Tests of v1 pairing (API.md §3 "Pairing, v1") and of the failed-lookup
budgets (API.md §2).

The integration tests start a real ``twistd pocketbridge`` process
(``tests.harness``) on SQLite and on PostgreSQL and drive it with the
project's SDK: ``Client`` for the WebSocket (a device becomes usable for REST
after one handshake) and ``RestClient`` for signed requests. Different client
IPs are simulated with ``--trusted-proxies 127.0.0.1`` and
``X-Forwarded-For``.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pocketbridge.server.api.pairing_budget import LimitsFailureCounters, PairingBudgets, global_limit
from pocketbridge.server.api.pairing import RecordSealer
from pocketbridge.client import Client, Identity
from pocketbridge.client.rest import RestClient, RestResponse
from pocketbridge.server.cluster.limits import LocalLimits
from tests.class_servers import class_server, unique_code
from tests.harness import PostgresMixin, ServerProcess, SQLiteMixin, create_database, start_server

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

TIMEOUT = 10.0
NOT_FOUND_BODY = {"error": "Pairing code not found or expired", "code": "NOT_FOUND"}
ISO_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
# The server shared by the tests of a class that neither spend nor measure a
# failure budget: budgets large enough that the failures of all of them
# together (a wrong token, a 404 after a redemption) never refuse a request.
SHARED_ARGS = ("--pairing-failures-per-ip", "1000000", "--pairing-failures-global", "1000000",
               "--rest-requests-per-minute", "1000000")


def now_ms() -> int:
    """Wall-clock ms (the server runs on this host)."""
    return int(time.time() * 1000)


def iso_to_ms(text: str) -> int:
    """Parse a ``toISOString`` timestamp back to ms."""
    import datetime

    t = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
    return int(round(t.timestamp() * 1000))


def sleep(seconds: float) -> "Deferred[None]":
    """A Deferred that fires after ``seconds`` of real time."""
    return deferLater(reactor, seconds, lambda: None)


def fresh_code() -> str:
    """A random 6-digit code no other test of this process got: tests sharing a server never collide."""
    return unique_code()


def secret_data(identity: Identity, marker: str) -> Dict[str, Any]:
    """A v1-style pairing payload carrying a recognisable secret."""
    return {"userId": identity.user_id, "privateKey": marker, "publicKey": identity.user_id, "note": "é ✓"}


def run(coro: Any) -> Any:
    """Run a coroutine that never waits (in-memory budgets) to completion."""
    return Deferred.fromCoroutine(coro)


class PairingIntegration(_Base):
    """The v1 pairing routes against a real server; mixed with a backend and TestCase below."""

    backend: str

    async def start(self, args: Sequence[str] = (), env: Optional[Dict[str, str]] = None) -> ServerProcess:
        """A healthy server on this class's backend."""
        return await start_server(self, args=args, env=env)

    async def shared(self) -> ServerProcess:
        """
        The class's server (``SHARED_ARGS``), for a test that makes its own
        users and codes and asserts nothing about node-wide state: one twistd
        start for all of them instead of one each.
        """
        return await class_server(self, args=SHARED_ARGS)

    async def device(self, server: ServerProcess, identity: Optional[Identity] = None) -> Tuple[Client, RestClient]:
        """A connected device of ``identity`` (new user when None) and a REST client signing as it."""
        identity = identity or Identity.generate()
        client = Client(reactor, server.ws_url, identity)
        self.addCleanup(client.close)
        await client.connect()
        return client, RestClient(reactor, server.http_url, identity, client.device_id)

    @staticmethod
    def anonymous(server: ServerProcess) -> RestClient:
        """A client that signs nothing."""
        return RestClient(reactor, server.http_url)

    @staticmethod
    async def lookup(server: ServerProcess, code: str, ip: Optional[str] = None) -> RestResponse:
        """GET /api/pairing/lookup/{code}, from ``ip`` (via X-Forwarded-For) when given."""
        headers = {"X-Forwarded-For": ip} if ip else None
        return await RestClient(reactor, server.http_url).get("/api/pairing/lookup/" + code, headers=headers)

    # ------------------------------------------------------------ store and redeem

    async def test_store_then_lookup_once(self) -> None:
        """A stored code answers its data exactly once, then 404 NOT_FOUND; the store answer has the v1 fields."""
        server = await self.shared()
        _, rest = await self.device(server)
        code = fresh_code()
        data = secret_data(rest.identity, "k-" + uuid.uuid4().hex)
        data["nested"] = {"z": 1, "a": [1.5, None, True]}
        before = now_ms()
        stored = await rest.post("/api/pairing/store", {"code": code, "data": data})
        after = now_ms()
        self.assertEqual(stored.status, 200, stored)
        self.assertEqual(set(stored.json), {"success", "message", "expiresAt", "expiresIn"})
        self.assertEqual((stored.json["success"], stored.json["message"], stored.json["expiresIn"]),
                         (True, "Pairing code stored", 600000))
        self.assertRegex(stored.json["expiresAt"], ISO_RE)
        self.assertTrue(before + 600000 <= iso_to_ms(stored.json["expiresAt"]) <= after + 600000)

        first = await self.lookup(server, code)
        self.assertEqual((first.status, first.json), (200, {"success": True, "data": data}))
        self.assertEqual(list(first.json["data"]), list(data), "member order changed")
        second = await self.lookup(server, code)
        self.assertEqual((second.status, second.json), (404, NOT_FOUND_BODY))

    async def test_v1_prefix_and_legacy_flag_off(self) -> None:
        """The routes answer under /api/v1 too; without --legacy-clients an X-User-ID store is 401 AUTH_REQUIRED."""
        server = await self.shared()
        _, rest = await self.device(server)
        code = fresh_code()
        stored = await rest.post("/api/v1/pairing/store", {"code": code, "data": {"a": 1}})
        self.assertEqual(stored.status, 200, stored)
        got = await self.anonymous(server).get("/api/v1/pairing/lookup/" + code)
        self.assertEqual((got.status, got.json), (200, {"success": True, "data": {"a": 1}}))
        legacy = await self.anonymous(server).post(
            "/api/pairing/store", {"code": fresh_code(), "data": {}}, headers={"X-User-ID": rest.identity.user_id})
        self.assertEqual((legacy.status, legacy.json["code"]), (401, "AUTH_REQUIRED"))

    async def test_concurrent_lookups_redeem_once(self) -> None:
        """Of several simultaneous lookups of one code exactly one gets the data; the others get 404."""
        server = await self.shared()
        _, rest = await self.device(server)
        for _ in range(3):
            code = fresh_code()
            self.assertEqual((await rest.post("/api/pairing/store", {"code": code, "data": {"n": 1}})).status, 200)
            answers = await gatherResults([Deferred.fromCoroutine(self.lookup(server, code)) for _ in range(4)],
                                          consumeErrors=True)
            self.assertEqual(sorted(a.status for a in answers), [200, 404, 404, 404])

    async def test_expired_code_is_not_found(self) -> None:
        """A code looked up after its TTL answers 404, and the code can be stored again."""
        server = await self.start(args=["--pairing-ttl", "1"])
        _, rest = await self.device(server)
        code = fresh_code()
        stored = await rest.post("/api/pairing/store", {"code": code, "data": {"a": 1}})
        self.assertEqual((stored.status, stored.json["expiresIn"]), (200, 1000))
        await sleep(1.3)
        got = await self.lookup(server, code)
        self.assertEqual((got.status, got.json), (404, NOT_FOUND_BODY))
        again = await rest.post("/api/pairing/store", {"code": code, "data": {"a": 2}})
        self.assertEqual(again.status, 200, again)

    # ------------------------------------------------------------ refusals

    async def test_active_code_conflicts(self) -> None:
        """Storing a live code answers 409 CONFLICT, whether the caller or another user holds it; the holder's data is kept."""
        server = await self.shared()
        _, alice = await self.device(server)
        _, bob = await self.device(server)
        code = fresh_code()
        self.assertEqual((await alice.post("/api/pairing/store", {"code": code, "data": {"who": "alice"}})).status, 200)
        same = await alice.post("/api/pairing/store", {"code": code, "data": {"who": "alice2"}})
        self.assertEqual((same.status, same.json["code"]), (409, "CONFLICT"))
        other = await bob.post("/api/pairing/store", {"code": code, "data": {"who": "bob"}})
        self.assertEqual((other.status, other.json["code"]), (409, "CONFLICT"))
        got = await self.lookup(server, code)
        self.assertEqual(got.json, {"success": True, "data": {"who": "alice"}})

    async def test_conflict_with_another_user_counts_as_failure(self) -> None:
        """A 409 on another user's live code spends the caller's IP budget: its lookups then answer 429."""
        server = await self.start(args=["--pairing-failures-per-ip", "2"])
        _, alice = await self.device(server)
        _, bob = await self.device(server)
        code = fresh_code()
        self.assertEqual((await alice.post("/api/pairing/store", {"code": code, "data": {}})).status, 200)
        # Alice's own conflicts are free.
        for _ in range(3):
            self.assertEqual((await alice.post("/api/pairing/store", {"code": code, "data": {}})).status, 409)
        self.assertEqual((await self.lookup(server, "000000" if code != "000000" else "000001")).status, 404)
        self.assertEqual((await bob.post("/api/pairing/store", {"code": code, "data": {}})).status, 409)
        blocked = await self.lookup(server, code)
        self.assertEqual((blocked.status, blocked.json["code"]), (429, "RATE_LIMITED"))
        # The store of a user over budget is refused too.
        refused = await bob.post("/api/pairing/store", {"code": fresh_code(), "data": {}})
        self.assertEqual(refused.status, 429)

    async def test_user_id_must_be_the_caller(self) -> None:
        """data.userId naming someone else (or not a string) is 403 FORBIDDEN; the caller's own id in any case is fine."""
        server = await self.shared()
        _, rest = await self.device(server)
        other = Identity.generate().user_id
        for bad in (other, None, 5):
            r = await rest.post("/api/pairing/store", {"code": fresh_code(), "data": {"userId": bad}})
            self.assertEqual((r.status, r.json["code"]), (403, "FORBIDDEN"), bad)
        ok = await rest.post("/api/pairing/store", {"code": fresh_code(), "data": {"userId": rest.identity.user_id.upper()}})
        self.assertEqual(ok.status, 200, ok)

    async def test_malformed_requests(self) -> None:
        """Codes other than six ASCII digits, non-object data and data over 16 KiB are 400 VALIDATION_ERROR with the field."""
        server = await self.shared()
        _, rest = await self.device(server)
        for code in ("12345", "1234567", "12345a", 123456, None, "\u0661\u0662\u0663\u0664\u0665\u0666", "123456\n"):
            r = await rest.post("/api/pairing/store", {"code": code, "data": {}})
            self.assertEqual((r.status, r.json.get("code"), r.json.get("field")), (400, "VALIDATION_ERROR", "code"), code)
        for data in (None, [], "x", 1):
            r = await rest.post("/api/pairing/store", {"code": fresh_code(), "data": data})
            self.assertEqual((r.status, r.json.get("field")), (400, "data"), data)
        # 16 KiB of compact UTF-8 is the most; one byte more is refused.
        filler = 16 * 1024 - len('{"k":""}')
        ok = await rest.post("/api/pairing/store", {"code": fresh_code(), "data": {"k": "x" * filler}})
        self.assertEqual(ok.status, 200, ok)
        big = await rest.post("/api/pairing/store", {"code": fresh_code(), "data": {"k": "x" * (filler + 1)}})
        self.assertEqual((big.status, big.json.get("field")), (400, "data"))
        bad_json = await rest.post("/api/pairing/store", raw_body=b'{"code": "123456", "data": {NaN}}')
        self.assertEqual((bad_json.status, bad_json.json["code"]), (400, "BAD_JSON"))
        for path in ("12345", "abcdef", "1234567", "12%2034"):
            r = await self.lookup(server, path)
            self.assertEqual((r.status, r.json.get("code")), (400, "VALIDATION_ERROR"), path)

    # ------------------------------------------------------------ budgets

    async def test_failed_lookups_per_ip_lock_out(self) -> None:
        """After 10 failed lookups from one IP every lookup from it answers 429 with Retry-After, a valid code too; other IPs are unaffected."""
        server = await self.start(args=["--trusted-proxies", "127.0.0.1"])
        _, rest = await self.device(server)
        code = fresh_code()
        self.assertEqual((await rest.post("/api/pairing/store", {"code": code, "data": {"a": 1}})).status, 200)
        wrong = [c for c in ("000000", "111111", "222222") if c != code][0]
        attacker = "203.0.113.7"
        for i in range(10):
            r = await self.lookup(server, wrong if i % 2 else "12x", attacker)
            self.assertIn(r.status, (400, 404), i)
        blocked = await self.lookup(server, wrong, attacker)
        self.assertEqual((blocked.status, blocked.json["code"]), (429, "RATE_LIMITED"))
        retry = blocked.header("Retry-After")
        self.assertIsNotNone(retry)
        assert retry is not None
        self.assertTrue(retry.isdigit() and 1 <= int(retry) <= 600, retry)
        valid = await self.lookup(server, code, attacker)
        self.assertEqual(valid.status, 429)
        # The code was not spent by the refused lookup: another client redeems it.
        other = await self.lookup(server, code, "198.51.100.9")
        self.assertEqual((other.status, other.json["data"]), (200, {"a": 1}))

    async def test_global_budget_locks_out_every_ip(self) -> None:
        """Once the service-wide budget is spent, a valid code from a fresh IP answers 429 too."""
        server = await self.start(args=["--trusted-proxies", "127.0.0.1", "--pairing-failures-global", "3"])
        _, rest = await self.device(server)
        code = fresh_code()
        self.assertEqual((await rest.post("/api/pairing/store", {"code": code, "data": {}})).status, 200)
        wrong = "000000" if code != "000000" else "000001"
        for i in range(3):
            self.assertEqual((await self.lookup(server, wrong, "192.0.2.{}".format(i + 1))).status, 404)
        blocked = await self.lookup(server, code, "192.0.2.200")
        self.assertEqual((blocked.status, blocked.json["code"]), (429, "RATE_LIMITED"))
        self.assertIsNotNone(blocked.header("Retry-After"))

    async def test_global_budget_shrinks_with_live_codes(self) -> None:
        """With 51 live codes the service-wide budget is halved (200/⌈51/50⌉ scaled: 4 → 2 failures)."""
        server = await self.start(args=["--trusted-proxies", "127.0.0.1", "--pairing-failures-global", "4",
                                        "--rest-requests-per-minute", "100000"])
        _, rest = await self.device(server)
        codes = set()
        while len(codes) < 51:
            codes.add(fresh_code())
        for code in sorted(codes):
            self.assertEqual((await rest.post("/api/pairing/store", {"code": code, "data": {}})).status, 200)
        wrong = next("{:06d}".format(n) for n in range(1000000) if "{:06d}".format(n) not in codes)
        self.assertEqual((await self.lookup(server, wrong, "192.0.2.1")).status, 404)
        self.assertEqual((await self.lookup(server, wrong, "192.0.2.2")).status, 404)
        blocked = await self.lookup(server, sorted(codes)[0], "192.0.2.3")
        self.assertEqual(blocked.status, 429)

    # ------------------------------------------------------------ secrecy

    async def test_record_is_sealed_at_rest(self) -> None:
        """The stored row holds neither the data nor any recognisable part of it."""
        server = await self.start()
        _, rest = await self.device(server)
        marker = "SECRET-" + uuid.uuid4().hex
        code = fresh_code()
        self.assertEqual((await rest.post("/api/pairing/store", {"code": code, "data": secret_data(rest.identity, marker)})).status, 200)
        rows = self.raw_pairing_rows(server)
        self.assertEqual(len(rows), 1)
        # The row key is a keyed hash of the code, never the code (issue 9 item 6).
        self.assertRegex(rows[0][0], r"^[0-9a-f]{64}$")
        self.assertNotIn(code, rows[0][0])
        sealed = rows[0][1]
        for needle in (marker.encode(), b"privateKey", rest.identity.user_id.encode()):
            self.assertNotIn(needle, sealed)
        if self.backend == "sqlite":
            for suffix in ("", "-wal"):
                path = os.path.join(server.data_dir, "pocketbridge.sqlite3" + suffix)
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        self.assertNotIn(marker.encode(), f.read())
        got = await self.lookup(server, code)
        self.assertEqual(got.json["data"]["privateKey"], marker)
        self.assertEqual(self.raw_pairing_rows(server), [], "the redeemed record is still stored")

    def raw_pairing_rows(self, server: ServerProcess) -> List[Tuple[str, bytes]]:
        """(code, sealed) of every row of the pairing table, read directly from the database."""
        if self.backend == "sqlite":
            conn = sqlite3.connect(os.path.join(server.data_dir, "pocketbridge.sqlite3"))
            try:
                return [(r[0], bytes(r[1])) for r in conn.execute("SELECT code, sealed FROM pairing")]
            finally:
                conn.close()
        import psycopg2

        assert server.database_url is not None
        pg = psycopg2.connect(server.database_url)
        try:
            with pg.cursor() as cur:
                cur.execute("SELECT code, sealed FROM pairing")
                return [(r[0], bytes(r[1])) for r in cur.fetchall()]
        finally:
            pg.close()

    async def test_log_never_contains_code_or_data(self) -> None:
        """At debug level the log shows pairing paths as ******, never the code or the data."""
        server = await self.start(env={"LOG_LEVEL": "debug"})
        _, rest = await self.device(server)
        marker = "SECRET-" + uuid.uuid4().hex
        code = "{:06d}".format(int.from_bytes(os.urandom(4), "big") % 900000 + 100000)
        self.assertEqual((await rest.post("/api/pairing/store", {"code": code, "data": secret_data(rest.identity, marker)})).status, 200)
        self.assertEqual((await rest.post("/api/pairing/store", {"code": code, "data": {}})).status, 409)
        self.assertEqual((await self.lookup(server, code)).status, 200)
        self.assertEqual((await self.lookup(server, code)).status, 404)
        self.assertEqual((await self.lookup(server, "12345x")).status, 400)
        await server.stop()
        text = server.log_text() + server.stdout_text() + server.stderr_text()
        self.assertIn("/api/pairing/lookup/******", text)
        self.assertNotIn(marker, text)
        self.assertNotIn("privateKey", text)
        self.assertIsNone(re.search(r"(?<![0-9])" + code + r"(?![0-9])", text), "the code is in the log")
        self.assertNotIn("12345x", text)

    # ------------------------------------------------------------ notices and legacy

    async def test_pairing_complete_notice(self) -> None:
        """Redemption sends pairing_complete {type, code, timestamp} to the storing user's devices, and to no one else."""
        server = await self.shared()
        owner, rest = await self.device(server)
        stranger, _ = await self.device(server)
        code = fresh_code()
        self.assertEqual((await rest.post("/api/pairing/store", {"code": code, "data": {}})).status, 200)
        mark = len(owner.messages)
        before = now_ms()
        self.assertEqual((await self.lookup(server, code)).status, 200)
        notice = await owner.wait_for("pairing_complete", timeout=TIMEOUT, since=mark)
        self.assertEqual(set(notice["payload"]), {"type", "code", "timestamp"})
        self.assertEqual((notice["payload"]["type"], notice["payload"]["code"]), ("pairing_complete", code))
        self.assertTrue(before - 1000 <= notice["payload"]["timestamp"] <= now_ms() + 1000)
        # A barrier on the stranger's socket: its pong comes after any notice it would have got.
        stranger_mark = len(stranger.messages)
        stranger.send_raw({"type": "ping", "payload": {}})
        await stranger.wait_for("pong", timeout=TIMEOUT, since=stranger_mark)
        self.assertNotIn("pairing_complete", [m.get("type") for m in stranger.messages])

    async def test_legacy_full_flow(self) -> None:
        """Under --legacy-clients: store with X-User-ID, look up, pair a new device with the key, and list it with X-User-ID."""
        server = await self.start(args=["--legacy-clients"])
        identity = Identity.generate()
        first = Client(reactor, server.ws_url, identity, device_name="Laptop")
        self.addCleanup(first.close)
        await first.connect()
        legacy = {"X-User-ID": identity.user_id, "X-Device-ID": first.device_id}
        code = fresh_code()
        bundle = {"userId": identity.user_id, "seed": identity.signing_key.encode().hex()}
        stored = await self.anonymous(server).post("/api/pairing/store", {"code": code, "data": bundle}, headers=legacy)
        self.assertEqual(stored.status, 200, stored)
        got = await self.lookup(server, code)
        self.assertEqual(got.status, 200)
        paired = Identity.from_seed_hex(got.json["data"]["seed"])
        self.assertEqual(paired.user_id, identity.user_id)
        second = Client(reactor, server.ws_url, paired, device_name="Phone")
        self.addCleanup(second.close)
        await second.connect()
        devices = await self.anonymous(server).get("/api/devices", headers=legacy)
        self.assertEqual(devices.status, 200, devices)
        listed = {d["device_id"] for d in devices.json["devices"]}
        self.assertEqual(listed, {first.device_id, second.device_id})


class PairingSQLiteTests(PairingIntegration, SQLiteMixin, TestCase):
    """v1 pairing on SQLite."""


class PairingPostgresTests(PairingIntegration, PostgresMixin, TestCase):
    """v1 pairing on PostgreSQL."""


class PairingClusterTests(PostgresMixin, TestCase):
    """v1 pairing on two nodes sharing PostgreSQL and Redis."""

    async def test_budget_and_notice_span_nodes(self) -> None:
        """Failures on one node spend the budget on the other, and a redemption on node B notifies a device on node A."""
        db = create_database(self)
        # Every node of a cluster shares the server key (docs/configuration.md): records sealed on A open on B.
        env = {"SERVER_PRIVATE_KEY_HEX": os.urandom(32).hex()}
        # A prefix of its own: budgets in Redis outlive the test (10-minute windows).
        args = ["--redis-prefix", "pbtest-{}:".format(uuid.uuid4().hex)]
        a = await start_server(self, args=args, database_url=db.url, redis=True, env=env)
        b = await start_server(self, args=args, database_url=db.url, redis=True, env=env)
        identity = Identity.generate()
        owner = Client(reactor, a.ws_url, identity)
        self.addCleanup(owner.close)
        await owner.connect()
        rest = RestClient(reactor, a.http_url, identity, owner.device_id)
        code = fresh_code()
        self.assertEqual((await rest.post("/api/pairing/store", {"code": code, "data": {"k": 1}})).status, 200)
        mark = len(owner.messages)
        got = await RestClient(reactor, b.http_url).get("/api/pairing/lookup/" + code)
        self.assertEqual((got.status, got.json), (200, {"success": True, "data": {"k": 1}}))
        notice = await owner.wait_for("pairing_complete", timeout=TIMEOUT, since=mark)
        self.assertEqual(notice["payload"]["code"], code)

        code2 = fresh_code()
        self.assertEqual((await rest.post("/api/pairing/store", {"code": code2, "data": {}})).status, 200)
        wrong = next(c for c in ("000000", "000001", "000002") if c not in (code, code2))
        for _ in range(10):
            self.assertEqual((await RestClient(reactor, a.http_url).get("/api/pairing/lookup/" + wrong)).status, 404)
        blocked = await RestClient(reactor, b.http_url).get("/api/pairing/lookup/" + code2)
        self.assertEqual((blocked.status, blocked.json["code"]), (429, "RATE_LIMITED"))


# ---------------------------------------------------------------- unit tests


class BudgetTests(SynchronousTestCase):
    """PairingBudgets over the in-memory limits store on a fake clock."""

    def make(self, live: int = 0, per_ip: int = 10, base: int = 200) -> Tuple[PairingBudgets, Clock, List[int]]:
        """Budgets on a fake clock whose live-code count is ``live``; the list counts storage reads."""
        clock = Clock()
        clock.advance(1000)
        counts = [0]

        async def count_live() -> int:
            counts[0] += 1
            return live

        counters = LimitsFailureCounters(LocalLimits(clock.seconds), 600)
        budgets = PairingBudgets(counters, per_ip, base, count_live, clock.seconds)
        return budgets, clock, counts

    def wait(self, budgets: PairingBudgets, ip: Optional[str], user: Optional[str] = None, service_wide: bool = True) -> int:
        """``retry_after`` for the caller."""
        return self.successResultOf(run(budgets.retry_after(ip, user, service_wide)))

    def fail_n(self, budgets: PairingBudgets, n: int, ip: Optional[str], user: Optional[str] = None) -> None:
        """Record ``n`` failures of the caller."""
        for _ in range(n):
            self.successResultOf(run(budgets.failed(ip, user)))

    def test_ip_window(self) -> None:
        """Ten failures lock the IP out until 600 s after the first one; the next window starts afresh."""
        budgets, clock, _ = self.make()
        self.fail_n(budgets, 9, "a")
        self.assertEqual(self.wait(budgets, "a"), 0)
        clock.advance(100)
        self.fail_n(budgets, 1, "a")
        self.assertEqual(self.wait(budgets, "a"), 500)
        self.assertEqual(self.wait(budgets, "b"), 0)
        clock.advance(499.5)
        self.assertEqual(self.wait(budgets, "a"), 1)
        clock.advance(0.5)
        self.assertEqual(self.wait(budgets, "a"), 0)
        self.fail_n(budgets, 9, "a")
        self.assertEqual(self.wait(budgets, "a"), 0)

    def test_user_budget(self) -> None:
        """Failures of an authenticated caller count per user too, across IPs."""
        budgets, _, _ = self.make()
        for i in range(10):
            self.fail_n(budgets, 1, "ip{}".format(i), "u")
        self.assertEqual(self.wait(budgets, "fresh", "u", service_wide=False), 600)
        self.assertEqual(self.wait(budgets, "fresh", None, service_wide=False), 0)

    def test_global_limit_formula(self) -> None:
        """200 / max(1, ⌈live/50⌉), never below 1."""
        self.assertEqual([global_limit(200, n) for n in (0, 1, 50, 51, 100, 101, 10000, 10**6)],
                         [200, 200, 200, 100, 100, 66, 1, 1])

    def test_global_budget_uses_cached_live_count(self) -> None:
        """The service-wide check counts live codes at most once a second, and only once failures exist."""
        budgets, clock, counts = self.make(live=120, base=9)  # 9 // 3 = 3
        self.assertEqual(self.wait(budgets, "x"), 0)
        self.assertEqual(counts[0], 0)
        for i in range(3):
            self.fail_n(budgets, 1, "ip{}".format(i))
        self.assertEqual(self.wait(budgets, "x"), 600)
        self.assertEqual(self.wait(budgets, "y"), 600)
        self.assertEqual(counts[0], 1)
        clock.advance(2)
        self.assertEqual(self.wait(budgets, "y"), 598)
        self.assertEqual(counts[0], 2)

    def test_check_raises_429(self) -> None:
        """``check`` raises RATE_LIMITED with Retry-After when over budget."""
        from pocketbridge.server.api.http import ApiError

        budgets, _, _ = self.make(per_ip=1)
        self.fail_n(budgets, 1, "a")
        failure = self.failureResultOf(run(budgets.check("a", None)), ApiError)
        self.assertEqual((failure.value.status, failure.value.code, failure.value.headers),
                         (429, "RATE_LIMITED", {"Retry-After": "600"}))


class SealerTests(SynchronousTestCase):
    """RecordSealer: AES-GCM bound to code and owner."""

    def test_round_trip_and_binding(self) -> None:
        """A record opens only for its code and owner and only under the key that sealed it."""
        sealer = RecordSealer(b"\x22" * 32)
        sealed = sealer.seal("123456", "u" * 64, b'{"secret":1}')
        self.assertNotIn(b"secret", sealed)
        self.assertEqual(sealer.open("123456", "u" * 64, sealed), b'{"secret":1}')
        self.assertIsNone(sealer.open("123457", "u" * 64, sealed))
        self.assertIsNone(sealer.open("123456", "v" * 64, sealed))
        self.assertIsNone(RecordSealer(b"\x23" * 32).open("123456", "u" * 64, sealed))
        self.assertIsNone(sealer.open("123456", "u" * 64, sealed[:-1] + bytes([sealed[-1] ^ 1])))
        self.assertNotEqual(sealer.seal("123456", "u" * 64, b"x"), sealer.seal("123456", "u" * 64, b"x"))
