"""
Scenarios about events: end-to-end throughput and latency (2), latency at a
fixed rate (3), catch-up of a backlog (5), fan-out to 10 devices (6) and the
end-to-end flow across two nodes (7).

The path measured is the product's: a device sends an event, the server
commits it durably, acks it, and relays it to the user's other devices,
which ack it back (v1 acks, as real clients do). Latency is send → receive
(the payload carries the send time) and send → ack.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from pocketbridge.bench import load
from pocketbridge.bench.runner import start_together
from pocketbridge.bench.stats import Window, latency_summary, merge_cpu, rate


class _Topology:
    """Users, each with one sending device and ``receivers`` receiving devices, placed on nodes."""

    def __init__(self, reactor: Any, urls: Sequence[str], users: int, receivers: int, cross: bool,
                 user_offset: int = 0) -> None:
        self.sink = load.Sink()
        self.senders = []
        self.receivers = []
        for i, ident in enumerate(load.identities(users)):
            home = (i + user_offset) % len(urls)
            away = (home + 1) % len(urls) if cross else home
            self.senders.append(load.new_client(reactor, urls[home], ident))
            for _ in range(receivers):
                self.receivers.append(load.new_client(reactor, urls[away], ident, self.sink))

    async def connect(self, concurrency: int = 50) -> List[str]:
        """Receivers first (so no event is relayed before its receiver listens), then senders."""
        _, errors1, _ = await load.connect_all(self.receivers, concurrency)
        _, errors2, _ = await load.connect_all(self.senders, concurrency)
        return errors1 + errors2

    async def close(self, reactor: Any) -> None:
        await load.close_all(reactor, self.senders + self.receivers)


async def flow(
    reactor: Any, urls: Sequence[str], users: int, window: int, duration: float, warmup: float,
    payload_bytes: int, receivers: int = 1, cross: bool = False, server_pids: Sequence[int] = (),
    shard: int = 0, shards: int = 1, barrier: Any = None,
) -> Dict[str, Any]:
    """
    Scenarios 2, 6 and 7: a closed loop of ``window`` unacked events per
    sender, ``users`` users with ``receivers`` other devices each. With
    ``cross`` each user's receivers sit on the other node (``urls`` has two),
    and users alternate which node they send to.

    Counts what was acked and delivered during ``duration`` seconds after
    ``warmup``; returns raw latency samples for ``summarize_flow``.
    """
    users_here = users // shards + (1 if shard < users % shards else 0)
    topo = _Topology(reactor, urls, users_here, receivers, cross, user_offset=shard)
    errors = await topo.connect()
    if errors:
        await topo.close(reactor)
        return {"error": "{} clients failed to connect; first: {}".format(len(errors), errors[0])}
    sender = load.WindowSender(topo.senders, window, load.PayloadMaker(payload_bytes))
    await start_together(reactor, barrier)
    sender.start()
    await load.sleep(reactor, warmup)
    sender.recording = topo.sink.recording = True
    win = Window(server_pids if shard == 0 else ()).start()
    await load.sleep(reactor, duration)
    sender.recording = topo.sink.recording = False
    stats = win.stop()
    drained = sender.stop()
    drained.addTimeout(30, reactor)
    await drained
    await load.sleep(reactor, 0.2)
    await topo.close(reactor)
    return {
        "acked": sender.acked, "delivered": topo.sink.count, "failures": sender.failures,
        "latencies": topo.sink.latencies, "ack_latencies": sender.ack_latencies, **stats,
    }


def summarize_flow(parts: List[Dict[str, Any]], receivers: int = 1) -> Dict[str, Any]:
    """Combine the shards of ``flow``: rates over the longest window, percentiles over all samples."""
    errors = [p["error"] for p in parts if "error" in p]
    if errors:
        return {"error": errors[0]}
    elapsed = max(p["elapsed_s"] for p in parts)
    acked = sum(p["acked"] for p in parts)
    delivered = sum(p["delivered"] for p in parts)
    return {
        "events_per_s": rate(acked, elapsed),
        "deliveries_per_s": rate(delivered, elapsed),
        "acked": acked,
        "delivered": delivered,
        "expected_deliveries": acked * receivers,
        "failures": sum(p["failures"] for p in parts),
        "elapsed_s": elapsed,
        "client_processes": len(parts),
        **merge_cpu(parts),
        **latency_summary([v for p in parts for v in p["latencies"]], "latency_"),
        **latency_summary([v for p in parts for v in p["ack_latencies"]], "ack_latency_"),
    }


async def fixed_rate(
    reactor: Any, url: str, users: int, rate_per_s: float, duration: float, warmup: float, payload_bytes: int,
    server_pids: Sequence[int] = (),
) -> Dict[str, Any]:
    """
    Scenario 3: an open loop of ``rate_per_s`` events/s in total, spread over
    ``users`` users (one sender and one receiver each); latency percentiles
    of what was delivered during ``duration`` after ``warmup``.
    """
    topo = _Topology(reactor, [url], users, 1, cross=False)
    errors = await topo.connect()
    if errors:
        await topo.close(reactor)
        return {"error": "{} clients failed to connect; first: {}".format(len(errors), errors[0])}
    sender = load.RateSender(reactor, topo.senders, rate_per_s, load.PayloadMaker(payload_bytes))
    sender.start()
    await load.sleep(reactor, warmup)
    sender.recording = topo.sink.recording = True
    win = Window(server_pids).start()
    late_before = sender.late_ticks
    await load.sleep(reactor, duration)
    sender.recording = topo.sink.recording = False
    stats = win.stop()
    drained = sender.stop()
    drained.addTimeout(30, reactor)
    await drained
    await topo.close(reactor)
    return {
        "target_per_s": rate_per_s,
        "events_per_s": rate(sender.acked, stats["elapsed_s"] or 0.0),
        "deliveries_per_s": rate(topo.sink.count, stats["elapsed_s"] or 0.0),
        "failures": sender.failures,
        "late_ticks": sender.late_ticks - late_before,
        **stats,
        **latency_summary(topo.sink.latencies, "latency_"),
        **latency_summary(sender.ack_latencies, "ack_latency_"),
    }


async def catchup(
    reactor: Any, url: str, backlog: int, limit: int, window: int, payload_bytes: int,
    server_pids: Sequence[int] = (),
) -> Dict[str, Any]:
    """
    Scenario 5: a device comes back to ``backlog`` events it has not seen.

    A receiving device registers and leaves; another device of the user
    uploads the backlog (measured too: events/s with no live receiver); the
    receiver reconnects and pages with ``limit`` until ``has_more`` is false,
    acking every event as v1 clients do. Events/s = backlog / (connect start
    → last page).
    """
    ident = load.identities(1)[0]
    receiver = load.new_client(reactor, url, ident)
    await receiver.connect()
    await receiver.close()
    sender = load.new_client(reactor, url, ident)
    await sender.connect()
    upload = load.WindowSender([sender], window, load.PayloadMaker(payload_bytes), limit=backlog)
    upload.recording = True
    win = Window(server_pids).start()
    upload.start()
    drained = upload.drained()
    drained.addTimeout(max(60.0, backlog / 200.0), reactor)
    await drained
    upload_stats = win.stop()
    await sender.close()
    await load.sleep(reactor, 0.5)

    win = Window(server_pids).start()
    est = await receiver.connect()
    pages = receiver.catch_up(limit=limit, timeout=60.0)
    pages.addTimeout(max(120.0, backlog / 500.0), reactor)
    events = await pages
    stats = win.stop()
    await receiver.close()
    return {
        "backlog": backlog,
        "limit": limit,
        "replayed": len(events),
        "complete": len(events) >= backlog,
        "last_ack_device_seq": est.get("last_ack_device_seq"),
        "events_per_s": rate(len(events), stats["elapsed_s"] or 0.0),
        "upload_events_per_s": rate(upload.acked, upload_stats["elapsed_s"] or 0.0),
        "upload_failures": upload.failures,
        "upload_server_cpu_pct": upload_stats.get("server_cpu_pct"),
        **stats,
    }


def first_error(parts: Sequence[Optional[Dict[str, Any]]]) -> Optional[str]:
    """The first error among shard outcomes, or None."""
    for p in parts:
        if p is None:
            return "no result"
        if "error" in p:
            return str(p["error"])
    return None
