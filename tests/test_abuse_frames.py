"""
Abuse: v2 junk ``ack`` frames while one delivery is unacknowledged (issue 9,
item 5) against a real ``twistd``, with an honest user's traffic alongside.

PROTOCOL.md §12 exempts from the per-socket frame limit (200/s, burst 1000)
only acks that match an event sent on the socket and not yet acknowledged.
The attacker receives one event, never acks it, and sends ``ack {seq: 0}``
frames (which match nothing) as fast as it can, with an app-level ``ping``
after every 100: each pong proves the server read and handled 101 frames.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from twisted.trial.unittest import TestCase

from tests.abuse import HonestTraffic, cpu_seconds, run_attack, sleep, start_abuse_server
from tests.harness import SQLiteMixin

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

SECONDS = 4.0
RATE, BURST = 200, 1000  # the defaults of frames_per_socket_rate / _burst
PING_EVERY = 100


class JunkAcks(_Base):
    """Junk acks with honest traffic alongside; mixed with a backend and TestCase below."""

    async def test_junk_acks_count_toward_the_frame_limit(self) -> None:
        """Acks that match nothing are held to rate + burst frames (here <= 2,200 in 4 s) and the honest user is unharmed."""
        server = await start_abuse_server(self)
        assert server.pid is not None
        async with HonestTraffic(server) as honest:
            await sleep(1.0)
            cpu_before = cpu_seconds(server.pid)
            attack = await run_attack(server, "junk-acks", "--seconds", str(SECONDS), "--ping-every", str(PING_EVERY))
            cpu = cpu_seconds(server.pid) - cpu_before
            await sleep(2.0)
        attack["server_cpu_s"] = round(cpu, 2)
        print("junk acks: attacker {} honest {}".format(json.dumps(attack), json.dumps(honest.report())))
        self.assertTrue(attack["unacked_seqs"], "the attacker never had an unacknowledged delivery: {}".format(attack))
        bound = BURST + RATE * SECONDS + 2 * (PING_EVERY + 1)  # two pings of slack for timing at the edges
        self.assertLessEqual(attack["frames_answered"], bound,
                             "the server handled {frames_answered} junk frames in {seconds} s".format(**attack))
        honest.assert_unharmed(self, rss_growth_mb=64, max_fds=honest.fds_start + 32)


class JunkAcksSQLite(JunkAcks, SQLiteMixin, TestCase):
    """Junk acks on SQLite."""
