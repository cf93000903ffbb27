"""
Abuse: a v1 receiver that stops reading for 10 s under honest load, then
resumes (issue 9, items 1 and 13; PROTOCOL.md §12 "v1 outbound buffer")
against a real ``twistd``.

The honest sender uploads 60 events/s of 36 KiB each (~2.9 MB/s of base64)
while the user's v1 device does not read; the server is started with
``--outbound-pause-bytes`` of 1 MiB, so it must stop sending to that
socket, keep its own memory bounded, and resume from the database when
the device reads again, in pages that respect the same bound. Meanwhile the
v2 receiver keeps getting every event in < 1 s and /health answers in < 1 s;
afterwards every event has reached the v1 device exactly once.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from twisted.trial.unittest import TestCase

from tests.abuse import MIB, HonestTraffic, sleep, start_abuse_server
from tests.harness import PostgresMixin, SQLiteMixin

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

STALL = 10.0
RATE = 60.0
PAYLOAD = 36 * 1024  # raw bytes; 48 KiB of base64 on the wire
PAUSE_BYTES = 1 * MIB
RSS_GROWTH_MB = 24  # ~29 MB are stored during the stall; holding all of it at once is what must not happen


class StalledReceiver(_Base):
    """A stalled v1 receiver with honest traffic alongside; mixed with a backend and TestCase below."""

    async def test_stalled_v1_receiver_resumes_without_harm(self) -> None:
        """A v1 device that stops reading for 10 s gets every event once after it resumes; the others see < 1 s latency, RSS stays bounded."""
        server = await start_abuse_server(self, ["--outbound-pause-bytes", str(PAUSE_BYTES)])
        async with HonestTraffic(server, rate=RATE, payload_bytes=PAYLOAD, cooldown=20.0) as honest:
            await sleep(1.0)
            v1 = honest.clients["v1"].raw
            assert v1 is not None
            v1.pause_reading()
            await sleep(STALL)
            v1.resume_reading()
            await sleep(3.0)
        print("stalled v1 receiver: honest {}".format(json.dumps(honest.report())))
        honest.assert_unharmed(self, rss_growth_mb=RSS_GROWTH_MB, max_fds=honest.fds_start + 32,
                               latency_receivers=("v2",))


class StalledReceiverSQLite(StalledReceiver, SQLiteMixin, TestCase):
    """A stalled v1 receiver on SQLite."""


class StalledReceiverPostgres(StalledReceiver, PostgresMixin, TestCase):
    """A stalled v1 receiver on PostgreSQL."""
