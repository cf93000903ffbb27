"""
Turning measurements into the benchmark's result: the flat JSON keys (each
headline number with its baseline and their ratio), the targets of the
issue, and the text table.

``build(scenarios, baselines, storage)`` takes the per-scenario and
per-baseline result dicts (or ``{"error": ...}``) and returns one JSON-ready
dict; ``table(result)`` renders it for a terminal.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from pocketbridge.bench import prefill
from pocketbridge.bench.stats import ratio

#: (name, key, comparison, threshold): the issue's targets.
TARGETS: List[Tuple[str, str, str, float]] = [
    ("handshakes >= 1,000/s", "handshakes_per_s", ">=", 1000.0),
    ("handshake cycles >= 1,200/s", "cycles_per_s", ">=", 1200.0),
    ("<= 0.5 ms server CPU per cycle", "cycle_server_cpu_ms", "<=", 0.5),
    ("events >= 5,000/s end to end", "events_per_s", ">=", 5000.0),
    ("p99 <= 25 ms at the fixed rate", "latency_p99_ms", "<=", 25.0),
    ("<= 30 KiB per idle connection", "rss_per_conn_kib", "<=", 30.0),
    ("catch-up >= 20,000 events/s", "catchup_events_per_s", ">=", 20000.0),
    ("two nodes >= 1.6x one node", "two_nodes_ratio", ">=", 1.6),
]

#: Table rows: (label, value key, baseline key, ratio key).
ROWS: List[Tuple[str, str, Optional[str], Optional[str]]] = [
    ("1 handshakes/s (returning devices)", "handshakes_per_s", "baseline_ws_connects_per_s", "handshakes_ratio"),
    ("  handshakes/s (new devices)", "handshakes_new_per_s", "baseline_ws_connects_per_s", "handshakes_new_ratio"),
    ("8 cycles/s (connect, handshake, close)", "cycles_per_s", "baseline_ws_connects_per_s", "cycle_ratio"),
    ("  server CPU ms per cycle", "cycle_server_cpu_ms", None, None),
    ("  cycle p50 ms", "cycle_p50_ms", None, None),
    ("  cycle p99 ms", "cycle_p99_ms", None, None),
    ("2 events/s end to end", "events_per_s", "baseline_ws_roundtrips_per_s", "events_ratio"),
    ("  events/s vs storage rows/s", "events_per_s", "baseline_storage_rows_per_s", "events_vs_storage_ratio"),
    ("  delivery latency p50 ms (saturated)", "events_latency_p50_ms", None, None),
    ("  delivery latency p95 ms (saturated)", "events_latency_p95_ms", None, None),
    ("  delivery latency p99 ms (saturated)", "events_latency_p99_ms", None, None),
    ("3 latency p50 ms at fixed rate", "latency_p50_ms", "baseline_latency_p50_ms", "latency_p50_ratio"),
    ("  latency p99 ms at fixed rate", "latency_p99_ms", "baseline_latency_p99_ms", "latency_p99_ratio"),
    ("4 RSS KiB per idle connection", "rss_per_conn_kib", "baseline_ws_rss_per_conn_kib", "rss_per_conn_ratio"),
    ("5 catch-up events/s", "catchup_events_per_s", "baseline_storage_read_rows_per_s", "catchup_ratio"),
    ("  backlog upload events/s (no receiver)", "catchup_upload_events_per_s", "baseline_storage_rows_per_s",
     "catchup_upload_ratio"),
    ("6 fan-out deliveries/s (1 -> 9 devices)", "fanout_deliveries_per_s", "baseline_ws_roundtrips_per_s",
     "fanout_ratio"),
    ("  fan-out events/s", "fanout_events_per_s", None, None),
    ("  fan-out latency p99 ms", "fanout_latency_p99_ms", None, None),
    ("7 two nodes events/s", "two_nodes_events_per_s", "events_per_s", "two_nodes_ratio"),
    ("  two nodes vs Redis PUBLISH/s", "two_nodes_events_per_s", "baseline_redis_publish_per_s",
     "two_nodes_vs_redis_ratio"),
    ("  two nodes latency p99 ms (saturated)", "two_nodes_latency_p99_ms", None, None),
]

REQUIRED_KEYS = (
    "handshakes_per_s", "events_per_s", "latency_p50_ms", "latency_p99_ms", "rss_per_conn_kib",
    "catchup_events_per_s",
)


def _get(d: Optional[Dict[str, Any]], *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or "error" in d and key != "error":
            return None
        d = d.get(key)
    return d


def _add(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a + b, 3) if a is not None and b is not None else None


def build(scenarios: Dict[str, Any], baselines: Dict[str, Any], storage: str) -> Dict[str, Any]:
    """The flat result: headline numbers, baselines, ratios, targets."""
    hs, ev, lat = scenarios.get("handshakes"), scenarios.get("events"), scenarios.get("latency")
    cy = scenarios.get("cycle")
    mem, cu, fo, tn = (scenarios.get(k) for k in ("memory", "catchup", "fanout", "two_nodes"))
    pg, sq, rd = baselines.get("postgres"), baselines.get("sqlite"), baselines.get("redis")
    store = pg if storage == "postgresql" else sq
    steps = _get(mem, "steps") or []
    out: Dict[str, Any] = {
        "handshakes_per_s": _get(hs, "returning", "per_s"),
        "handshakes_new_per_s": _get(hs, "new", "per_s"),
        "cycles_per_s": _get(cy, "cycles_per_s"),
        "cycle_server_cpu_ms": _get(cy, "server_cpu_ms_per_cycle"),
        "cycle_p50_ms": _get(cy, "cycle_p50_ms"),
        "cycle_p99_ms": _get(cy, "cycle_p99_ms"),
        "cycle_protocol_version": _get(cy, "protocol_version"),
        "events_per_s": _get(ev, "events_per_s"),
        "events_latency_p50_ms": _get(ev, "latency_p50_ms"),
        "events_latency_p95_ms": _get(ev, "latency_p95_ms"),
        "events_latency_p99_ms": _get(ev, "latency_p99_ms"),
        "latency_rate_per_s": _get(lat, "target_per_s"),
        "latency_p50_ms": _get(lat, "latency_p50_ms"),
        "latency_p95_ms": _get(lat, "latency_p95_ms"),
        "latency_p99_ms": _get(lat, "latency_p99_ms"),
        "rss_per_conn_kib": steps[-1]["per_conn_kib"] if steps else None,
        "rss_per_conn_kib_by_count": {str(s["connections"]): s["per_conn_kib"] for s in steps},
        "catchup_events_per_s": _get(cu, "events_per_s"),
        "catchup_upload_events_per_s": _get(cu, "upload_events_per_s"),
        "fanout_events_per_s": _get(fo, "events_per_s"),
        "fanout_deliveries_per_s": _get(fo, "deliveries_per_s"),
        "fanout_latency_p99_ms": _get(fo, "latency_p99_ms"),
        "two_nodes_events_per_s": _get(tn, "events_per_s"),
        "two_nodes_latency_p99_ms": _get(tn, "latency_p99_ms"),
        # Baselines measured in this run.
        "baseline_ws_roundtrips_per_s": _get(baselines.get("ws_roundtrips"), "roundtrips_per_s"),
        "baseline_ws_connects_per_s": _get(baselines.get("ws_connects"), "connects_per_s"),
        "baseline_ws_rtt_p50_ms": _get(baselines.get("ws_latency"), "rtt_p50_ms"),
        "baseline_ws_rtt_p99_ms": _get(baselines.get("ws_latency"), "rtt_p99_ms"),
        "baseline_ws_rss_per_conn_kib": _get(baselines.get("ws_memory"), "per_conn_kib"),
        "baseline_pg_commits_per_s": _get(pg, "commits_per_s"),
        "baseline_pg_commit_p50_ms": _get(pg, "commit_p50_ms"),
        "baseline_pg_commit_p99_ms": _get(pg, "commit_p99_ms"),
        "baseline_pg_batch_commits_per_s": _get(pg, "batch_commits_per_s"),
        "baseline_pg_rows_per_s": _get(pg, "rows_per_s"),
        "baseline_pg_read_rows_per_s": _get(pg, "read_rows_per_s"),
        "baseline_sqlite_commits_per_s": _get(sq, "commits_per_s"),
        "baseline_sqlite_rows_per_s": _get(sq, "rows_per_s"),
        "baseline_sqlite_read_rows_per_s": _get(sq, "read_rows_per_s"),
        "baseline_redis_publish_per_s": _get(rd, "publish_per_s"),
        "baseline_storage": storage,
        "baseline_storage_rows_per_s": _get(store, "rows_per_s"),
        "baseline_storage_read_rows_per_s": _get(store, "read_rows_per_s"),
    }
    # The latency floor: one echo round trip (the two WebSocket hops) plus one
    # durable one-row commit, each at its own percentile.
    out["baseline_latency_p50_ms"] = _add(out["baseline_ws_rtt_p50_ms"], _get(store, "commit_p50_ms"))
    out["baseline_latency_p99_ms"] = _add(out["baseline_ws_rtt_p99_ms"], _get(store, "commit_p99_ms"))
    for label, key, base_key, ratio_key in ROWS:
        if base_key and ratio_key:
            out[ratio_key] = ratio(out.get(key), out.get(base_key))
    out["targets"] = targets(out)
    out["notes"] = notes(pg, storage)
    return out


def notes(pg: Optional[Dict[str, Any]], storage: str) -> List[str]:
    """Conditions of this machine that change what the numbers mean."""
    found = []
    if storage == "postgresql" and _get(pg, "autovacuum") == "off":
        found.append(
            "PostgreSQL runs with autovacuum off: the server's tables are never ANALYZEd. The event path's "
            "plans use the indexes either way (tests/test_query_plans.py checks both states), but production "
            "runs with statistics; run ANALYZE on the server's database, or turn autovacuum on, to measure "
            "that state (docs/benchmarks.md)")
    if _get(pg, "fsync") == "off":
        found.append("PostgreSQL runs with fsync off: commit numbers are not durable-commit numbers")
    return found


def targets(out: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each target with the measured value and whether it is met (None: not measured)."""
    result = []
    for name, key, op, threshold in TARGETS:
        value = out.get(key)
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        result.append({"target": name, "key": key, "value": value, "threshold": threshold, "met": met})
    return result


def fmt(value: Any) -> str:
    """A number as the tables print it (- for none)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return "{:,.0f}".format(value)
        return "{:.3g}".format(value) if abs(value) < 10 else "{:.1f}".format(value)
    if isinstance(value, int):
        return "{:,}".format(value)
    return str(value)


def table(result: Dict[str, Any]) -> str:
    """The results as aligned text: metric, value, baseline, ratio; then targets, CPU and errors."""
    lines = []
    header = ("scenario / metric", "value", "baseline", "baseline value", "ratio")
    rows = [header]
    for label, key, base_key, ratio_key in ROWS:
        if result.get(key) is None:
            continue  # not run (a failure is listed under "problems")
        rows.append((label, fmt(result.get(key)), base_key or "", fmt(result.get(base_key)) if base_key else "",
                     fmt(result.get(ratio_key)) if ratio_key else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[j]) if j in (0, 2) else c.rjust(widths[j]) for j, c in enumerate(r)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("targets:")
    for t in result["targets"]:
        mark = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append("  {:<34} {:>10}  {}".format(t["target"], fmt(t["value"]), mark))
    cpu = result.get("cpu") or {}
    if cpu:
        lines.append("")
        lines.append("CPU during each measurement, % of one core (machine has {} cores):".format(
            (result.get("machine") or {}).get("nproc", "?")))
        keys = ("server", "client", "postgres", "redis", "other", "machine")
        lines.append("  {:<22}".format("measurement") + "".join("{:>10}".format(k) for k in keys))
        for name, readings in cpu.items():
            lines.append("  {:<22}".format(name) + "".join(
                "{:>10}".format(fmt(readings.get(k + "_cpu_pct"))) for k in keys))
    server = result.get("server_metrics") or {}
    if server:
        lines.append("")
        lines.append("writer transactions on the --url node (from its /metrics):")
        lines.append("  {:<12}{:>10}{:>16}{:>16}{:>22}".format(
            "scenario", "commits", "events/commit", "ms/commit", "commit->socket ms"))
        for name, m in server.items():
            lines.append("  {:<12}{:>10}{:>16}{:>16}{:>22}".format(
                name, fmt(m.get("commits")), fmt(m.get("mean_batch_events")), fmt(m.get("mean_commit_ms")),
                fmt(m.get("mean_commit_to_socket_ms"))))
    lines.extend(prefill.table_lines(result))
    for note in result.get("notes") or []:
        lines.append("")
        lines.append("note: " + note)
    errors = result.get("errors") or {}
    if errors:
        lines.append("")
        lines.append("problems:")
        for name, err in errors.items():
            lines.append("  {}: {}".format(name, str(err).splitlines()[0][:200] if err else err))
    return "\n".join(lines)
