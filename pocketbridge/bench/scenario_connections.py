"""
Scenarios about connections: handshakes per second (1) and server memory per
idle authenticated connection (4).

Each is an ``async def measure(reactor, ...) -> dict`` run in a child process
by ``pocketbridge.bench.runner``. Every client is its own user with one
device, speaking the full v1 handshake through the SDK's ``Client``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from pocketbridge.bench import load
from pocketbridge.bench.runner import start_together
from pocketbridge.bench.throttle import Throttle
from pocketbridge.bench.stats import Window, merge_cpu, process_rss_kib, rate


def settle_time(connections: int) -> float:
    """Seconds to wait after opening sockets before reading RSS (post-handshake work, cursor writes)."""
    return min(2.0, 0.3 + connections / 1000.0)


def _share(total: int, shard: int, shards: int) -> int:
    """This shard's part of ``total`` (the first shards take the remainder)."""
    return total // shards + (1 if shard < total % shards else 0)


async def handshakes(
    reactor: Any, url: str, count: int, concurrency: int, server_pids: Sequence[int] = (),
    shard: int = 0, shards: int = 1, barrier: Any = None,
) -> Dict[str, Any]:
    """
    Scenario 1: ``count`` full v1 handshakes (TCP connect, WebSocket upgrade,
    client_hello → server_hello → client_auth → session_established),
    ``concurrency`` in flight at a time, all sockets kept open until the
    round ends. Round ``new`` registers new devices (a device and a user row
    are inserted); round ``returning`` reconnects the same devices, the
    steady state of a real deployment.
    """
    n = _share(count, shard, shards)
    per_shard = max(1, _share(concurrency, shard, shards))
    clients = [load.new_client(reactor, url, ident) for ident in load.identities(n)]
    out: Dict[str, Any] = {"clients": n}
    throttled: List[Throttle] = []
    for round_name in ("new", "returning"):
        await start_together(reactor, barrier)
        window = Window(server_pids if shard == 0 else ()).start()
        ok, errors, durations = await load.connect_all(clients, per_shard, throttled)
        stats = window.stop()
        await load.close_all(reactor, ok)
        if throttled:
            if barrier is not None:
                barrier.abort()  # the other shards stop at their next start_together
            return {"throttled": throttled[0].as_dict()}
        out[round_name] = {
            "ok": len(ok), "errors": len(errors), "first_error": errors[0] if errors else None,
            "durations": durations, **stats,
        }
        await load.sleep(reactor, 1.0)  # let the server finish the disconnects before the next round
    return out


def merge_handshakes(parts: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Combine the shards of ``handshakes``: rates over the slowest shard's wall time."""
    from pocketbridge.bench.stats import latency_summary

    out: Dict[str, Any] = {"client_processes": len(parts)}
    for round_name in ("new", "returning"):
        rounds = [p[round_name] for p in parts]
        ok = sum(r["ok"] for r in rounds)
        elapsed = max(r["elapsed_s"] for r in rounds)
        first_error = next((r["first_error"] for r in rounds if r["first_error"]), None)
        durations = [d for r in rounds for d in r["durations"]]
        out[round_name] = {
            "handshakes": ok,
            "errors": sum(r["errors"] for r in rounds),
            "first_error": first_error,
            "per_s": rate(ok, elapsed),
            "elapsed_s": elapsed,
            **merge_cpu(rounds),
            **latency_summary(durations, "connect_"),
        }
    return out


async def memory(
    reactor: Any, url: str, counts: Sequence[int], concurrency: int, server_pid: Optional[int],
    settle: Optional[float] = None,
) -> Dict[str, Any]:
    """
    Scenario 4: server RSS growth per idle authenticated connection.

    Opens authenticated sockets up to each of ``counts`` (cumulative) and
    reads the server's ``VmRSS`` after ``settle`` seconds; per-connection =
    (RSS now − RSS before the first socket) / sockets open. Needs the
    server's pid (same machine). Run it on a freshly started server: memory
    freed by earlier scenarios is reused and would hide the growth.
    """
    if not server_pid:
        return {"skipped": "needs --server-pid"}
    before = process_rss_kib(server_pid)
    if before is None:
        return {"skipped": "cannot read /proc/{}/status".format(server_pid)}
    clients: List[Any] = []
    steps = []
    errors: List[str] = []
    for target in counts:
        fresh = [load.new_client(reactor, url, ident) for ident in load.identities(max(0, target - len(clients)))]
        window = Window([server_pid]).start()
        throttled: List[Throttle] = []
        ok, errs, _ = await load.connect_all(fresh, concurrency, throttled)
        connect_stats = window.stop()
        clients.extend(ok)
        errors.extend(errs)
        if throttled:
            await load.close_all(reactor, clients, timeout=30.0)
            return {"throttled": throttled[0].as_dict()}
        await load.sleep(reactor, settle_time(len(clients)) if settle is None else settle)
        rss = process_rss_kib(server_pid) or 0
        steps.append({
            "connections": len(clients),
            "rss_kib": rss,
            "delta_kib": rss - before,
            "per_conn_kib": round((rss - before) / len(clients), 2) if clients else None,
            "connect_per_s": rate(len(ok), connect_stats["elapsed_s"] or 0.0),
        })
    await load.close_all(reactor, clients, timeout=30.0)
    return {
        "rss_before_kib": before, "steps": steps, "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }
