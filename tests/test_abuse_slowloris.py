"""
Abuse: half-sent requests (issue 9, item 3; PROTOCOL.md §12) against a real
``twistd`` whose file-descriptor limit is 1024, with an honest user's
traffic alongside on 127.0.0.1.

- Slowloris: 1,100 connections from one IP (127.0.0.3) each trickle an
  upgrade request head one byte per second and never finish it. At most 512
  per IP are admitted (counted from TCP accept), every one is dropped by the
  10 s request-head deadline, the server never runs out of descriptors, and
  the honest user keeps connecting, syncing and reading /health in < 1 s.
- A chunked REST body at one byte per second is dropped once the body's
  minimum rate (1 KiB/s after the first 10 s) fails.

The defaults are used (no shortened deadlines), so the attack lasts 15 s.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, List

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from tests.abuse import HonestTraffic, run_attack, sleep, start_abuse_server
from tests.harness import SQLiteMixin

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

NOFILE = 1024
ATTACKERS = 1100
PER_IP = 512  # open connections per client IP (default)
HEAD_DEADLINE = 10.0  # request head (default)
BODY_DROP_BY = 15.0  # 10 s grace, then < 1 KiB/s fails at once; 5 s of margin (the attacker looks once a second)
SECONDS = 15.0


class HalfSentRequests(_Base):
    """Slowloris and a slow body with honest traffic alongside; mixed with TestCase below."""

    async def probe_while(self, honest: HonestTraffic, attack: "Deferred[Any]") -> None:
        """Connect a new honest device every 2 s until ``attack`` fires."""
        done: List[bool] = []
        attack.addBoth(lambda r: (done.append(True), r)[1])
        await sleep(2.0)
        while not done:
            await honest.probe_connect()
            await sleep(2.0)

    async def test_slowloris_and_slow_body_are_dropped(self) -> None:
        """1,100 half-sent upgrade heads from one IP and a 1 B/s body: capped at 512, dropped by the deadlines; the honest user is unharmed."""
        server = await start_abuse_server(self, nofile=NOFILE)
        async with HonestTraffic(server) as honest:
            await sleep(1.0)
            attacks = gatherResults([
                Deferred.fromCoroutine(run_attack(server, "slowloris", "--source", "127.0.0.3", "--count",
                                                  str(ATTACKERS), "--seconds", str(SECONDS))),
                Deferred.fromCoroutine(run_attack(server, "slow-body", "--seconds", str(SECONDS + 3))),
            ], consumeErrors=True)
            await self.probe_while(honest, attacks)
            slowloris, body = await attacks
            await sleep(1.0)
        print("slowloris: attacker {} slow body {} honest {}".format(
            json.dumps(slowloris), json.dumps(body), json.dumps(honest.report())))
        self.assertEqual(slowloris["still_open_at_end"], 0,
                         "half-sent heads still open after {} s: {}".format(SECONDS, slowloris))
        self.assertLessEqual(slowloris["last_close_at_s"] or 0, HEAD_DEADLINE + 4.0, slowloris)
        self.assertIsNotNone(body["closed_by_server_after_s"], "a 1 B/s body was never dropped: {}".format(body))
        self.assertLessEqual(body["closed_by_server_after_s"], BODY_DROP_BY, body)
        self.assertTrue(honest.probes, "no connection probe ran")
        honest.assert_unharmed(self, rss_growth_mb=64, max_fds=honest.fds_start + PER_IP + 64)


class HalfSentRequestsSQLite(HalfSentRequests, SQLiteMixin, TestCase):
    """Half-sent requests on SQLite (admission happens before any storage is touched)."""
