"""
``pocketbridge-bench``: the ``cycle`` scenario, the stop on throttling and
``--compare-workers``.

In memory: which refusal names which setting (``bench.throttle``), that the
first throttle stops the cycling clients and ``connect_all`` at once, the
cycle merge arithmetic and the comparison summary. Against real servers
(small sizes, bounded in time): a cycle run reports its figures, a server
with a tiny connection rate makes the bench exit 3 with the line naming
``conn_per_ip_rate``, and ``--compare-workers 1`` starts its own server on
PostgreSQL and Redis, reports, and drops its database.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from pocketbridge.bench import compare, load
from pocketbridge.bench.cli import EXIT_THROTTLED, stop_throttled
from pocketbridge.bench.scenario_cycle import Cycler, merge_cycles
from pocketbridge.bench.throttle import Throttle, classify, classify_v2_error, of_exception
from pocketbridge.client import ConnectionClosed
from tests.harness import postgres_base_url, redis_url, require_postgres, require_redis, start_server
from tests.test_bench_smoke import RAISED_LIMITS

REFUSED_429 = 'connection was closed uncleanly ("WebSocket connection upgrade failed [429]: Too many connections")'
REFUSED_503 = 'connection was closed uncleanly ("WebSocket connection upgrade failed [503]: Server draining")'


class ThrottleMappingTests(TestCase):
    """Each refusal of PROTOCOL.md §11–12 names the setting of server/config.py that sets it."""

    def test_upgrade_429_is_the_connection_rate(self) -> None:
        t = classify(1006, REFUSED_429)
        assert t is not None
        self.assertEqual(t.settings, ("conn_per_ip_rate", "conn_per_ip_burst"))
        self.assertIn("429", t.refusal)

    def test_upgrade_503_is_the_connection_cap(self) -> None:
        t = classify(1006, REFUSED_503)
        assert t is not None
        self.assertEqual(t.settings, ("max_connections", "fd_reserve"))

    def test_other_upgrade_statuses_are_not_limits(self) -> None:
        self.assertIsNone(classify(1006, 'closed uncleanly ("WebSocket connection upgrade failed [404]: Not Found")'))

    def test_4029_reasons(self) -> None:
        cases = {
            "Too many failed handshakes; retry after 3 s": ("handshake_failures_per_ip",),
            "Too many sockets for this device; retry after 30 s": ("sockets_per_device",),
            "Too many sockets for this user; retry after 30 s": ("sockets_per_user",),
        }
        for reason, settings in cases.items():
            t = classify(4029, reason)
            assert t is not None, reason
            self.assertEqual(t.settings, settings, reason)
        vague = classify(4029, "slow down; retry after 1 s")
        assert vague is not None
        self.assertIn("conn_per_ip_rate", vague.settings)

    def test_closes_that_are_not_limits(self) -> None:
        for code, reason in ((1000, ""), (1008, "Invalid client signature"), (1013, "Storage unavailable"),
                             (1006, "peer dropped the TCP connection without previous WebSocket closing handshake"),
                             (None, "")):
            self.assertIsNone(classify(code, reason), (code, reason))

    def test_v2_errors(self) -> None:
        quota = classify_v2_error({"code": "quota_exceeded", "message": "over quota", "in_reply_to": "event"})
        assert quota is not None
        self.assertEqual(quota.settings, ("max_user_bytes",))
        frames = classify_v2_error({"code": "rate_limited", "message": "too many frames on this socket"})
        assert frames is not None
        self.assertEqual(frames.settings, ("frames_per_socket_rate", "frames_per_socket_burst"))
        device = classify_v2_error({"code": "rate_limited", "message": "too many events for this device"})
        assert device is not None
        self.assertEqual(device.settings, ("events_per_device_rate", "events_per_device_burst"))
        self.assertIsNone(classify_v2_error({"code": "seq_conflict", "message": "x"}))
        self.assertIsNone(classify_v2_error({"code": 5}))

    def test_of_exception(self) -> None:
        t = of_exception(ConnectionClosed(1006, REFUSED_429))
        assert t is not None
        self.assertEqual(t.settings[0], "conn_per_ip_rate")
        self.assertIsNone(of_exception(ConnectionRefusedError()))
        self.assertIsNone(of_exception(ConnectionClosed(1000, "")))

    def test_line_names_option_and_environment_variable(self) -> None:
        line = Throttle.from_dict(classify(1006, REFUSED_429).as_dict()).line("cycle")  # type: ignore[union-attr]
        self.assertNotIn("\n", line)
        for part in ("scenario cycle", "conn_per_ip_rate (--conn-per-ip-rate / PB_CONN_PER_IP_RATE)",
                     "conn_per_ip_burst (--conn-per-ip-burst / PB_CONN_PER_IP_BURST)", "no figure"):
            self.assertIn(part, line)

    def test_stop_throttled_exit_status(self) -> None:
        t = classify(4029, "Too many sockets for this user; retry after 30 s")
        assert t is not None
        args = argparse.Namespace(json=False)
        self.assertEqual(stop_throttled(args, "cycle", t), EXIT_THROTTLED)
        self.assertNotEqual(EXIT_THROTTLED, 0)


class FakeClient:
    """``Client``'s connect/close, answering at once: ``ok`` successful connects, then the given failure."""

    def __init__(self, ok: int, failure: Exception) -> None:
        self.ok = ok
        self.failure = failure
        self.connects = 0
        self.closes = 0

    def connect(self) -> "Deferred[Dict[str, Any]]":
        self.connects += 1
        if self.connects > self.ok:
            return fail(self.failure)
        return succeed({"type": "session_established"})

    def close(self) -> "Deferred[None]":
        self.closes += 1
        return succeed(None)


class StopOnThrottleTests(TestCase):
    """The first refusal that is a limit stops the load at once; other errors do not."""

    def test_cycler_stops_every_worker_at_the_first_throttle(self) -> None:
        clients = [FakeClient(5, ConnectionClosed(1006, REFUSED_429)), FakeClient(10 ** 6, RuntimeError("no"))]
        cycler = Cycler(Clock(), clients)  # type: ignore[arg-type]
        cycler.recording = True
        done = cycler.run()
        self.successResultOf(done)  # every worker has returned
        assert cycler.throttled is not None
        self.assertEqual(cycler.throttled.settings, ("conn_per_ip_rate", "conn_per_ip_burst"))
        self.assertFalse(cycler.running)
        self.assertEqual(clients[0].connects, 6)  # five cycles, then the refusal: no further attempt
        self.assertEqual(cycler.cycles, 5)
        self.assertEqual(cycler.errors, 1)
        self.assertLess(clients[1].connects, 10 ** 6)

    def test_cycler_keeps_going_after_an_error_that_is_not_a_limit(self) -> None:
        clients = [FakeClient(3, ConnectionClosed(1013, "Storage unavailable"))]
        cycler = Cycler(Clock(), clients)  # type: ignore[arg-type]
        # Not a limit: the worker retries; during warm-up it gives up after 10 errors per client.
        self.successResultOf(cycler.run())
        self.assertIsNone(cycler.throttled)
        self.assertEqual(cycler.errors, 11)
        self.assertEqual(clients[0].connects, 3 + 11)

    def test_connect_all_starts_no_client_after_a_throttle(self) -> None:
        clients = [FakeClient(1, RuntimeError("unused")) for _ in range(10)]
        clients[3] = FakeClient(0, ConnectionClosed(4029, "Too many failed handshakes; retry after 5 s"))
        throttled: List[Throttle] = []
        d = Deferred.fromCoroutine(load.connect_all(clients, 1, throttled))  # type: ignore[arg-type]
        ok, errors, _ = self.successResultOf(d)
        self.assertEqual(len(ok), 3)
        self.assertEqual(len(errors), 1)
        self.assertEqual([t.settings for t in throttled], [("handshake_failures_per_ip",)])
        self.assertEqual([c.connects for c in clients], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])

    def test_connect_all_without_a_list_keeps_its_old_behaviour(self) -> None:
        clients = [FakeClient(0, ConnectionClosed(1006, REFUSED_429)) for _ in range(4)]
        d = Deferred.fromCoroutine(load.connect_all(clients, 2))  # type: ignore[arg-type]
        ok, errors, _ = self.successResultOf(d)
        self.assertEqual((len(ok), len(errors)), (0, 4))

    def test_merge_passes_a_throttle_through(self) -> None:
        limit = classify(1006, REFUSED_429).as_dict()  # type: ignore[union-attr]
        self.assertEqual(merge_cycles([{"error": "barrier"}, {"throttled": limit}]), {"throttled": limit})


class ArithmeticTests(TestCase):
    """Cycle figures from shard readings, and the workers comparison's ratios."""

    def test_merge_cycles(self) -> None:
        part: Dict[str, Any] = {"protocol_version": 1, "clients": 5, "cycles": 400, "errors": 0, "first_error": None,
                                "durations": [0.01, 0.02], "elapsed_s": 2.0, "server_cpu_pct": 80.0,
                                "client_cpu_pct": 50.0, "machine_cpu_pct": 190.0, "other_cpu_pct": 10.0}
        second = dict(part, server_cpu_pct=None, client_cpu_pct=40.0, elapsed_s=2.5)
        merged = merge_cycles([part, second])
        self.assertEqual(merged["cycles"], 800)
        self.assertEqual(merged["cycles_per_s"], 320.0)  # over the slowest shard's 2.5 s
        self.assertEqual(merged["server_cpu_ms_per_cycle"], 2.0)  # 0.8 core × 2 s / 800 cycles
        self.assertEqual(merged["concurrency"], 10)
        self.assertEqual(merged["cycle_count"], 4)

    def test_summarize_and_table(self) -> None:
        summary = compare.summarize({1: {"cycles_per_s": 500.0, "events_per_s": None},
                                     2: {"cycles_per_s": 900.0, "events_per_s": None}})
        self.assertEqual(summary["counts"], [1, 2])
        self.assertEqual(summary["figures"], {"cycles_per_s": {"1": 500.0, "2": 900.0}})
        self.assertEqual(summary["ratios"], {"cycles_per_s": {"2_vs_1": 1.8}})
        text = "\n".join(compare.table_lines(summary))
        self.assertIn("2 vs 1", text)
        self.assertIn("1.8", text)

    def test_parse_counts(self) -> None:
        self.assertEqual(compare.parse_counts("1,2"), [1, 2])
        for bad in ("0", "", "1,-2"):
            self.assertRaises(ValueError, compare.parse_counts, bad)

    def test_workers_option_only_past_one(self) -> None:
        def argv(n: int) -> List[str]:
            return compare.Server(n, None, 1234, "/tmp/x", "postgresql://h/db", "postgresql://h/postgres",
                                  "redis://h", "p:").argv()

        self.assertNotIn("--workers", argv(1))
        a = argv(2)
        self.assertEqual(a[a.index("--workers") + 1], "2")
        self.assertIn("--conn-per-ip-rate", a)


async def run_bench(testcase: TestCase, argv: List[str], cwd: str) -> Tuple[bytes, str, int]:
    """``python -m pocketbridge.bench.cli ARGV``: (stdout, stderr text, exit status)."""
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", "pocketbridge.bench.cli"] + argv, env=dict(os.environ), path=cwd, reactor=reactor)
    return out, err.decode("utf-8", "replace"), code


SMALL = ["--concurrency", "4", "--duration", "1", "--warmup", "0.3", "--handshakes", "20",
         "--baseline-duration", "0.3"]


class CycleRunTests(TestCase):
    """The cycle scenario against real servers."""

    timeout = 120

    async def test_cycle_reports_its_figures(self) -> None:
        """cycles/s, server CPU per cycle, p50/p99 and the ratio to the echo server's connects/s."""
        server = await start_server(self, backend="sqlite", args=RAISED_LIMITS + ["--handshake-failures-per-ip",
                                                                                  "100000"])
        out, err, code = await run_bench(self, ["--url", server.http_url, "--server-pid", str(server.pid), "--json",
                                                "--storage", "sqlite", "--scenarios", "cycle"] + SMALL,
                                         server.directory)
        self.assertEqual(code, 0, err[-3000:])
        result = json.loads(out)
        self.assertEqual(result["errors"], {})
        for key in ("cycles_per_s", "cycle_server_cpu_ms", "cycle_p50_ms", "cycle_p99_ms",
                    "baseline_ws_connects_per_s", "cycle_ratio"):
            self.assertIsInstance(result[key], (int, float), key)
            self.assertGreater(result[key], 0, key)
        self.assertLessEqual(result["cycle_p50_ms"], result["cycle_p99_ms"])
        detail = result["details"]["scenarios"]["cycle"]
        self.assertEqual(detail["protocol_version"], 1)
        self.assertEqual(detail["errors"], 0)

    async def test_cycle_v2(self) -> None:
        """``--cycle-protocol 2`` cycles v2 handshakes."""
        server = await start_server(self, backend="sqlite", args=RAISED_LIMITS)
        out, err, code = await run_bench(self, ["--url", server.http_url, "--json", "--no-baselines",
                                                "--scenarios", "cycle", "--cycle-protocol", "2"] + SMALL,
                                         server.directory)
        self.assertEqual(code, 0, err[-3000:])
        result = json.loads(out)
        self.assertGreater(result["cycles_per_s"], 0)
        self.assertEqual(result["cycle_protocol_version"], 2)

    async def test_throttled_run_stops_and_names_the_limit(self) -> None:
        """A tiny per-IP connection rate: exit 3, one line naming conn_per_ip_rate, no figure."""
        server = await start_server(self, backend="sqlite", args=["--conn-per-ip-burst", "3",
                                                                  "--conn-per-ip-rate", "0.1"])
        out, err, code = await run_bench(self, ["--url", server.http_url, "--no-baselines", "--scenarios",
                                                "cycle,events"] + SMALL, server.directory)
        self.assertEqual(code, EXIT_THROTTLED, err[-3000:])
        self.assertEqual(out, b"")  # no figure
        lines = [line for line in err.splitlines() if line.startswith("pocketbridge-bench: stopped")]
        self.assertEqual(len(lines), 1, err)
        self.assertIn("conn_per_ip_rate (--conn-per-ip-rate / PB_CONN_PER_IP_RATE)", lines[0])
        self.assertIn("HTTP 429", lines[0])
        self.assertNotIn("scenario events", err)  # the run stopped at the first scenario


class CompareWorkersTests(TestCase):
    """``--compare-workers 1``: the bench starts its own server on PostgreSQL and Redis."""

    timeout = 180

    async def test_compare_one_worker(self) -> None:
        require_postgres(self)
        require_redis(self)
        import tempfile

        cwd = tempfile.mkdtemp(prefix="pb-bench-compare-")
        out, err, code = await run_bench(self, ["--compare-workers", "1", "--json", "--scenarios", "cycle",
                                                "--pg-url", postgres_base_url(), "--redis-url", redis_url()] + SMALL,
                                         cwd)
        os.rmdir(cwd)
        self.assertEqual(code, 0, err[-3000:])
        result = json.loads(out)
        self.assertEqual(result["errors"], {})
        self.assertEqual(result["workers"]["counts"], [1])
        self.assertGreater(result["workers"]["figures"]["cycles_per_s"]["1"], 0)
        self.assertGreater(result["by_count"]["1"]["cycle_server_cpu_ms"], 0)
        self.assertGreater(result["baselines"]["baseline_ws_connects_per_s"], 0)
        server = result["servers"]["1"]
        self.assertIsNotNone(server["exit_code"])  # stopped
        import psycopg2

        conn = psycopg2.connect(postgres_base_url())
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (server["database"],))
                self.assertEqual(cur.fetchone()[0], 0, "the throwaway database was not dropped")
        finally:
            conn.close()
