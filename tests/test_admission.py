"""
Admission before parsing (PROTOCOL.md §12) against a real ``twistd`` whose
file-descriptor limit is lowered to 256 (soft and hard), with an honest
user's traffic (a v2 sender, v2 and v1 receivers on 127.0.0.1) alongside.

- One IP, many half-sent upgrade heads: the per-IP cap (40 here) closes the
  rest at accept, the head deadline (3 s here) drops the admitted ones, and
  the server's descriptors stay near its baseline plus the cap.
- Many IPs filling the node: the node cap derived from the fd limit
  (256 - 64 reserved - 4 pool = 188) refuses at accept before the process
  runs out of descriptors, a monitor on a fresh address (127.0.0.2) still
  gets /health from the reserved slots in < 1 s, and established sessions
  keep delivering.

Attacks run in their own process (``tests/test_abuse_wire.py slowloris``),
loopback only, a few seconds each; judged by bounds, not exact timings.
"""

from __future__ import annotations

import json
import re
import time
from typing import List, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from tests.abuse import HonestTraffic, LimitedServer, open_fds, run_attack, sleep, start_abuse_server

NOFILE = 256
HEAD_DEADLINE = 3.0
MONITOR = "127.0.0.2"  # an address that holds nothing else on the node


async def get_from(server: LimitedServer, path: str, source: str, timeout: float = 5.0) -> Tuple[int, bytes]:
    """``GET path`` over a fresh connection bound to ``source``: (status, body)."""
    agent = Agent(reactor, bindAddress=(source, 0), pool=HTTPConnectionPool(reactor, persistent=False))
    d = agent.request(b"GET", (server.http_url + path).encode("ascii"))
    d.addTimeout(timeout, reactor)
    response = await d
    return response.code, await readBody(response)


def limit_hits(metrics: bytes, limit: str) -> float:
    """``pocketbridge_limit_hits_total{limit=...}`` from a /metrics page (0 when absent)."""
    m = re.search(r'^pocketbridge_limit_hits_total\{limit="%s"\} ([0-9.e+]+)$' % re.escape(limit),
                  metrics.decode("utf-8"), re.M)
    return float(m.group(1)) if m else 0.0


class AdmissionUnderAttack(TestCase):
    """Half-sent requests at a lowered fd limit, with honest traffic alongside."""

    def honest_figures_ok(self, honest: HonestTraffic) -> None:
        """Every honest event acked and delivered once to v1 and v2, all within 1 s, no honest socket closed."""
        r = honest.report()
        self.assertTrue(r["sent"] > 0 and r["acked"] == r["sent"] and not r["send_errors"], json.dumps(r))
        self.assertEqual(r["closed"], {}, json.dumps(r))
        self.assertLess(r["ack_max_ms"], 1000, json.dumps(r))
        for name in ("v2", "v1"):
            self.assertEqual((r[name]["missing"], r[name]["duplicates"]), (0, 0), json.dumps(r))
            self.assertLess(r[name]["delivery_max_ms"], 1000, json.dumps(r))

    async def test_one_ip_is_capped_at_accept_and_dropped_at_the_head_deadline(self) -> None:
        """300 half-sent upgrades from one IP at fd limit 256: 40 admitted, all dropped by 3 s; honest user unharmed."""
        server = await start_abuse_server(self, args=["--conn-open-per-ip", "40", "--request-head-timeout",
                                                      str(HEAD_DEADLINE)], nofile=NOFILE)
        async with HonestTraffic(server) as honest:
            attack = Deferred.fromCoroutine(run_attack(server, "slowloris", "--source", "127.0.0.3",
                                                       "--count", "300", "--seconds", "9"))
            await sleep(2.0)
            during = await honest.probe_connect()
            result = await attack
            after = await honest.probe_connect()
        print("one-ip slowloris: attacker {} honest {}".format(json.dumps(result), json.dumps(honest.report())))
        self.assertEqual(result["still_open_at_end"], 0, result)
        self.assertLess(during, 1.0, honest.probe_errors)
        self.assertLess(after, 1.0, honest.probe_errors)
        honest.assert_unharmed(self, rss_growth_mb=64, max_fds=honest.fds_start + 40 + 24)
        self.assertNotIn("Too many open files", server.log_text())

    async def test_full_node_refuses_at_accept_and_still_answers_health(self) -> None:
        """240 half-sent heads from 4 IPs against a node cap of 188: no EMFILE, /health from a monitor < 1 s, sessions deliver."""
        server = await start_abuse_server(self, args=["--request-head-timeout", str(HEAD_DEADLINE)], nofile=NOFILE)
        monitor: List[float] = []
        monitor_errors: List[str] = []
        fds: List[int] = []
        stop: List[bool] = []

        async def poll() -> None:
            while not stop:
                started = time.monotonic()
                try:
                    code, _ = await get_from(server, "/health", MONITOR)
                    if code != 200:
                        monitor_errors.append("HTTP {}".format(code))
                    monitor.append(time.monotonic() - started)
                except Exception as e:
                    monitor_errors.append("{}: {}".format(type(e).__name__, e))
                assert server.pid is not None
                fds.append(open_fds(server.pid))
                await sleep(0.2)

        async with HonestTraffic(server, health_interval=3600) as honest:
            polling = Deferred.fromCoroutine(poll())
            attacks = gatherResults([
                Deferred.fromCoroutine(run_attack(server, "slowloris", "--source", "127.0.0.%d" % i,
                                                  "--count", "60", "--seconds", "8"))
                for i in (3, 4, 5, 6)
            ], consumeErrors=True)
            results = await attacks
            stop.append(True)
            await polling
            after = await honest.probe_connect()
        code, metrics = await get_from(server, "/metrics", MONITOR)
        print("node cap: attackers {} monitor max {:.0f} ms errors {} fds max {} honest {}".format(
            json.dumps(results), 1000 * max(monitor, default=0), monitor_errors, max(fds, default=0),
            json.dumps(honest.report())))
        self.assertEqual(code, 200)
        self.assertGreater(limit_hits(metrics, "connections_per_node"), 0, "the node cap was never reached")
        self.assertGreater(limit_hits(metrics, "connections_per_node_restricted"), 0,
                           "no /health was served from the reserved slots")
        self.assertEqual(monitor_errors, [])
        self.assertLess(max(monitor), 1.0)
        self.assertLess(max(fds), NOFILE - 16, "the process came close to its fd limit")
        self.assertEqual([r["still_open_at_end"] for r in results], [0, 0, 0, 0], results)
        self.assertLess(after, 1.0, honest.probe_errors)
        self.honest_figures_ok(honest)
        self.assertNotIn("Too many open files", server.log_text())
