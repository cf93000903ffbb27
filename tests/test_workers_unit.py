"""
The supervisor's restart, backoff and stop logic with a fake spawner and a
Clock (no processes), and the pure helpers of ``pocketbridge.server.workers``.
"""

from __future__ import annotations

import socket
from typing import Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from pocketbridge.server import config, supervisor, workers
from pocketbridge.server.supervisor import BACKOFF_MAX, HEALTHY_AFTER, Supervisor


class FakeWorker:
    """A worker handle that records the signals it was sent."""

    def __init__(self, pid: int, index: int, on_exit: Callable[[str], None]) -> None:
        self.pid = pid
        self.index = index
        self.on_exit = on_exit
        self.signals: List[str] = []
        self.dead = False

    def signal(self, name: str) -> None:
        self.signals.append(name)

    def die(self, how: str = "exit code 1") -> None:
        assert not self.dead
        self.dead = True
        self.on_exit(how)


class FakeSpawner:
    """Hands out FakeWorkers with increasing pids; ``fail`` makes the next spawns raise."""

    def __init__(self) -> None:
        self.started: List[FakeWorker] = []
        self.fail = 0

    def __call__(self, index: int, on_exit: Callable[[str], None]) -> FakeWorker:
        if self.fail:
            self.fail -= 1
            raise OSError("fork failed")
        worker = FakeWorker(1000 + len(self.started), index, on_exit)
        self.started.append(worker)
        return worker

    def current(self, index: int) -> FakeWorker:
        return [w for w in self.started if w.index == index][-1]


def make(count: int = 2, stop_timeout: float = 17.0) -> Tuple[Clock, FakeSpawner, Supervisor]:
    clock = Clock()
    spawner = FakeSpawner()
    sup = Supervisor(clock, spawner, count, stop_timeout)
    sup.start()
    return clock, spawner, sup


class RestartTests(TestCase):
    def test_start_spawns_every_worker(self) -> None:
        """start() starts one process per position, each with its index."""
        clock, spawner, sup = make(3)
        self.assertEqual([w.index for w in spawner.started], [0, 1, 2])
        self.assertEqual(sup.alive, 3)
        self.assertEqual(sup.pids(), [1000, 1001, 1002])

    def test_a_dead_worker_is_restarted_after_one_second(self) -> None:
        """An unexpected exit restarts that position (only that one) after BACKOFF_MIN."""
        clock, spawner, sup = make(2)
        clock.advance(HEALTHY_AFTER + 5)
        spawner.current(1).die("killed by signal 9")
        self.assertEqual(sup.alive, 1)
        self.assertEqual(sup.pids(), [1000, None])
        clock.advance(0.99)
        self.assertEqual(len(spawner.started), 2)
        clock.advance(0.01)
        self.assertEqual(len(spawner.started), 3)
        self.assertEqual(spawner.started[-1].index, 1)
        self.assertEqual(sup.alive, 2)
        self.assertEqual(sup.restarts, 1)

    def test_backoff_doubles_while_dying_young_up_to_the_cap(self) -> None:
        """Each young death doubles the delay: 1, 2, 4, 8, 16, 30, 30 s."""
        clock, spawner, sup = make(1)
        delays = []
        for _ in range(7):
            spawner.current(0).die()
            started = len(spawner.started)
            waited = 0.0
            while len(spawner.started) == started:
                clock.advance(0.5)
                waited += 0.5
            delays.append(waited)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_MAX, BACKOFF_MAX])
        self.assertEqual(sup.restarts, 7)

    def test_backoff_resets_after_a_healthy_run(self) -> None:
        """A worker that lived HEALTHY_AFTER seconds is restarted after one second again."""
        clock, spawner, sup = make(1)
        for delay in (1, 2, 4):
            spawner.current(0).die()
            clock.advance(delay)
        clock.advance(HEALTHY_AFTER)
        spawner.current(0).die()
        before = len(spawner.started)
        clock.advance(1.0)
        self.assertEqual(len(spawner.started), before + 1)

    def test_a_failed_spawn_is_retried_with_backoff(self) -> None:
        """A spawn that raises counts as a death at once and is retried later."""
        clock = Clock()
        spawner = FakeSpawner()
        spawner.fail = 2
        sup = Supervisor(clock, spawner, 1, 10.0)
        sup.start()
        self.assertEqual(sup.alive, 0)
        clock.advance(1.0)
        self.assertEqual(sup.alive, 0)
        clock.advance(2.0)
        self.assertEqual(sup.alive, 1)


class StopTests(TestCase):
    def test_stop_terms_every_worker_and_fires_when_all_exited(self) -> None:
        """stop() sends TERM to each worker and fires only after the last one exits."""
        clock, spawner, sup = make(2)
        d = sup.stop()
        self.assertEqual([w.signals for w in spawner.started], [["TERM"], ["TERM"]])
        spawner.current(0).die("exit code 0")
        self.assertNoResult(d)
        spawner.current(1).die("exit code 0")
        self.successResultOf(d)
        clock.advance(100)
        self.assertEqual(len(spawner.started), 2, "a worker was restarted during the stop")
        self.assertEqual([w.signals for w in spawner.started], [["TERM"], ["TERM"]], "KILL after a clean stop")

    def test_stop_kills_a_worker_that_outlives_the_timeout(self) -> None:
        """A worker still running stop_timeout seconds after TERM gets KILL; the others are left alone."""
        clock, spawner, sup = make(2, stop_timeout=17.0)
        d = sup.stop()
        spawner.current(0).die("exit code 0")
        clock.advance(16.9)
        self.assertEqual(spawner.current(1).signals, ["TERM"])
        clock.advance(0.1)
        self.assertEqual(spawner.current(1).signals, ["TERM", "KILL"])
        self.assertEqual(spawner.current(0).signals, ["TERM"])
        self.assertNoResult(d)
        spawner.current(1).die("killed by signal 9")
        self.successResultOf(d)

    def test_stop_cancels_a_pending_restart(self) -> None:
        """A worker waiting for its restart is not started once the supervisor stops."""
        clock, spawner, sup = make(2)
        spawner.current(0).die()
        d = sup.stop()
        spawner.current(1).die("exit code 0")
        self.successResultOf(d)
        clock.advance(60)
        self.assertEqual(len(spawner.started), 2)

    def test_stop_twice_gives_two_waiters(self) -> None:
        """A second stop() (twistd may ask again) waits for the same end."""
        clock, spawner, sup = make(1)
        first, second = sup.stop(), sup.stop()
        self.assertEqual(spawner.current(0).signals, ["TERM"])
        spawner.current(0).die("exit code 0")
        self.successResultOf(first)
        self.successResultOf(second)


class HelperTests(TestCase):
    def settings(self, **values: object) -> config.Settings:
        env = {"DATABASE_URL": "postgresql://u:secret@db/pb", "REDIS_URL": "redis://r:6379"}
        return config.resolve({k: (str(v) if v is not None else None) for k, v in values.items()}, env)

    def test_workers_setting(self) -> None:
        """--workers takes a count or auto (one per core); 1 by default."""
        self.assertEqual(config.resolve({}, {}).workers, 1)
        self.assertEqual(config.resolve({"workers": "3"}, {}).workers, 3)
        self.assertGreaterEqual(config.resolve({}, {"PB_WORKERS": "auto"}).workers, 1)
        with self.assertRaises(config.ConfigError) as e:
            config.resolve({"workers": "0"}, {})
        self.assertIn("--workers", str(e.exception))

    def test_refusals(self) -> None:
        """Without PostgreSQL and Redis, or on a non-TCP endpoint, the supervisor refuses with one line."""
        self.assertIsNone(workers.refusal(self.settings(workers=2)))
        self.assertEqual(workers.refusal(config.resolve({"workers": "2"}, {})), workers.EMBEDDED_REFUSAL)
        self.assertEqual(workers.refusal(config.resolve({"workers": "2"}, {"REDIS_URL": "redis://r"})),
                         workers.EMBEDDED_REFUSAL)
        line = workers.refusal(self.settings(workers=2, listen="ssl:443:privateKey=k.pem"))
        self.assertIsNotNone(line)
        self.assertIn("(got ssl:)", str(line))
        self.assertNotIn("\n", str(line))

    def test_per_ip_cap_is_divided_rounding_up(self) -> None:
        """Each worker enforces ceil(per_ip / N) open connections per address."""
        self.assertEqual(workers.worker_settings(self.settings(workers=2, conn_open_per_ip=512)).conn_open_per_ip, 256)
        self.assertEqual(workers.worker_settings(self.settings(workers=3, conn_open_per_ip=10)).conn_open_per_ip, 4)
        self.assertEqual(workers.worker_settings(self.settings(workers=4, conn_open_per_ip=1)).conn_open_per_ip, 1)

    def test_parse_tcp_listen(self) -> None:
        """Port, interface (escaped colons of IPv6) and backlog of a tcp/tcp6 endpoint string."""
        self.assertEqual(workers.parse_tcp_listen("tcp:3001", 1024), (socket.AF_INET, "", 3001, 1024))
        self.assertEqual(workers.parse_tcp_listen("tcp:port=80:interface=127.0.0.1:backlog=5", 1024),
                         (socket.AF_INET, "127.0.0.1", 80, 5))
        self.assertEqual(workers.parse_tcp_listen(r"tcp6:3001:interface=\:\:1", 9), (socket.AF_INET6, "::1", 3001, 9))
        for bad in ("tcp:abc", "tcp:1:2", "tcp:3001:reuse=1"):
            with self.assertRaises(ValueError):
                workers.parse_tcp_listen(bad, 1024)

    def test_open_listening_socket(self) -> None:
        """The supervisor's socket is bound, listening and non-blocking."""
        sock = workers.open_listening_socket("tcp:0:interface=127.0.0.1", 16)
        self.addCleanup(sock.close)
        self.assertFalse(sock.getblocking())
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN), 1)

    def test_worker_environment_carries_the_resolved_settings(self) -> None:
        """A worker gets every setting through its environment (secrets stay off its command line)."""
        s = self.settings(workers=2, node_id="box", metrics_listen="tcp:9100", writer_delay_ms=3,
                          legacy_clients=None)
        env = workers.worker_environment(s, 1, 7, {"PORT": "80", "PATH": "/bin"})
        self.assertEqual(env["DATABASE_URL"], "postgresql://u:secret@db/pb")
        self.assertEqual((env["PB_WORKER_FD"], env["PB_WORKER_INDEX"]), ("7", "1"))
        self.assertEqual(env["PB_NODE_ID"], "box-w1")
        self.assertEqual(env["PB_WRITER_DELAY_MS"], "3")
        self.assertEqual(env["PB_LEGACY_CLIENTS"], "0")
        self.assertTrue(env["PB_METRICS_LISTEN"].startswith("unix:"))
        self.assertNotIn("PORT", env)
        self.assertEqual(env["PATH"], "/bin")
        argv = workers.worker_argv(s)
        self.assertNotIn("secret", " ".join(argv))
        self.assertEqual(argv[-3:], ["pocketbridge", "--listen", "tcp:3001"])
        # The worker resolves the same settings from that environment.
        again = config.resolve({"listen": s.listen}, env)
        self.assertEqual({k: v for k, v in again.values.items() if k not in ("node_id", "metrics_listen")},
                         {k: v for k, v in s.values.items() if k not in ("node_id", "metrics_listen")})

    def test_seat_from_environment(self) -> None:
        """A process is a worker exactly when PB_WORKER_FD is set; its seat comes from the environment."""
        self.assertIsNone(workers.seat_from_environment({}))
        self.assertEqual(workers.seat_from_environment({"PB_WORKER_FD": "5", "PB_WORKER_INDEX": "2",
                                                        "PB_WORKER_PARENT": "99"}), workers.Seat(5, 2, 99))


class LineRelayTests(TestCase):
    def relay(self, limit: int = 10) -> Tuple[workers.LineRelay, List[str]]:
        lines: List[str] = []
        return workers.LineRelay(lines.append, limit), lines

    def test_lines_split_across_chunks(self) -> None:
        """Worker output is relayed line by line whatever the chunking; a partial last line on exit too."""
        relay, lines = self.relay()
        relay.feed(b"ab")
        relay.feed(b"c\nde\r\n\nf")
        self.assertEqual(lines, ["abc", "de"])
        relay.flush()
        self.assertEqual(lines, ["abc", "de", "f"])

    def test_long_lines_are_cut(self) -> None:
        """A line past the limit is relayed once, cut, and its rest is dropped even without a newline yet."""
        relay, lines = self.relay(limit=4)
        relay.feed(b"123456789")
        relay.feed(b"abcdef")
        relay.feed(b"\nok\n")
        self.assertEqual(lines, ["1234 [cut]", "ok"])
        relay.feed(b"toolong\n")
        self.assertEqual(lines[-1], "tool [cut]")


class ScrapeTests(TestCase):
    def test_worker_label_added_and_supervisor_gauges(self) -> None:
        """/metrics of the supervisor: each worker's samples with worker="i", one family each, plus its own gauges."""
        clock, spawner, sup = make(3)
        spawner.current(2).die()
        texts: Dict[str, bytes] = {
            "metrics-{}.sock".format(i): b"# HELP pb_x Things\n# TYPE pb_x counter\npb_x_total{k=\"a\"} 3.0\n"
                                         b"# HELP pb_g Level\n# TYPE pb_g gauge\npb_g 7.0\n" for i in (0, 1)
        }
        asked: List[str] = []

        async def fetch(reactor: object, path: str) -> bytes:
            asked.append(path.rsplit("/", 1)[1])
            return texts[path.rsplit("/", 1)[1]]

        self.patch(supervisor, "fetch_worker_metrics", fetch)
        s = config.resolve({"data_dir": "/srv/pb"}, {})
        body = self.successResultOf(Deferred.fromCoroutine(supervisor.scrape(clock, s, sup))).decode()
        self.assertEqual(asked, ["metrics-0.sock", "metrics-1.sock"], "a dead worker was scraped")
        self.assertIn('pb_x_total{k="a",worker="0"} 3.0', body)
        self.assertIn('pb_x_total{k="a",worker="1"} 3.0', body)
        self.assertIn('pb_g{worker="1"} 7.0', body)
        self.assertEqual(body.count("# TYPE pb_x_total counter"), 1)
        self.assertEqual(body.count("# TYPE pb_g gauge"), 1)
        self.assertIn("pocketbridge_workers 3.0", body)
        self.assertIn("pocketbridge_workers_alive 2.0", body)
        self.assertIn("pocketbridge_worker_restarts_total 1.0", body)
