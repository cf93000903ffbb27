"""
Abuse: REST budgets under concurrency (issue 9, item 4 and "What to build"
C; API.md §2) against a real ``twistd`` on SQLite and PostgreSQL.

500 concurrent lookups of unknown codes arrive at once. A budget that is
checked, then storage awaited, then the failure counted lets most of them
through; a budget reserved before the await admits exactly its size. Every
answer is then either the failure itself (404) or 429 ``RATE_LIMITED``.
The per-IP request budget is held exactly the same way.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from tests.abuse import start_abuse_server
from tests.harness import PostgresMixin, SQLiteMixin

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

CONCURRENT = 500


class _FromSource:
    """An Agent endpoint factory whose connections come from the local address ``source``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def endpointForURI(self, uri: Any) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(reactor, uri.host.decode(), uri.port, timeout=20, bindAddress=(self.source, 0))


async def _request(agent: Agent, method: bytes, url: str, body: Optional[bytes]) -> int:
    """One request on a fresh connection: its status code."""
    from io import BytesIO

    producer = FileBodyProducer(BytesIO(body)) if body is not None else None
    headers = Headers({b"Content-Type": [b"application/json"]}) if body is not None else None
    response = await agent.request(method, url.encode(), headers, producer)
    await readBody(response)
    return int(response.code)


async def concurrently(base: str, method: bytes, paths: Sequence[str], sources: Sequence[str],
                       body: Optional[bytes] = None) -> Tuple[Counter, float]:
    """Send every request at once, round-robin over ``sources``: how many answers of each status, and the seconds it took."""
    started = time.monotonic()
    agents = [Agent.usingEndpointFactory(reactor, _FromSource(s), pool=HTTPConnectionPool(reactor, persistent=False))
              for s in sources]
    results: List[Any] = await gatherResults(
        [Deferred.fromCoroutine(_request(agents[i % len(agents)], method, base + p, body))
         for i, p in enumerate(paths)],
        consumeErrors=True)
    return Counter(results), time.monotonic() - started


def unknown_codes(n: int) -> List[str]:
    """``n`` distinct 6-digit codes (no code is stored on the fresh server)."""
    codes = set()
    while len(codes) < n:
        codes.add("{:06d}".format(int.from_bytes(os.urandom(4), "big") % 1000000))
    return sorted(codes)


class PairingBudgets(_Base):
    """Failed-lookup budgets hold exactly under 500 concurrent requests; mixed with a backend below."""

    def assertSpent(self, counts: Counter, ok: int, budget: int, per_second: float, elapsed: float, total: int) -> None:
        """
        Exactly ``budget`` answers were ``ok`` (plus what the bucket refilled
        at ``per_second`` while the requests ran), all others 429.
        """
        refill = math.floor(per_second * elapsed)
        self.assertEqual(set(counts), {ok, 429}, counts)
        self.assertEqual(sum(counts.values()), total)
        self.assertGreaterEqual(counts[ok], budget, counts)
        self.assertLessEqual(counts[ok], budget + refill,
                             "{} answers {} in {:.1f} s; the budget is {} (+{} refilled)".format(
                                 counts[ok], ok, elapsed, budget, refill))

    async def test_v1_lookup_per_ip_budget_is_exact(self) -> None:
        """500 concurrent failed v1 lookups from one IP: exactly the per-IP budget (50, plus any refill meanwhile) answer 404, the rest 429."""
        server = await start_abuse_server(self, ["--rest-requests-per-minute", "100000",
                                                 "--pairing-failures-per-ip", "50",
                                                 "--pairing-failures-global", "100000"])
        paths = ["/api/pairing/lookup/" + c for c in unknown_codes(CONCURRENT)]
        counts, elapsed = await concurrently(server.http_url, b"GET", paths, ["127.0.0.5"])
        print("v1 lookups, per-IP budget 50: {} in {:.1f} s".format(json.dumps(counts), elapsed))
        self.assertSpent(counts, 404, 50, 50 / 600.0, elapsed, CONCURRENT)

    async def test_v2_join_global_budget_is_exact(self) -> None:
        """500 concurrent failed v2 joins from 10 IPs: exactly the service-wide budget (100, plus any refill meanwhile) answer 404, the rest 429."""
        server = await start_abuse_server(self, ["--rest-requests-per-minute", "100000",
                                                 "--pairing-failures-per-ip", "100000",
                                                 "--pairing-failures-global", "100"])
        paths = ["/api/pairing/v2/{}/join".format(c) for c in unknown_codes(CONCURRENT)]
        sources = ["127.0.0.{}".format(10 + i) for i in range(10)]
        counts, elapsed = await concurrently(server.http_url, b"POST", paths, sources, body=b'{"msg_b":"AAAA"}')
        print("v2 joins, global budget 100: {} in {:.1f} s".format(json.dumps(counts), elapsed))
        self.assertSpent(counts, 404, 100, 100 / 600.0, elapsed, CONCURRENT)


    async def test_rest_request_budget_is_exact(self) -> None:
        """300 concurrent requests from one IP with a budget of 100 per minute: 100 are served (401 here; plus any token refilled meanwhile), the rest get 429."""
        server = await start_abuse_server(self, ["--rest-requests-per-minute", "100"])
        counts, elapsed = await concurrently(server.http_url, b"GET", ["/api/devices"] * 300, ["127.0.0.8"])
        print("REST requests, budget 100/min: {} in {:.1f} s".format(json.dumps(counts), elapsed))
        self.assertSpent(counts, 401, 100, 100 / 60.0, elapsed, 300)


class PairingBudgetsSQLite(PairingBudgets, SQLiteMixin, TestCase):
    """Pairing budgets on SQLite."""


class PairingBudgetsPostgres(PairingBudgets, PostgresMixin, TestCase):
    """Pairing budgets on PostgreSQL."""
