"""
``pocketbridge-bench``: measure a running PocketBridge server and raw
baselines on the same machine, in the same run.

    pocketbridge-bench --url http://127.0.0.1:3001 [--url2 URL] [--server-pid PID ...]
                       [--quick] [--json] [--scenarios memory,handshakes,cycle,events,...]
                       [--prefill N --prefill-database DB]
    pocketbridge-bench --compare-workers 1,2 [--pg-url URL] [--redis-url URL] [--scenarios ...]

Scenarios (run in this order; names or numbers): 4 ``memory``, 1
``handshakes``, 8 ``cycle``, 2 ``events``, 3 ``latency``, 6 ``fanout``, 5 ``catchup``,
7 ``two_nodes`` (needs ``--url2``; part of the default only when it is given). ``memory`` needs ``--server-pid`` and
runs first because memory freed by other scenarios would hide the growth.
The server must run with raised limits (docs/benchmarks.md has the command);
when it throttles the bench anyway, the run stops with one line naming the
setting to raise (exit status 3). ``--compare-workers`` starts the server
itself, once per worker count (``compare``).

Every measurement runs in its own child process (``runner``); baselines run
first, while the server is idle. Progress goes to stderr; the result (a
table, or one JSON object with ``--json``) to stdout. Exit status 1 if a
measurement failed (its keys are then null), 2 for a usage error, 3 when
the server throttled the bench.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import orjson

from pocketbridge.bench import baseline_store, baseline_ws, compare, report
from pocketbridge.bench import scenario_connections as conns
from pocketbridge.bench import scenario_cycle as cycles
from pocketbridge.bench import scenario_events as flows
from pocketbridge.bench.load import http_url, ws_url
from pocketbridge.bench.prefill import prefilled_pass
from pocketbridge.bench.probe import health, machine_info, metrics_delta, scrape_metrics
from pocketbridge.bench.runner import error_of, raise_fd_limit, run_child, run_sharded
from pocketbridge.bench.stats import CPU_KEYS
from pocketbridge.bench.throttle import EXIT_THROTTLED, Throttle

SCENARIOS = ("memory", "handshakes", "cycle", "events", "latency", "fanout", "catchup", "two_nodes")
NUMBERS = {"1": "handshakes", "2": "events", "3": "latency", "4": "memory", "5": "catchup", "6": "fanout",
           "7": "two_nodes", "8": "cycle"}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much load each scenario generates; ``--quick`` and the size options pick these."""

    handshakes: int = 3000
    concurrency: int = 100
    connections: Sequence[int] = (1000, 5000)
    duration: float = 20.0
    warmup: float = 3.0
    users: int = 20
    window: int = 16
    payload_bytes: int = 256
    rate: float = 500.0
    rate_duration: float = 30.0
    backlog: int = 100_000
    catchup_limit: int = 1000
    fanout_devices: int = 10
    baseline_duration: float = 5.0
    client_procs: int = 1


FULL = Sizes()
QUICK = dataclasses.replace(FULL, handshakes=1000, duration=8.0, warmup=2.0, rate_duration=10.0, backlog=10_000,
                            baseline_duration=2.0)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="pocketbridge-bench", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--url", help="the server, e.g. http://127.0.0.1:3001 (ws:// also accepted); "
                                 "not with --compare-workers")
    p.add_argument("--url2", help="a second node of the same cluster (scenario two_nodes)")
    p.add_argument("--server-pid", type=int, action="append",
                   help="pid of the --url server (RSS and CPU readings); repeat for several processes: CPU is "
                        "summed over them and every process below them (a --workers supervisor's workers)")
    p.add_argument("--server-pid2", type=int, help="pid of the --url2 server (CPU readings)")
    p.add_argument("--quick", action="store_true", help="smaller sizes; finishes in under 3 minutes")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--scenarios", default=None,
                   help="comma list of scenario names or numbers (default: all; two_nodes only with --url2)")
    p.add_argument("--storage", choices=("postgresql", "sqlite"), default="postgresql",
                   help="the server's storage: picks the commit baseline for the ratios (default postgresql)")
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                   help="PostgreSQL for the baseline; a throwaway database is created and dropped there")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379", help="Redis for the PUBLISH baseline")
    p.add_argument("--no-baselines", action="store_true", help="skip the baselines (ratios are then null)")
    p.add_argument("--compare-workers", metavar="N,M",
                   help="start the server (twistd pocketbridge --workers N, PostgreSQL --pg-url, Redis "
                        "--redis-url) once per count, run the scenarios against each and print each figure "
                        "per count and the ratio to the first count")
    p.add_argument("--cycle-protocol", type=int, choices=(1, 2), default=1,
                   help="protocol of the cycle scenario's handshakes (default 1)")
    p.add_argument("--prefill", type=int, default=0, metavar="N",
                   help="after the scenarios, load N events into --prefill-database (new users) and run the "
                        "scenarios again (memory excepted): both results and prefilled/fresh ratios")
    p.add_argument("--prefill-database", metavar="DB",
                   help="the server's database for --prefill: its postgresql:// URL, or its SQLite file "
                        "(DATA_DIR/pocketbridge.sqlite3); the server must have migrated it")
    p.add_argument("--prefill-events-per-user", type=int, default=1000, metavar="K",
                   help="events per prefilled user (default 1000: 1,000 users per million events)")
    sizes = p.add_argument_group("sizes (override --quick or the defaults)")
    sizes.add_argument("--handshakes", type=int, help="handshakes per round (default 3000, quick 1000)")
    sizes.add_argument("--concurrency", type=int, help="handshakes (and cycles) in flight (default 100)")
    sizes.add_argument("--connections", help="idle connection counts for memory, comma list (default 1000,5000)")
    sizes.add_argument("--duration", type=float,
                       help="seconds each throughput scenario (and cycle) measures (20, quick 8)")
    sizes.add_argument("--warmup", type=float, help="seconds of load before measuring (3, quick 2)")
    sizes.add_argument("--users", type=int, help="sending users in events/two_nodes (default 20)")
    sizes.add_argument("--window", type=int, help="unacked events in flight per sender (default 16)")
    sizes.add_argument("--payload-bytes", type=int, help="event payload bytes before base64 (default 256)")
    sizes.add_argument("--rate", type=float, help="events/s of the latency scenario (default 500)")
    sizes.add_argument("--rate-duration", type=float, help="seconds the latency scenario measures (30, quick 10)")
    sizes.add_argument("--backlog", type=int, help="catch-up backlog in events (100000, quick 10000)")
    sizes.add_argument("--catchup-limit", type=int, help="events per replay page requested (default 1000)")
    sizes.add_argument("--fanout-devices", type=int, help="devices of the fan-out user (default 10)")
    sizes.add_argument("--baseline-duration", type=float, help="seconds per baseline measurement (5, quick 2)")
    sizes.add_argument("--client-procs", type=int, help="load-generator processes for handshakes/events (1)")
    args = p.parse_args(argv)
    pids = args.server_pid or []
    args.server_pids, args.server_pid = pids, (pids[0] if pids else None)
    args.workers_counts = None
    if args.compare_workers:
        if args.url or args.url2 or pids or args.prefill:
            p.error("--compare-workers starts its own servers: no --url, --url2, --server-pid or --prefill")
        try:
            args.workers_counts = compare.parse_counts(args.compare_workers)
        except ValueError as e:
            p.error(str(e))
        args.url = "http://127.0.0.1:1"  # replaced by each started server's address
    elif not args.url:
        p.error("--url is required (or --compare-workers)")
    names = []
    excluded = compare.NOT_COMPARED if args.compare_workers else ("two_nodes",) if not args.url2 else ()
    default = [s for s in SCENARIOS if s not in excluded]
    for item in (args.scenarios or ",".join(default)).split(","):
        item = NUMBERS.get(item.strip(), item.strip())
        if item not in SCENARIOS:
            p.error("unknown scenario {!r}; choose from {}".format(item, ", ".join(SCENARIOS)))
        names.append(item)
    args.selected = [s for s in SCENARIOS if s in names]
    if args.compare_workers and set(args.selected) & set(compare.NOT_COMPARED):
        p.error("--compare-workers cannot run {}".format(" or ".join(compare.NOT_COMPARED)))
    if "two_nodes" in args.selected and not args.url2:
        p.error("scenario two_nodes needs --url2")
    if args.prefill and not args.prefill_database:
        p.error("--prefill needs --prefill-database (the server's database URL or SQLite file)")
    try:
        args.ws1 = ws_url(args.url)
        args.ws2 = ws_url(args.url2) if args.url2 else None
    except ValueError as e:
        p.error(str(e))
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    """``--quick`` or the defaults, with every size option given applied."""
    sizes = QUICK if args.quick else FULL
    changes: Dict[str, Any] = {}
    for field in dataclasses.fields(Sizes):
        value = getattr(args, field.name, None)
        if value is not None:
            changes[field.name] = value
    if isinstance(changes.get("connections"), str):
        changes["connections"] = tuple(sorted(int(c) for c in changes["connections"].split(",") if c.strip()))
    return dataclasses.replace(sizes, **changes)


class Run:
    """One benchmark run: measurements, their errors and CPU readings, and progress on stderr."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes) -> None:
        self.args = args
        self.sizes = sizes
        self.scenarios: Dict[str, Any] = {}
        self.baselines: Dict[str, Any] = {}
        self.errors: Dict[str, str] = {}
        self.cpu: Dict[str, Dict[str, Any]] = {}
        self.server_metrics: Dict[str, Dict[str, Any]] = {}  # per scenario, from the --url node's /metrics
        self.pids = list(args.server_pids)
        self.throttled: Optional[Tuple[str, Throttle]] = None  # (scenario, limit): the run stopped there

    def say(self, text: str) -> None:
        sys.stderr.write("[{}] {}\n".format(time.strftime("%H:%M:%S"), text))
        sys.stderr.flush()

    def measure(self, kind: str, name: str, fn: Callable[[], Any], cpu_of: Callable[[Any], Any] = lambda r: r,
                ) -> Any:
        self.say("{} {} ...".format(kind, name))
        t0 = time.monotonic()
        result = fn()
        err = error_of(result) if isinstance(result, dict) else None
        if isinstance(result, dict) and result.get("throttled"):
            pass  # no figure; run_scenarios stops the run
        elif err:
            self.errors[name] = err
            self.say("  {} failed: {}".format(name, err.splitlines()[0]))
        else:
            readings = cpu_of(result)
            if isinstance(readings, dict) and readings.get("machine_cpu_pct") is not None:
                self.cpu[name] = {k: readings.get(k) for k in CPU_KEYS}
            self.say("  done in {:.1f} s".format(time.monotonic() - t0))
        (self.baselines if kind == "baseline" else self.scenarios)[name] = result
        return result

    # ------------------------------------------------------------ baselines

    def run_baselines(self) -> None:
        s, sel = self.sizes, set(self.args.selected)
        d = s.baseline_duration
        if sel & {"events", "latency", "catchup", "two_nodes"}:
            read_max = max(s.backlog, 10_000)
            self.measure("baseline", "postgres", lambda: run_child(
                baseline_store.postgres, 300, admin_url=self.args.pg_url, duration=d, batch=100,
                payload_bytes=s.payload_bytes, read_limit=s.catchup_limit, read_max=read_max))
            self.measure("baseline", "sqlite", lambda: run_child(
                baseline_store.sqlite, 300, duration=d, batch=100, payload_bytes=s.payload_bytes,
                read_limit=s.catchup_limit, read_max=read_max))
        if "two_nodes" in sel:
            self.measure("baseline", "redis", lambda: run_child(
                baseline_store.redis, 120, url=self.args.redis_url, duration=d, warmup=min(1.0, d),
                window=100, payload_bytes=s.payload_bytes))
        if "memory" in sel:
            # A fresh echo server of its own: memory freed by other loads would be reused.
            self._with_echo(lambda url, pid: self.measure("baseline", "ws_memory", lambda: run_child(
                baseline_ws.memory, 120 + max(s.connections) / 20, url=url, count=max(s.connections),
                concurrency=s.concurrency, server_pid=pid)))
        if not sel & {"handshakes", "cycle", "events", "latency", "fanout", "two_nodes"}:
            return

        def echo_loads(url: str, pid: int) -> None:
            if sel & {"events", "fanout", "two_nodes"}:
                self.measure("baseline", "ws_roundtrips", lambda: run_child(
                    baseline_ws.roundtrips, 120, url=url, conns=s.users * 2, window=s.window,
                    payload_bytes=s.payload_bytes, duration=d, warmup=min(1.0, d), server_pids=[pid]))
            if sel & {"handshakes", "cycle"}:
                self.measure("baseline", "ws_connects", lambda: run_child(
                    baseline_ws.connects, 120 + s.handshakes / 20, url=url, count=s.handshakes,
                    concurrency=s.concurrency, payload_bytes=s.payload_bytes, server_pids=[pid]))
            if "latency" in sel:
                self.measure("baseline", "ws_latency", lambda: run_child(
                    baseline_ws.latency, 120, url=url, conns=10, rate_per_s=s.rate, payload_bytes=s.payload_bytes,
                    duration=max(d, min(s.rate_duration, 5.0)), warmup=min(1.0, d)))

        self._with_echo(echo_loads)

    def _with_echo(self, body: Callable[[str, int], None]) -> None:
        """Run ``body(url, pid)`` against a freshly started echo server, stopped afterwards."""
        try:
            proc, port = baseline_ws.start_echo_server()
        except (OSError, RuntimeError) as e:
            self.errors["ws_echo"] = str(e)
            return
        try:
            body("ws://127.0.0.1:{}/".format(port), proc.pid)
        finally:
            baseline_ws.stop_echo_server(proc)

    # ------------------------------------------------------------ scenarios

    def run_scenarios(self, names: Optional[List[str]] = None) -> None:
        s, a = self.sizes, self.args
        flow_timeout = s.warmup + s.duration + 180
        for name in a.selected if names is None else names:
            before = scrape_metrics(a.url)
            self._run_scenario(name, flow_timeout)
            delta = metrics_delta(before, scrape_metrics(a.url))
            if delta:
                self.server_metrics[name] = delta
            limit = (self.scenarios.get(name) or {}).get("throttled")
            if limit:
                self.throttled = (name, Throttle.from_dict(limit))
                self.say("  stopped: the server throttled {}".format(name))
                return

    def _run_scenario(self, name: str, flow_timeout: float) -> None:
        s, a = self.sizes, self.args
        if name == "memory":
            self.measure("scenario", name, lambda: run_child(
                conns.memory, 300 + max(s.connections) / 10, url=a.ws1, counts=list(s.connections),
                concurrency=s.concurrency, server_pid=a.server_pid), lambda r: None)
            if (self.scenarios[name] or {}).get("skipped"):
                self.errors[name] = self.scenarios[name]["skipped"]
        elif name == "handshakes":
            self.measure("scenario", name, lambda: self._merged(conns.merge_handshakes, run_sharded(
                conns.handshakes, s.client_procs, 120 + s.handshakes / 10, url=a.ws1, count=s.handshakes,
                concurrency=s.concurrency, server_pids=self.pids)), lambda r: r.get("returning"))
        elif name == "cycle":
            self.measure("scenario", name, lambda: self._merged(cycles.merge_cycles, run_sharded(
                cycles.cycle, s.client_procs, s.warmup + s.duration + 120 + s.concurrency / 10, url=a.ws1,
                concurrency=s.concurrency, duration=s.duration, warmup=s.warmup, protocol_version=a.cycle_protocol,
                server_pids=self.pids)))
        elif name == "events":
            self.measure("scenario", name, lambda: self._flow([a.ws1], s.users, 1, False, flow_timeout))
        elif name == "latency":
            self.measure("scenario", name, lambda: run_child(
                flows.fixed_rate, s.rate_duration + s.warmup + 180, url=a.ws1, users=10, rate_per_s=s.rate,
                duration=s.rate_duration, warmup=s.warmup, payload_bytes=s.payload_bytes,
                server_pids=self.pids))
        elif name == "fanout":
            self.measure("scenario", name, lambda: self._flow(
                [a.ws1], 1, s.fanout_devices - 1, False, flow_timeout, shards=1))
        elif name == "catchup":
            self.measure("scenario", name, lambda: run_child(
                flows.catchup, 300 + s.backlog / 100, url=a.ws1, backlog=s.backlog, limit=s.catchup_limit,
                window=200, payload_bytes=s.payload_bytes, server_pids=self.pids))
        elif name == "two_nodes":
            pids = [p for p in (a.server_pid, a.server_pid2) if p]
            self.measure("scenario", name, lambda: self._flow(
                [a.ws1, a.ws2], s.users, 1, True, flow_timeout, server_pids=pids))

    def _flow(self, urls: List[str], users: int, receivers: int, cross: bool, timeout: float,
              shards: Optional[int] = None, server_pids: Optional[List[int]] = None) -> Dict[str, Any]:
        s = self.sizes
        parts = run_sharded(
            flows.flow, shards or s.client_procs, timeout, urls=urls, users=users, window=s.window,
            duration=s.duration, warmup=s.warmup, payload_bytes=s.payload_bytes, receivers=receivers, cross=cross,
            server_pids=self.pids if server_pids is None else server_pids)
        err = flows.first_error(parts)
        return {"error": err} if err else flows.summarize_flow(parts, receivers)

    @staticmethod
    def _merged(merge: Callable[[List[Dict[str, Any]]], Dict[str, Any]], parts: List[Any]) -> Dict[str, Any]:
        limit = next((p["throttled"] for p in parts if p.get("throttled")), None)
        if limit is not None:  # the other shards' errors are the aborted barrier
            return {"throttled": limit}
        err = flows.first_error(parts)
        return {"error": err} if err else merge(parts)


def emit(args: argparse.Namespace, result: Dict[str, Any], text: Callable[[Dict[str, Any]], str]) -> None:
    """The result on stdout: one JSON object with ``--json``, else ``text(result)``."""
    if args.json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
                         .decode() + "\n")
    else:
        sys.stdout.write(text(result) + "\n")
        sys.stdout.write("\n(total {:.0f} s; --json for every detail)\n".format(result["elapsed_s"]))


def stop_throttled(args: argparse.Namespace, scenario: str, limit: Throttle) -> int:
    """The server throttled ``scenario``: one line naming the setting to raise, no figure; exit status 3."""
    sys.stderr.write(limit.line(scenario) + "\n")
    if args.json:
        sys.stdout.write(orjson.dumps({"throttled": {"scenario": scenario, **limit.as_dict()}}).decode() + "\n")
    return EXIT_THROTTLED


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``pocketbridge-bench``."""
    args = parse_args(argv)
    sizes = sizes_from(args)
    raise_fd_limit()
    if args.workers_counts:
        return compare.run(args, lambda a: Run(a, sizes), emit, stop_throttled)
    for url in filter(None, (args.url, args.url2)):
        problem = health(url)
        if problem:
            sys.stderr.write("pocketbridge-bench: {} is not healthy ({})\n".format(http_url(url), problem))
            return 2
    run = Run(args, sizes)
    started = time.monotonic()
    run.say("sizes: {}".format(", ".join("{}={}".format(k, v) for k, v in dataclasses.asdict(sizes).items())))
    if not args.no_baselines:
        run.run_baselines()
    run.run_scenarios()
    if run.throttled is not None:
        return stop_throttled(args, *run.throttled)
    result = report.build(run.scenarios, run.baselines, args.storage)
    if args.prefill:
        result.update(prefilled_pass(run, result))
        if run.throttled is not None:
            return stop_throttled(args, *run.throttled)
    result.update({
        "machine": machine_info(),
        "config": {"url": args.url, "url2": args.url2, "quick": args.quick, "scenarios": args.selected,
                   "cycle_protocol": args.cycle_protocol, **dataclasses.asdict(sizes)},
        "cpu": run.cpu,
        "server_metrics": run.server_metrics,
        "errors": run.errors,
        "elapsed_s": round(time.monotonic() - started, 1),
        "details": {"scenarios": run.scenarios, "baselines": run.baselines},
    })
    emit(args, result, report.table)
    failed = {k for k in run.errors if k in args.selected or k in run.baselines or k.startswith("prefill")}
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
