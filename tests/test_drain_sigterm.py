"""
SIGTERM under load (issue 9 item 16, "What to build" D): a socket stops
reading, the events it has read are committed and acknowledged, then it
closes 1001. Every event the server stored was acknowledged to its sender.
"""

from __future__ import annotations

import base64
import os
import signal
import sys
import sqlite3
from typing import Any, List, Set

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from pocketbridge.client import Client, Identity
from tests.abuse import sleep
from tests.harness import ServerProcess


class SigtermAckTests(TestCase):
    """No event is committed and left unacknowledged at a SIGTERM."""

    timeout = 90

    async def _sigterm(self, version: int) -> None:
        # 100 ms batches keep events in flight at the moment of the close.
        server = ServerProcess(args=["--writer-delay-ms", "100", "--shutdown-window", "1"])
        self.addCleanup(server.cleanup)
        await server.start()
        senders: List[Client] = []
        acked: Set[str] = set()
        for n in range(4):
            client = Client(reactor, server.ws_url, Identity.generate(), protocol_version=version,
                            keep_history=False, handshake_timeout=10)
            await client.connect()
            senders.append(client)
        payload = base64.b64encode(os.urandom(48)).decode()
        stop = [False]

        async def send_loop(client: Client, name: str) -> None:
            while not stop[0] and client.raw is not None and client.raw.close_info is None:
                d = client.send_event_nowait("clipboard:main", "clipboard:text", payload)

                def ok(ack: Any) -> None:
                    if isinstance(ack, dict) and type(ack.get("seq")) is int:
                        acked.add("{}@{}".format(ack["seq"], name))

                d.addCallbacks(ok, lambda f: None)
                await sleep(0.004)

        loops = [Deferred.fromCoroutine(send_loop(c, "c{}".format(k))) for k, c in enumerate(senders)]
        await sleep(1.0)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        closes = []
        for client in senders:
            assert client.raw is not None
            closes.append(await client.raw.closed)
        stop[0] = True
        for d in loops:
            await d
        await server.stop()
        self.assertEqual({c[0] for c in closes}, {1001})
        db = sqlite3.connect(os.path.join(server.data_dir, "pocketbridge.sqlite3"))
        try:
            rows = db.execute("SELECT e.seq, e.user_id FROM events e").fetchall()
        finally:
            db.close()
        users = {}
        for k, client in enumerate(senders):
            users[client.identity.user_id] = "c{}".format(k)
        stored = {"{}@{}".format(seq, users[user]) for seq, user in rows}
        sys.stderr.write("v{}: stored {}, committed but unacked {}\n".format(version, len(stored), len(stored - acked)))
        self.assertGreater(len(stored), 50)
        self.assertEqual(stored - acked, set(), "committed but never acknowledged")

    async def test_v1_committed_events_are_acked_before_1001(self) -> None:
        """v1 senders at SIGTERM: every stored event was acked before the 1001 close."""
        await self._sigterm(1)

    async def test_v2_committed_events_are_acked_before_1001(self) -> None:
        """v2 senders at SIGTERM: every stored event was acked before the 1001 close."""
        await self._sigterm(2)
