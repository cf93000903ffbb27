"""
Abuse: the handshake-failure budget per client IP under concurrency (issue
9 "What to build" C; PROTOCOL.md §12: 20 failures per IP per minute, then
new connections are closed 4029 right after the upgrade) against a real
``twistd``.

100 v1 connections from one IP open at once, all receive their
``server_hello``, then all send a ``client_auth`` signed with the wrong key.
A budget checked at open and charged at failure lets all 100 fail; a budget
reserved at open admits exactly 20 failures (1008 ``Invalid client
signature``; plus one per 3 s the attack lasts, as the bucket refills);
every other connection is closed 4029.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from twisted.trial.unittest import TestCase

from tests.abuse import run_attack, start_abuse_server
from tests.harness import PostgresMixin, SQLiteMixin

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

BUDGET = 20  # handshake_failures_per_ip default
CONCURRENT = 100


class HandshakeFailures(_Base):
    """The handshake-failure budget holds exactly; mixed with a backend and TestCase below."""

    async def test_concurrent_bad_signatures_spend_exactly_the_budget(self) -> None:
        """100 concurrent handshakes with a wrong signature from one IP: exactly 20 (plus any refill meanwhile) end 1008, the others are closed 4029."""
        server = await start_abuse_server(self, ["--conn-per-ip-burst", "1000"])
        result = await run_attack(server, "bad-auth", "--source", "127.0.0.7", "--count", str(CONCURRENT))
        print("bad signatures, budget {}: {}".format(BUDGET, json.dumps(result)))
        outcomes = result["outcomes"]
        failed = outcomes.get("close 1008 Invalid client signature", 0)
        refill = math.floor(result["seconds"] * BUDGET / 60.0)  # the bucket refills 20 per minute
        self.assertEqual(set(outcomes), {"close 1008 Invalid client signature", "close 4029"}, result)
        self.assertEqual(sum(outcomes.values()), CONCURRENT, result)
        self.assertGreaterEqual(failed, BUDGET, result)
        self.assertLessEqual(failed, BUDGET + refill, "{} handshake failures admitted in {:.1f} s; budget {} (+{} refilled)"
                             .format(failed, result["seconds"], BUDGET, refill))
        code, _ = await server.http_get("/health")
        self.assertEqual(code, 200)


class HandshakeFailuresSQLite(HandshakeFailures, SQLiteMixin, TestCase):
    """Handshake-failure budget on SQLite."""


class HandshakeFailuresPostgres(HandshakeFailures, PostgresMixin, TestCase):
    """Handshake-failure budget on PostgreSQL."""
