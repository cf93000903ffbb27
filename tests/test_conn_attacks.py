"""
Per-connection attacks against a real ``twistd`` (issue 9 items 1, 2 and C),
with an honest v2 sender and v1 + v2 receivers alongside (tests/abuse.py):
a WebSocket ping flood from an authenticated v2 or v1 socket that never
reads its pongs, the same flood before authentication, and a few hundred
concurrent failed handshakes from one IP. Judged by bounds a user would
notice: honest latencies under 1 s, bounded RSS, an exact failure budget.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from pocketbridge.client.connection import RawConnection
from tests.abuse import HonestTraffic, sleep, start_abuse_server

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: Seconds each flood lasts.
FLOOD = 4.0


async def attack(server: Any, *args: str) -> Dict[str, Any]:
    """Run tests/conn_attack.py in its own process; its JSON report."""
    argv = [os.path.join(HERE, "conn_attack.py"), args[0], "127.0.0.1", str(server.port)] + list(args[1:])
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    d = getProcessOutputAndValue(sys.executable, argv, env=env, path=ROOT)
    d.addTimeout(60, reactor)
    out, err, code = await d
    lines = out.decode("utf-8", "replace").strip().splitlines()
    if code != 0 or not lines:
        raise AssertionError("attack failed (exit {}): {}".format(code, err.decode("utf-8", "replace")[-3000:]))
    return dict(json.loads(lines[-1]))


class PingFloodTests(TestCase):
    """A ping flood costs the attacker, not the node."""

    timeout = 120

    async def _flood(self, *args: str, rss_growth_mb: float = 64) -> Dict[str, Any]:
        server = await start_abuse_server(self)
        async with HonestTraffic(server, cooldown=5.0) as honest:
            result = await attack(server, *args)
            await sleep(1.0)  # the node must be responsive right after the attacker leaves
        sys.stderr.write("{} -> attacker {} honest {}\n".format(args, result, json.dumps(honest.report())))
        self.assertNotIn("error", result)
        honest.assert_unharmed(self, rss_growth_mb=rss_growth_mb, max_fds=200)
        return result

    async def test_v2_authenticated_ping_flood(self) -> None:
        """A v2 socket sending pings for 4 s without reading: honest delivery, acks and /health stay under 1 s."""
        await self._flood("auth-ping-flood", str(FLOOD), "2")

    async def test_v1_authenticated_ping_flood(self) -> None:
        """A v1 socket sending pings for 4 s without reading: honest delivery, acks and /health stay under 1 s."""
        await self._flood("auth-ping-flood", str(FLOOD), "1")

    async def test_preauth_ping_flood(self) -> None:
        """Pings before authentication for 4 s: at most 8 are answered per connection, which is closed 1008; RSS grows < 32 MiB."""
        result = await self._flood("preauth-ping-flood", str(FLOOD), rss_growth_mb=32)
        self.assertLessEqual(result["pongs"], 8 * result["connections"])
        self.assertEqual(result["closes"], [1008] * result["connections"])


class HandshakeBudgetTests(TestCase):
    """Concurrent failed handshakes from one IP never exceed the per-IP budget (§12)."""

    timeout = 120

    async def test_concurrent_bad_handshakes(self) -> None:
        """300 upgraded connections each fail their handshake at once: at most the budget (20 + refill) fail 1008, the rest get 4029."""
        server = await start_abuse_server(self, args=["--conn-per-ip-burst", "1000"])
        conns: List[RawConnection] = list(await gatherResults(
            [RawConnection.open(reactor, server.ws_url, timeout=30) for _ in range(300)]))
        for conn in conns:
            proto: Any = conn.protocol
            if conn.close_info is None and proto.state == proto.STATE_OPEN:
                proto.sendMessage(b"not json")  # a failed handshake (1008 Invalid message format)
        infos = await gatherResults([conn.closed.addTimeout(30, reactor) for conn in conns])
        codes = [info[0] for info in infos]
        sys.stderr.write("close codes: 1008={} 4029={} other={}\n".format(
            codes.count(1008), codes.count(4029), len(codes) - codes.count(1008) - codes.count(4029)))
        self.assertLessEqual(codes.count(1008), 25)
        self.assertEqual(codes.count(1008) + codes.count(4029), 300)
