"""
What the bench reads from outside a scenario: the machine it runs on, and a
server's ``/health`` and ``/metrics`` over plain HTTP (no reactor).
"""

from __future__ import annotations

import os
import platform
import urllib.request
from typing import Any, Dict, Optional

from pocketbridge.bench.load import http_url


def machine_info() -> Dict[str, Any]:
    """nproc, CPU model, memory, load average, versions."""
    info: Dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                                     None)
        with open("/proc/meminfo") as f:
            info["mem_total_mib"] = int(f.readline().split()[1]) // 1024
        info["loadavg_at_start"] = os.getloadavg()[0]
    except (OSError, ValueError, StopIteration):
        pass
    import autobahn
    import twisted

    info["twisted"] = twisted.__version__
    info["autobahn"] = autobahn.__version__
    return info


def scrape_metrics(url: str) -> Dict[str, float]:
    """The server's ``/metrics`` sums and counts we use; empty when unavailable."""
    wanted = ("pocketbridge_commit_batch_events_sum", "pocketbridge_commit_batch_events_count",
              "pocketbridge_commit_seconds_sum", "pocketbridge_delivery_seconds_sum",
              "pocketbridge_delivery_seconds_count")
    try:
        with urllib.request.urlopen(http_url(url) + "/metrics", timeout=5) as response:
            text = response.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return {}
    out: Dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[name] = out.get(name, 0.0) + float(value)
    return out


def metrics_delta(before: Dict[str, float], after: Dict[str, float]) -> Dict[str, Optional[float]]:
    """Mean commit batch, commit time and commit → socket delivery time between two scrapes."""
    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    commits = d("pocketbridge_commit_batch_events_count")
    deliveries = d("pocketbridge_delivery_seconds_count")
    if not commits:
        return {}
    return {
        "commits": commits,
        "mean_batch_events": round(d("pocketbridge_commit_batch_events_sum") / commits, 1),
        "mean_commit_ms": round(1000 * d("pocketbridge_commit_seconds_sum") / commits, 2),
        "mean_commit_to_socket_ms": round(1000 * d("pocketbridge_delivery_seconds_sum") / deliveries, 2)
        if deliveries else None,
    }


def health(url: str) -> Optional[str]:
    """None if ``GET /health`` answers 200, else why not."""
    try:
        with urllib.request.urlopen(http_url(url) + "/health", timeout=5) as response:
            return None if response.status == 200 else "HTTP {}".format(response.status)
    except Exception as e:
        return "{}: {}".format(type(e).__name__, e)
