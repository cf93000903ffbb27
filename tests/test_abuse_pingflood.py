"""
Abuse: WebSocket ping floods (issue 9, items 1 and 2) against a real
``twistd`` with an honest user's traffic alongside (``tests.abuse``).

A device sends WebSocket PING frames as fast as its socket takes them and
never reads the pongs (its receive buffer is 16 KiB), for 5 s (8 s at most
before authentication), after authenticating (v1 or v2) or right
after the upgrade. PROTOCOL.md §12: pings count toward the per-socket frame
limit (the server stops reading); before authentication they are
unexpected messages (§4.3, the 9th closes 1008) and unsent bytes are capped
at 64 KiB, so the connection ends; no client can make the server hold
unbounded outbound data. What the honest user must see: acks
and deliveries under 1 s, /health under 1 s, every event exactly once; the
server's RSS and fds stay bounded.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Dict

from twisted.trial.unittest import TestCase

from tests.abuse import HonestTraffic, run_attack, sleep, start_abuse_server
from tests.harness import SQLiteMixin

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

FLOOD_SECONDS = 5.0
RSS_GROWTH_MB = 64  # an authenticated socket may hold up to 24 MiB unsent (outbound_max_bytes) before 4008
PREAUTH_RSS_GROWTH_MB = 8  # before authentication only 64 KiB
FD_GROWTH = 32
PREAUTH_SECONDS = 8.0  # the flood stops early once the server drops it


class PingFlood(_Base):
    """Ping floods with honest traffic alongside; mixed with a backend and TestCase below."""

    async def flood(self, version: int, seconds: float = FLOOD_SECONDS, rss_growth_mb: float = RSS_GROWTH_MB) -> Dict[str, Any]:
        """Run the flood with honest traffic around it; assert the honest user saw nothing; the attacker's figures."""
        server = await start_abuse_server(self)
        async with HonestTraffic(server, cooldown=10.0) as honest:
            await sleep(1.0)
            honest.mark("attack")
            attack = await run_attack(server, "ping-flood", "--version", str(version), "--seconds",
                                      str(seconds))
            honest.mark("after")
            await sleep(3.0)  # the node must be fine after the attacker left, too
        print("ping flood v{}: attacker {} honest {}".format(version, json.dumps(attack), json.dumps(honest.report())))
        honest.assert_unharmed(self, rss_growth_mb=rss_growth_mb, max_fds=honest.fds_start + FD_GROWTH)
        return attack

    async def test_authenticated_v1_ping_flood(self) -> None:
        """A v1 device flooding pings for 5 s leaves the honest user's delivery, acks and /health under 1 s and RSS bounded."""
        await self.flood(1)

    async def test_authenticated_v2_ping_flood(self) -> None:
        """A v2 device flooding pings for 5 s leaves the honest user's delivery, acks and /health under 1 s and RSS bounded."""
        await self.flood(2)

    async def test_preauth_ping_flood_is_dropped(self) -> None:
        """Pings right after the upgrade: the server ends the connection, its RSS grows < 8 MiB and the honest user is unharmed."""
        attack = await self.flood(0, PREAUTH_SECONDS, PREAUTH_RSS_GROWTH_MB)
        self.assertIsNotNone(attack["closed_by_server_after_s"],
                             "the server kept an unauthenticated ping flood open: {}".format(attack))


class PingFloodSQLite(PingFlood, SQLiteMixin, TestCase):
    """Ping floods on SQLite."""
