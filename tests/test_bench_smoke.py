"""
A smoke test of ``pocketbridge-bench``: its JSON mode, with tiny sizes,
against a real ``twistd pocketbridge`` (SQLite) started with the raised
limits docs/benchmarks.md prescribes.

It proves the benchmark runs end to end and reports every headline number,
its baseline and their ratio; it says nothing about how fast the server is.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.harness import postgres_base_url, require_postgres, start_server

#: The server options of docs/benchmarks.md: limits out of the way of the load generator.
RAISED_LIMITS = [
    "--conn-per-ip-burst", "100000", "--conn-per-ip-rate", "100000",
    "--sockets-per-user", "100000", "--sockets-per-device", "100000",
    "--events-per-device-rate", "1000000", "--events-per-device-burst", "1000000",
    "--events-per-user-rate", "1000000", "--events-per-user-burst", "1000000",
    "--frames-per-socket-rate", "1000000", "--frames-per-socket-burst", "1000000",
]

TINY = [
    "--handshakes", "20", "--concurrency", "10", "--connections", "100", "--duration", "0.5", "--warmup", "0.2",
    "--users", "2", "--window", "4", "--rate", "100", "--rate-duration", "0.5", "--backlog", "200",
    "--fanout-devices", "3", "--baseline-duration", "0.3",
]

#: Headline key → the baseline key it is compared with → the ratio key.
EXPECTED = {
    "handshakes_per_s": ("baseline_ws_connects_per_s", "handshakes_ratio"),
    "events_per_s": ("baseline_ws_roundtrips_per_s", "events_ratio"),
    "latency_p50_ms": ("baseline_latency_p50_ms", "latency_p50_ratio"),
    "latency_p99_ms": ("baseline_latency_p99_ms", "latency_p99_ratio"),
    "rss_per_conn_kib": ("baseline_ws_rss_per_conn_kib", "rss_per_conn_ratio"),
    "catchup_events_per_s": ("baseline_storage_read_rows_per_s", "catchup_ratio"),
}
OTHER_BASELINES = ("baseline_pg_commits_per_s", "baseline_pg_rows_per_s", "baseline_sqlite_commits_per_s")


class BenchSmokeTests(TestCase):
    """``pocketbridge-bench --json`` against a real server."""

    timeout = 90

    async def test_json_reports_every_number_with_baseline_and_ratio(self) -> None:
        """The JSON output has each required number, its baseline and ratio, all positive, and no errors."""
        require_postgres(self)  # the commit baseline
        server = await start_server(self, backend="sqlite", args=RAISED_LIMITS)
        argv = [
            "-m", "pocketbridge.bench.cli", "--url", server.http_url, "--server-pid", str(server.pid),
            "--json", "--storage", "sqlite", "--pg-url", postgres_base_url(),
            "--scenarios", "memory,handshakes,events,latency,fanout,catchup",
        ] + TINY
        out, err, code = await getProcessOutputAndValue(
            sys.executable, argv, env=dict(os.environ), path=server.directory, reactor=reactor
        )
        self.assertEqual(code, 0, "pocketbridge-bench failed:\n" + err.decode("utf-8", "replace")[-3000:])
        result: Dict[str, Any] = json.loads(out)
        self.assertEqual(result["errors"], {})
        for key, (baseline, ratio) in EXPECTED.items():
            for name in (key, baseline, ratio):
                self.assertIn(name, result)
                value = result[name]
                self.assertIsInstance(value, (int, float), "{} is {!r}".format(name, value))
                self.assertGreater(value, 0, name)
        for name in OTHER_BASELINES:
            self.assertGreater(result[name], 0, name)
        self.assertEqual(result["details"]["scenarios"]["catchup"]["replayed"], 200)
