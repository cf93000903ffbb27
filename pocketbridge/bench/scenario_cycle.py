"""
Scenario ``cycle``: connect → handshake → close, again and again.

After a node restart or a network blip every client of the node reconnects
at once, and each reconnect is a whole cycle: TCP connect, WebSocket
upgrade, the full handshake of a device the server already knows, and
(later) its close. Unlike ``handshakes``, which keeps every socket open until
its round ends, this measures that cycle as the server serves it under
steady churn: ``concurrency`` clients in flight, each closing its socket and
connecting again, for the measurement window.

Reported: ``cycles_per_s``, the server's CPU per cycle in ms (summed over the
server pids), p50/p99 cycle time (connect call → close answered). The
ratio against the bare echo server's connects/s is made by ``report``.
A refusal that is a server limit stops every client at once and the result
is ``{"throttled": ...}`` instead of a figure (``throttle``).
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

from twisted.internet.defer import Deferred, gatherResults

from pocketbridge.bench import load
from pocketbridge.bench.runner import start_together
from pocketbridge.bench.stats import Window, latency_summary, merge_cpu, rate
from pocketbridge.bench.throttle import Throttle, of_exception
from pocketbridge.client import Client

#: Seconds a close may take before the cycle gives up waiting for the server's answer.
CLOSE_TIMEOUT = 10.0


class Cycler:
    """
    The loop of one scenario run: each worker owns one returning device and
    cycles it until ``stop``. Cycles finished while ``recording`` are counted
    with their duration; the first throttle stops every worker.
    """

    def __init__(self, reactor: Any, clients: Sequence[Client]) -> None:
        self.reactor = reactor
        self.clients = list(clients)
        self.running = True
        self.recording = False
        self.cycles = 0
        self.durations: List[float] = []
        self.errors = 0
        self.first_error: Optional[str] = None
        self.throttled: Optional[Throttle] = None

    def stop(self) -> None:
        """No worker starts another cycle."""
        self.running = False

    async def one(self, client: Client) -> None:
        """One cycle of ``client``: connect and handshake, then close and wait for the server's answer."""
        t0 = time.monotonic()
        try:
            await client.connect()
        except Exception as e:  # counted; a limit stops the run
            self._failed(e)
            return
        d = client.close()
        d.addTimeout(CLOSE_TIMEOUT, self.reactor)
        try:
            await d
        except Exception as e:
            self._failed(e)
            return
        if self.recording:
            self.cycles += 1
            self.durations.append(time.monotonic() - t0)

    def _failed(self, e: Exception) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = "{}: {}".format(type(e).__name__, e)
        limit = of_exception(e)
        if limit is not None and self.throttled is None:
            self.throttled = limit
            self.stop()

    async def worker(self, client: Client) -> None:
        """Cycle ``client`` until stopped."""
        while self.running:
            await self.one(client)
            if self.errors and not self.recording and self.errors > 10 * len(self.clients):
                self.stop()  # the server refuses everything during warm-up: no figure to take

    def run(self) -> "Deferred[Any]":
        """Start every worker; fires once all have stopped."""
        return gatherResults([Deferred.fromCoroutine(self.worker(c)) for c in self.clients], consumeErrors=True)


async def _wait(reactor: Any, cycler: Cycler, seconds: float) -> None:
    """Sleep ``seconds`` in short steps, returning early once the cycler stopped (a throttle)."""
    deadline = time.monotonic() + seconds
    while cycler.running and time.monotonic() < deadline:
        await load.sleep(reactor, min(0.05, max(0.0, deadline - time.monotonic())))


async def cycle(
    reactor: Any, url: str, concurrency: int, duration: float, warmup: float, protocol_version: int = 1,
    server_pids: Sequence[int] = (), shard: int = 0, shards: int = 1, barrier: Any = None,
) -> Dict[str, Any]:
    """
    Register ``concurrency`` devices (this shard's share) in a setup round,
    then cycle them for ``warmup`` + ``duration`` seconds and count the
    cycles of the last ``duration``.
    """
    n = max(1, concurrency // shards + (1 if shard < concurrency % shards else 0))
    clients = [load.new_client(reactor, url, ident, protocol_version=protocol_version)
               for ident in load.identities(n)]
    throttled: List[Throttle] = []
    ok, errors, _ = await load.connect_all(clients, n, throttled)
    await load.close_all(reactor, ok)
    if throttled:
        if barrier is not None:
            barrier.abort()
        return {"throttled": throttled[0].as_dict()}
    if errors:
        return {"error": "setup round: {} of {} devices failed to register: {}".format(len(errors), n, errors[0])}
    await load.sleep(reactor, 0.5)  # the server finishes the setup round's closes
    await start_together(reactor, barrier)
    cycler = Cycler(reactor, clients)
    done = cycler.run()
    await _wait(reactor, cycler, warmup)
    cycler.recording = True
    window = Window(server_pids if shard == 0 else ()).start()
    await _wait(reactor, cycler, duration)
    stats = window.stop()
    cycler.recording = False
    cycler.stop()
    await done
    if cycler.throttled is not None:
        if barrier is not None:
            barrier.abort()
        return {"throttled": cycler.throttled.as_dict()}
    return {
        "protocol_version": protocol_version, "clients": n, "cycles": cycler.cycles, "errors": cycler.errors,
        "first_error": cycler.first_error, "durations": cycler.durations, **stats,
    }


def merge_cycles(parts: List[Dict[str, Any]]) -> Dict[str, Any]:
    """
    Combine the shards: cycles summed over the slowest shard's window; the
    server's CPU (read by shard 0) divided by all the shards' cycles.
    """
    throttled = next((p["throttled"] for p in parts if p.get("throttled")), None)
    if throttled is not None:
        return {"throttled": throttled}
    cycles = sum(p["cycles"] for p in parts)
    elapsed = max(p["elapsed_s"] or 0.0 for p in parts)
    server_pct = parts[0].get("server_cpu_pct")
    cpu_ms: Optional[float] = None
    if server_pct is not None and cycles:
        cpu_ms = round(10.0 * server_pct * (parts[0]["elapsed_s"] or 0.0) / cycles, 3)  # % × s → ms
    summary = latency_summary([d for p in parts for d in p["durations"]], "cycle_")
    return {
        "protocol_version": parts[0]["protocol_version"],
        "client_processes": len(parts),
        "concurrency": sum(p["clients"] for p in parts),
        "cycles": cycles,
        "cycles_per_s": rate(cycles, elapsed),
        "server_cpu_ms_per_cycle": cpu_ms,
        "errors": sum(p["errors"] for p in parts),
        "first_error": next((p["first_error"] for p in parts if p["first_error"]), None),
        "elapsed_s": elapsed,
        **merge_cpu(parts),
        **summary,
    }
