"""
``--compare-workers 1,2``: one process against N worker processes, in one run.

Two figures taken minutes apart on a shared machine differ by more than the
thing being compared, so the bench starts the server itself for each worker
count, the same way each time, and runs the chosen scenarios against each
in turn, with the same baselines:

- ``twistd -n pocketbridge`` (with ``--workers N`` when N is not 1, so a
  server without that option still serves the count 1) on a free loopback
  port, on PostgreSQL (a throwaway database created through ``--pg-url``
  and dropped afterwards) and Redis (``--redis-url``, a prefix of its own
  whose keys are deleted afterwards), with the limits raised far out of the
  load's way (``GENEROUS_LIMITS``) and one server key for all workers;
- the server CPU is the supervisor's pid and every process below it
  (``stats.with_descendants``), read in each measurement window.

``table_lines`` prints each figure per worker count and the ratio N vs 1.
The parent process never runs a reactor; servers are plain subprocesses.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit, urlunsplit

from pocketbridge.bench.stats import ratio

_TWISTD_MAIN = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"

#: Server limits far above what one load generator on one IP can reach (docs/benchmarks.md).
GENEROUS_LIMITS = [
    "--conn-per-ip-burst", "1000000", "--conn-per-ip-rate", "1000000", "--conn-open-per-ip", "100000",
    "--handshake-failures-per-ip", "100000",
    "--sockets-per-user", "100000", "--sockets-per-device", "100000",
    "--events-per-device-rate", "1000000", "--events-per-device-burst", "1000000",
    "--events-per-user-rate", "1000000", "--events-per-user-burst", "1000000",
    "--frames-per-socket-rate", "1000000", "--frames-per-socket-burst", "1000000",
]

#: Scenarios that cannot be compared this way: memory reads one process's RSS, two_nodes needs --url2.
NOT_COMPARED = ("memory", "two_nodes")

#: Rows of the comparison table: (label, result key).
FIGURES: List[Tuple[str, str]] = [
    ("cycles/s (connect, handshake, close)", "cycles_per_s"),
    ("  server CPU ms per cycle", "cycle_server_cpu_ms"),
    ("  cycle p50 ms", "cycle_p50_ms"),
    ("  cycle p99 ms", "cycle_p99_ms"),
    ("handshakes/s (returning, kept open)", "handshakes_per_s"),
    ("handshakes/s (new devices)", "handshakes_new_per_s"),
    ("events/s end to end", "events_per_s"),
    ("  delivery latency p99 ms (saturated)", "events_latency_p99_ms"),
    ("latency p50 ms at fixed rate", "latency_p50_ms"),
    ("latency p99 ms at fixed rate", "latency_p99_ms"),
    ("catch-up events/s", "catchup_events_per_s"),
    ("fan-out deliveries/s", "fanout_deliveries_per_s"),
]


def parse_counts(text: str) -> List[int]:
    """``"1,2"`` → ``[1, 2]``; raises ValueError unless every count is an integer >= 1."""
    counts = [int(c) for c in text.split(",") if c.strip()]
    if not counts or any(c < 1 for c in counts):
        raise ValueError("--compare-workers takes worker counts >= 1, e.g. 1,2")
    return counts


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _database_url(admin_url: str, name: str) -> str:
    parts = urlsplit(admin_url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


@dataclasses.dataclass
class Server:
    """A server this bench started: its process, address and throwaway resources."""

    workers: int
    proc: Optional["subprocess.Popen[bytes]"]
    port: int
    directory: str
    database: str
    admin_url: str
    redis_url: str
    redis_prefix: str

    @property
    def url(self) -> str:
        return "http://127.0.0.1:{}".format(self.port)

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "server.log")

    def argv(self, extra: Sequence[str] = ()) -> List[str]:
        """The server's command line."""
        argv = [sys.executable, "-c", _TWISTD_MAIN, "-n", "--pidfile=", "--logfile=" + self.log_path,
                "pocketbridge", "--listen", "tcp:{}:interface=127.0.0.1".format(self.port),
                "--data-dir", os.path.join(self.directory, "data"), "--database", self.database,
                "--redis", self.redis_url, "--redis-prefix", self.redis_prefix]
        if self.workers != 1:
            argv += ["--workers", str(self.workers)]
        return argv + GENEROUS_LIMITS + list(extra)

    def tail(self, lines: int = 15) -> str:
        """The end of the server's stderr and log, for a failure message."""
        out = []
        for name in ("stderr", "server.log"):
            try:
                with open(os.path.join(self.directory, name), "rb") as f:
                    out.extend(f.read().decode("utf-8", "replace").splitlines()[-lines:])
            except OSError:
                pass
        return "\n".join(out)


def _server_env(database: str, redis_url: str, prefix: str) -> Dict[str, str]:
    """The bench's environment without the caller's server settings, plus this server's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PB_") and k not in ("DATABASE_URL", "REDIS_URL", "PORT", "SERVER_PRIVATE_KEY_HEX")}
    env.update({"DATABASE_URL": database, "REDIS_URL": redis_url, "PB_REDIS_PREFIX": prefix,
                "SERVER_PRIVATE_KEY_HEX": secrets.token_hex(32), "PYTHONUNBUFFERED": "1"})
    return env


def start(workers: int, admin_url: str, redis_url: str, extra: Sequence[str] = (), timeout: float = 90.0) -> Server:
    """Create the database, start the server and wait until ``/health`` answers; RuntimeError if it does not."""
    import psycopg2

    name = "pb_bench_workers_{}".format(secrets.token_hex(6))
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute("CREATE DATABASE " + name)
    finally:
        admin.close()
    directory = tempfile.mkdtemp(prefix="pb-bench-server-")
    database = _database_url(admin_url, name)
    prefix = "pbbench:{}:".format(secrets.token_hex(6))
    stderr = open(os.path.join(directory, "stderr"), "wb")
    server = Server(workers, None, free_port(), directory, database, admin_url, redis_url, prefix)
    try:
        server.proc = subprocess.Popen(server.argv(extra), cwd=directory, env=_server_env(database, redis_url, prefix),
                                       stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    except OSError:
        stderr.close()
        _drop(server)
        raise
    stderr.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            code = server.proc.returncode
            tail = server.tail()
            stop(server)
            last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
            raise RuntimeError("the server with {} worker(s) exited with {}: {}\n{}".format(workers, code, last, tail))
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.2)
    tail = server.tail()
    stop(server)
    raise RuntimeError("the server with {} worker(s) was not healthy within {:.0f} s:\n{}".format(
        workers, timeout, tail))


def stop(server: Server, timeout: float = 30.0) -> Optional[int]:
    """SIGTERM our server (by its handle), SIGKILL after ``timeout``; then drop its database and keys."""
    code: Optional[int] = None
    if server.proc is not None:
        if server.proc.poll() is None:
            server.proc.terminate()
        try:
            code = server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            code = server.proc.wait(timeout)
    _drop(server)
    return code


def _drop(server: Server) -> None:
    """Best effort: the throwaway database, the Redis keys under the prefix, the directory."""
    import psycopg2

    try:
        admin = psycopg2.connect(server.admin_url)
        admin.autocommit = True
        try:
            with admin.cursor() as cur:
                cur.execute("DROP DATABASE IF EXISTS " + urlsplit(server.database).path.lstrip("/"))
        finally:
            admin.close()
    except psycopg2.Error as e:
        name = urlsplit(server.database).path.lstrip("/")
        sys.stderr.write("pocketbridge-bench: could not drop {}: {}\n".format(name, e))
    cli = shutil.which("redis-cli")
    if cli is not None:
        try:
            keys = subprocess.run([cli, "-u", server.redis_url, "--scan", "--pattern", server.redis_prefix + "*"],
                                  capture_output=True, text=True, timeout=10).stdout.split()
            if keys:
                subprocess.run([cli, "-u", server.redis_url, "DEL", *keys], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            pass
    shutil.rmtree(server.directory, ignore_errors=True)


def summarize(by_count: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
    """Each figure per count and, for every count but the first, its ratio to the first count's."""
    counts = sorted(by_count)
    base = counts[0]
    out: Dict[str, Any] = {"counts": counts, "figures": {}, "ratios": {}}
    for _, key in FIGURES:
        values = {str(n): by_count[n].get(key) for n in counts}
        if all(v is None for v in values.values()):
            continue
        out["figures"][key] = values
        out["ratios"][key] = {"{}_vs_{}".format(n, base): ratio(by_count[n].get(key), by_count[base].get(key))
                              for n in counts if n != base}
    return out


def table_lines(comparison: Dict[str, Any]) -> List[str]:
    """The comparison as aligned text: one column per worker count, then the ratios to the first count."""
    from pocketbridge.bench.report import fmt

    counts = comparison["counts"]
    base = counts[0]
    header = ["figure"] + ["{} worker{}".format(n, "" if n == 1 else "s") for n in counts] + [
        "{} vs {}".format(n, base) for n in counts if n != base]
    rows = [header]
    for label, key in FIGURES:
        if key not in comparison["figures"]:
            continue
        values = comparison["figures"][key]
        ratios = comparison["ratios"][key]
        rows.append([label] + [fmt(values[str(n)]) for n in counts] + [
            fmt(ratios["{}_vs_{}".format(n, base)]) for n in counts if n != base])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["workers comparison (one server started per count, same scenarios and baselines):"]
    for i, r in enumerate(rows):
        lines.append("  " + "  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(r)))
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return lines


def run(args: argparse.Namespace, make_run: Callable[[argparse.Namespace], Any],
        emit: Callable[[argparse.Namespace, Dict[str, Any], Callable[[Dict[str, Any]], str]], None],
        stop_throttled: Callable[[argparse.Namespace, str, Any], int]) -> int:
    """
    The ``--compare-workers`` run: baselines once, then for each count a
    server started, the scenarios run against it (``make_run`` gives the
    CLI's ``Run``), the server stopped; one result. Exit status as the CLI's.
    """
    from pocketbridge.bench import report
    from pocketbridge.bench.load import ws_url
    from pocketbridge.bench.probe import machine_info

    started = time.monotonic()
    first = make_run(args)
    if not args.no_baselines:
        first.run_baselines()
    by_count: Dict[int, Dict[str, Any]] = {}
    details: Dict[str, Any] = {}
    servers: Dict[str, Any] = {}
    errors: Dict[str, str] = dict(first.errors)
    for count in args.workers_counts:
        first.say("starting the server with {} worker(s) (PostgreSQL, Redis) ...".format(count))
        try:
            server = start(count, args.pg_url, args.redis_url)
        except Exception as e:  # no database, no Redis, or the server refused the option: say so, go on
            errors["workers_{}".format(count)] = str(e)
            first.say("  could not start it: {}".format(str(e).splitlines()[0]))
            continue
        assert server.proc is not None
        a = argparse.Namespace(**vars(args))
        a.url, a.ws1 = server.url, ws_url(server.url)
        a.server_pids, a.server_pid = [server.proc.pid], server.proc.pid
        one = make_run(a)
        one.baselines = first.baselines
        try:
            one.run_scenarios()
        finally:
            servers[str(count)] = {"port": server.port, "pid": server.proc.pid,
                                   "database": urlsplit(server.database).path.lstrip("/"),
                                   "redis_prefix": server.redis_prefix, "exit_code": stop(server)}
        if one.throttled is not None:
            return stop_throttled(args, "{} (--workers {})".format(one.throttled[0], count), one.throttled[1])
        by_count[count] = report.build(one.scenarios, first.baselines, "postgresql")
        details[str(count)] = {"scenarios": one.scenarios, "cpu": one.cpu, "server_metrics": one.server_metrics}
        errors.update({"{}_workers_{}".format(k, count): v for k, v in one.errors.items()})
    result: Dict[str, Any] = {
        "workers": summarize(by_count) if by_count else None,
        "by_count": {str(n): flat for n, flat in by_count.items()},
        "baselines": {k: v for k, v in report.build({}, first.baselines, "postgresql").items()
                      if k.startswith("baseline_")},
        "machine": machine_info(),
        "config": {"compare_workers": args.workers_counts, "scenarios": args.selected,
                   "cycle_protocol": args.cycle_protocol},  # no URLs: they may carry passwords
        "servers": servers,
        "errors": errors,
        "elapsed_s": round(time.monotonic() - started, 1),
        "details": {"by_count": details, "baselines": first.baselines},
    }
    emit(args, result, text)
    return 1 if errors else 0


def text(result: Dict[str, Any]) -> str:
    """The comparison run as text: the table, the baselines used, then any problem."""
    from pocketbridge.bench.report import fmt

    lines = table_lines(result["workers"]) if result.get("workers") else ["no worker count was measured"]
    base = {k: v for k, v in (result.get("baselines") or {}).items() if v is not None and k != "baseline_storage"}
    if base:
        lines.append("")
        lines.append("baselines (measured once, before the servers): " + ", ".join(
            "{} {}".format(k, fmt(v)) for k, v in sorted(base.items())))
    if result.get("errors"):
        lines.append("")
        lines.append("problems:")
        for name, err in result["errors"].items():
            lines.append("  {}: {}".format(name, str(err).splitlines()[0][:200] if err else err))
    return "\n".join(lines)
