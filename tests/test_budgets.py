"""
Exact failed-lookup budgets under concurrency (API.md §2, issue 9 item 4).

Hundreds of failed pairing lookups arrive at once, against a real
``twistd pocketbridge`` on SQLite (in-memory limits) and on PostgreSQL with
Redis (limits in Redis). However they interleave, the failures admitted in
one window never exceed the budget: a slot is taken from every budget that
applies before the storage lookup, and given back when the lookup succeeds.
Different client IPs are simulated with ``--trusted-proxies 127.0.0.1`` and
``X-Forwarded-For``. The in-memory reservation logic has unit tests below.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pocketbridge.server.api.http import ApiError
from pocketbridge.server.api.pairing_budget import LimitsFailureCounters, PairingBudgets
from pocketbridge.client import Client, DeviceKeys
from pocketbridge.client.pairing import Pake
from pocketbridge.client.rest import RestClient, RestResponse
from pocketbridge.server.cluster.limits import LocalLimits, RedisLimits
from tests.harness import PostgresMixin, ServerProcess, SQLiteMixin, redis_url, require_redis, start_server

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

PER_IP = 10
GLOBAL = 40
BURST = 300  # concurrent requests per phase (below the per-IP connection cap at accept)


def ip_of(i: int) -> str:
    """A distinct documentation-range address per index."""
    return "198.18.{}.{}".format(i // 250, i % 250 + 1)


class ConcurrentBudgets(_Base):
    """Bursts of concurrent failed lookups; mixed with a backend and TestCase below."""

    backend: str
    redis = False

    async def start(self) -> ServerProcess:
        """A server with small budgets and a REST budget that never binds."""
        return await start_server(self, redis=self.redis, args=[
            "--trusted-proxies", "127.0.0.1", "--pairing-failures-per-ip", str(PER_IP),
            "--pairing-failures-global", str(GLOBAL), "--rest-requests-per-minute", "1000000"])

    async def burst(self, server: ServerProcess, calls: Sequence[Tuple[str, str, Optional[str], Any]]) -> List[RestResponse]:
        """Send every (method, path, client ip, JSON body) at once; the responses in order."""
        rest = RestClient(reactor, server.http_url)
        ds = [Deferred.fromCoroutine(rest.request(method, path, body, headers={"X-Forwarded-For": ip} if ip else None))
              for method, path, ip, body in calls]
        return list(await gatherResults(ds, consumeErrors=True))

    def admitted(self, responses: List[RestResponse], failure_statuses: Sequence[int]) -> int:
        """How many were let through to a failed lookup; checks every other answer is a 429 with Retry-After."""
        admitted = 0
        for r in responses:
            if r.status in failure_statuses:
                admitted += 1
                continue
            self.assertEqual((r.status, r.json and r.json.get("code")), (429, "RATE_LIMITED"), r)
            retry = r.header("Retry-After")
            self.assertTrue(retry is not None and retry.isdigit() and 1 <= int(retry) <= 600, retry)
        return admitted

    async def test_v1_lookups_never_exceed_the_budgets(self) -> None:
        """300 concurrent failed v1 lookups from one IP admit exactly 10; then 300 from 300 IPs bring the total to exactly 40, never more."""
        server = await self.start()
        one_ip = await self.burst(server, [("GET", "/api/pairing/lookup/{:06d}".format(i), "203.0.113.9", None)
                                           for i in range(BURST)])
        from_one = self.admitted(one_ip, (404,))
        self.assertEqual(from_one, PER_IP)
        many = await self.burst(server, [("GET", "/api/pairing/lookup/{:06d}".format(i), ip_of(i), None)
                                         for i in range(BURST)])
        from_many = self.admitted(many, (404,))
        self.assertEqual(from_one + from_many, GLOBAL)

    async def test_v2_joins_and_fetches_never_exceed_the_budget(self) -> None:
        """300 concurrent v2 joins and sealed fetches of unknown codes, from 300 IPs, admit exactly 40 failures, never more."""
        server = await self.start()
        msg = Pake("B", "123456").message
        calls: List[Tuple[str, str, Optional[str], Any]] = []
        for i in range(BURST):
            code = "{:06d}".format(500000 + i)
            if i % 2:
                calls.append(("POST", "/api/pairing/v2/{}/join".format(code), ip_of(i), {"msg_b": msg}))
            else:
                calls.append(("GET", "/api/pairing/v2/{}/sealed?token={}".format(code, os.urandom(32).hex()), ip_of(i), None))
        failed = self.admitted(await self.burst(server, calls), (404,))
        self.assertEqual(failed, GLOBAL)

    async def test_successful_lookups_give_their_slot_back(self) -> None:
        """Redeeming 12 live codes concurrently from one IP succeeds for all 12: successes spend no failure budget."""
        server = await self.start()
        keys = DeviceKeys.generate()
        client = Client.for_device(reactor, server.ws_url, keys)
        self.addCleanup(client.close)
        await client.connect()
        rest = RestClient(reactor, server.http_url, keys.identity, keys.device_id)
        codes = ["{:06d}".format(700000 + i) for i in range(PER_IP + 2)]
        for code in codes:
            self.assertEqual((await rest.post("/api/pairing/store", {"code": code, "data": {"c": code}})).status, 200)
        # One at a time so each stays within the per-IP budget of concurrent reservations.
        got = [await RestClient(reactor, server.http_url).get("/api/pairing/lookup/" + c,
                                                                headers={"X-Forwarded-For": "203.0.113.50"})
               for c in codes]
        self.assertEqual([(r.status, r.json["data"]["c"]) for r in got], [(200, c) for c in codes])
        # The IP's budget is still whole: ten failures are admitted, then 429.
        wrong = await self.burst(server, [("GET", "/api/pairing/lookup/{:06d}".format(i), "203.0.113.50", None)
                                          for i in range(30)])
        self.assertEqual(self.admitted(wrong, (404,)), PER_IP)


    async def test_rest_budget_under_concurrency(self) -> None:
        """300 concurrent requests from one IP with 60 requests/minute: at most 60 plus the refill of the elapsed time get through; the rest are 429 with Retry-After."""
        server = await start_server(self, redis=self.redis, args=["--trusted-proxies", "127.0.0.1",
                                                                  "--rest-requests-per-minute", "60"])
        started = reactor.seconds()
        responses = await self.burst(server, [("GET", "/api/devices", "203.0.113.77", None) for _ in range(BURST)])
        elapsed = reactor.seconds() - started
        through = self.admitted(responses, (401,))
        self.assertTrue(1 <= through <= 60 + int(elapsed) + 1, (through, elapsed))


class ConcurrentBudgetsSQLite(ConcurrentBudgets, SQLiteMixin, TestCase):
    """Budgets in memory, storage in SQLite."""


class ConcurrentBudgetsPostgresRedis(ConcurrentBudgets, PostgresMixin, TestCase):
    """Budgets in Redis, storage in PostgreSQL."""

    redis = True


# ---------------------------------------------------------------- unit tests


class ReservationTests(SynchronousTestCase):
    """PairingBudgets.reserve over LocalLimits, with the storage lookup left pending."""

    def make(self, per_ip: int = 3, base: int = 5, live: int = 0) -> Tuple[PairingBudgets, Clock]:
        """Budgets on a fake clock with ``live`` live codes."""
        clock = Clock()
        clock.advance(1000)

        async def count_live() -> int:
            return live

        return PairingBudgets(LimitsFailureCounters(LocalLimits(clock.seconds), 600), per_ip, base,
                              count_live, clock.seconds), clock

    def reserve(self, budgets: PairingBudgets, ip: Optional[str], user: Optional[str] = None,
                service_wide: bool = True) -> Any:
        """The reservation, or the ApiError it was refused with."""
        d = Deferred.fromCoroutine(budgets.reserve(ip, user, service_wide))
        results: List[Any] = []
        d.addBoth(results.append)
        self.assertEqual(len(results), 1, "reserve waited on something")
        r = results[0]
        return r.value if hasattr(r, "value") and isinstance(r.value, ApiError) else r

    def test_concurrent_reservations_stop_at_the_budget(self) -> None:
        """While lookups are pending, only per_ip reservations of one IP are granted; the rest get 429 with Retry-After."""
        budgets, _ = self.make(per_ip=3)
        got = [self.reserve(budgets, "a") for _ in range(10)]
        granted = [g for g in got if not isinstance(g, ApiError)]
        refused = [g for g in got if isinstance(g, ApiError)]
        self.assertEqual(len(granted), 3)
        self.assertEqual({(e.status, e.headers["Retry-After"]) for e in refused}, {(429, "600")})

    def test_refund_reopens_a_slot_keep_does_not(self) -> None:
        """A refunded reservation frees its slot on every budget; a kept one stays counted."""
        budgets, _ = self.make(per_ip=2, base=100)
        first, second = self.reserve(budgets, "a"), self.reserve(budgets, "a")
        self.assertIsInstance(self.reserve(budgets, "a"), ApiError)
        first.refund()
        third = self.reserve(budgets, "a")
        self.assertNotIsInstance(third, ApiError)
        second.keep()
        second.refund()  # settled already: no effect
        self.assertIsInstance(self.reserve(budgets, "a"), ApiError)
        third.refund()
        self.assertNotIsInstance(self.reserve(budgets, "a"), ApiError)

    def test_global_budget_is_all_or_nothing(self) -> None:
        """A reservation refused by the service-wide budget takes nothing from the IP's budget."""
        budgets, _ = self.make(per_ip=3, base=2)
        self.reserve(budgets, "a").keep()
        self.reserve(budgets, "b").keep()
        refused = self.reserve(budgets, "c")
        self.assertIsInstance(refused, ApiError)
        # c's own budget is untouched: without the service-wide budget it still has all 3 slots.
        granted = [self.reserve(budgets, "c", service_wide=False) for _ in range(4)]
        self.assertEqual([isinstance(g, ApiError) for g in granted], [False, False, False, True])

    def test_refund_after_the_window_closed_does_not_credit_the_next(self) -> None:
        """A slot reserved in one window and refunded in the next gives nothing back to the new window."""
        budgets, clock = self.make(per_ip=1, base=100)
        old = self.reserve(budgets, "a")
        clock.advance(601)
        new = self.reserve(budgets, "a")
        self.assertNotIsInstance(new, ApiError)
        old.refund()
        self.assertIsInstance(self.reserve(budgets, "a"), ApiError)

    def test_user_budget_applies_across_ips(self) -> None:
        """An authenticated caller's reservations count against the user too, whatever the IP."""
        budgets, _ = self.make(per_ip=2, base=100)
        self.reserve(budgets, "ip1", "u")
        self.reserve(budgets, "ip2", "u")
        self.assertIsInstance(self.reserve(budgets, "ip3", "u"), ApiError)
        self.assertNotIsInstance(self.reserve(budgets, "ip3", None), ApiError)


class _Redis:
    """What RedisLimits needs of the node's RedisConnection: its command connection (None while Redis is down)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def command(self) -> Any:
        if self.conn is None:
            raise ConnectionError("redis unavailable")  # as RedisConnection.command
        return self.conn


class RedisReservationTests(TestCase):
    """RedisLimits' reservation scripts and bucket refund against the test Redis."""

    async def limits(self) -> RedisLimits:
        """RedisLimits on a fresh connection and a key prefix of its own."""
        import txredisapi
        from urllib.parse import urlparse

        require_redis(self)
        u = urlparse(redis_url())
        conn = await txredisapi.Connection(u.hostname or "127.0.0.1", u.port or 6379, reconnect=False)
        self.addCleanup(conn.disconnect)
        return RedisLimits(_Redis(conn),  # type: ignore[arg-type]
                            "pbtest:{}:".format(os.urandom(6).hex()), reactor.seconds)

    async def test_concurrent_reservations_are_exact(self) -> None:
        """20 reservations sent at once on two budgets (5 and 3 slots) grant exactly 3; a release frees one slot on both."""
        limits = await self.limits()
        budgets = [("ip:a", 5), ("global", 3)]
        results = await gatherResults([limits.reserve("t", budgets, 60) for _ in range(20)])
        granted = [r for r in results if r[0] is not None]
        self.assertEqual(len(granted), 3)
        self.assertTrue(all(r[1] >= 1 and r[2] == ["global"] for r in results if r[0] is None))
        await limits.release("t", granted[0][0])
        self.assertEqual(await limits.budget_count("t", "ip:a", 60), (2, 60))
        again = await limits.reserve("t", budgets, 60)
        self.assertIsNotNone(again[0])
        self.assertIsNone((await limits.reserve("t", budgets, 60))[0])

    async def test_release_after_the_window_closed_credits_nothing(self) -> None:
        """A ticket from a window that has closed gives nothing back to the next window."""
        limits = await self.limits()
        old, _, _ = await limits.reserve("t", [("ip:a", 1)], 60)
        await limits._conn().delete(limits._budget_key("t", "ip:a"))  # the window closes
        new, _, _ = await limits.reserve("t", [("ip:a", 1)], 60)
        self.assertIsNotNone(new)
        await limits.release("t", old)
        self.assertEqual((await limits.budget_count("t", "ip:a", 60))[0], 1)

    async def test_bucket_refund_and_local_fallback(self) -> None:
        """A refunded token can be taken again; with Redis gone a reservation falls back to local state and releases there."""
        limits = await self.limits()
        for _ in range(3):
            self.assertEqual(await limits.take("hs", "a", 0.001, 3), 0.0)
        self.assertGreater(await limits.take("hs", "a", 0.001, 3), 0.0)
        await limits.refund("hs", "a", 0.001, 3)
        self.assertEqual(await limits.take("hs", "a", 0.001, 3), 0.0)
        self.assertGreater(await limits.take("hs", "a", 0.001, 3), 0.0, "a refund gave back more than one token")
        limits.redis.conn = None  # type: ignore[attr-defined]
        ticket, _, _ = await limits.reserve("t", [("ip:b", 1)], 60)
        self.assertEqual(ticket[0], "local")
        self.assertIsNone((await limits.reserve("t", [("ip:b", 1)], 60))[0])
        await limits.release("t", ticket)
        self.assertIsNotNone((await limits.reserve("t", [("ip:b", 1)], 60))[0])


class LocalRefundTests(SynchronousTestCase):
    """LocalLimits.refund for token buckets."""

    def test_refund_gives_a_token_back_never_above_burst(self) -> None:
        """After a refund one more take succeeds; refunds never lift a bucket above its burst."""
        clock = Clock()
        limits = LocalLimits(clock.seconds)
        for _ in range(2):
            self.assertEqual(self.successResultOf(limits.take("hs", "a", 0.001, 2)), 0.0)
        self.assertGreater(self.successResultOf(limits.take("hs", "a", 0.001, 2)), 0.0)
        limits.refund("hs", "a", 0.001, 2)
        self.assertEqual(self.successResultOf(limits.take("hs", "a", 0.001, 2)), 0.0)
        for _ in range(5):
            limits.refund("hs", "a", 0.001, 2)
        taken = [self.successResultOf(limits.take("hs", "a", 0.001, 2)) for _ in range(3)]
        self.assertEqual([t == 0.0 for t in taken], [True, True, False])
