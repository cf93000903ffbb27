"""
Numbers for the benchmark: latency percentiles and what a process or the
whole machine spent on CPU during a measurement window.

CPU and memory are read from ``/proc`` (Linux only); on another system the
readings are ``None`` and the benchmark still runs. Nothing here touches the
reactor.
"""

from __future__ import annotations

import math
import os
import resource
import time
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0–100, nearest rank) of already sorted values; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(seconds: Iterable[float], prefix: str = "") -> Dict[str, Optional[float]]:
    """p50/p95/p99/max in milliseconds (rounded to µs) and the sample count, keys prefixed."""
    values = sorted(seconds)

    def ms(v: float) -> Optional[float]:
        return None if math.isnan(v) else round(v * 1000.0, 3)

    return {
        prefix + "count": len(values),
        prefix + "p50_ms": ms(percentile(values, 50)),
        prefix + "p95_ms": ms(percentile(values, 95)),
        prefix + "p99_ms": ms(percentile(values, 99)),
        prefix + "max_ms": ms(values[-1]) if values else None,
    }


def rate(count: float, seconds: float) -> float:
    """``count / seconds`` rounded to 0.1, 0 for an empty window."""
    return round(count / seconds, 1) if seconds > 0 else 0.0


def ratio(value: Optional[float], baseline: Optional[float]) -> Optional[float]:
    """``value / baseline`` to 3 decimals, None when either is missing or the baseline is 0."""
    if value is None or baseline is None or baseline == 0:
        return None
    return round(value / baseline, 3)


# ---------------------------------------------------------------- /proc


def process_cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU seconds of process ``pid`` (all its threads); None if unreadable."""
    try:
        with open("/proc/{}/stat".format(pid), "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(")") + 2:].split()
    try:
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (IndexError, ValueError):
        return None


def process_rss_kib(pid: int) -> Optional[int]:
    """Resident set size of ``pid`` in KiB (``VmRSS``); None if unreadable."""
    try:
        with open("/proc/{}/status".format(pid), "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def machine_cpu_ticks() -> Optional[List[int]]:
    """(busy, total) jiffies of all CPUs from ``/proc/stat``; None if unreadable."""
    try:
        with open("/proc/stat", "rb") as f:
            first = f.readline().split()
    except OSError:
        return None
    values = [int(v) for v in first[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return [total - idle, total]


def _proc_stats() -> Iterator[Tuple[int, str, List[str]]]:
    """``(pid, command name, the fields after it)`` of each process visible in ``/proc/<pid>/stat``."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/{}/stat".format(name), "rb") as f:
                data = f.read().decode("ascii", "replace")
        except OSError:
            continue
        yield int(name), data[data.find("(") + 1:data.rfind(")")], data[data.rfind(")") + 2:].split()


def all_process_cpu() -> Dict[int, Tuple[str, float]]:
    """``{pid: (command name, CPU seconds)}`` of every process visible in ``/proc``."""
    out: Dict[int, Tuple[str, float]] = {}
    for pid, comm, fields in _proc_stats():
        try:
            out[pid] = (comm, (int(fields[11]) + int(fields[12])) / _TICKS)
        except (IndexError, ValueError):
            continue
    return out


def _children(pid: int) -> List[int]:
    """The child pids of ``pid``: from ``/proc/<pid>/task/*/children``, else by scanning ``/proc`` for the ppid."""
    found: List[int] = []
    try:
        tasks = os.listdir("/proc/{}/task".format(pid))
        for tid in tasks:
            with open("/proc/{}/task/{}/children".format(pid, tid)) as f:
                found.extend(int(c) for c in f.read().split())
        return found
    except (OSError, ValueError):
        pass
    for child, _, fields in _proc_stats():
        try:
            if int(fields[1]) == pid:
                found.append(child)
        except (IndexError, ValueError):
            continue
    return found


def with_descendants(pids: Iterable[int]) -> List[int]:
    """
    ``pids`` and every process below them. A server started with
    ``--workers N`` is a supervisor and its worker processes: its CPU is the
    sum over all of them, whichever pid the user gave.
    """
    out: List[int] = []
    todo = [p for p in pids if p]
    while todo:
        pid = todo.pop(0)
        if pid in out:
            continue
        out.append(pid)
        todo.extend(_children(pid))
    return out


#: Command names counted as the database and bus of the system under test.
_SERVICE_NAMES = {"postgres": "postgres_cpu_pct", "redis-server": "redis_cpu_pct"}


def own_cpu_seconds() -> float:
    """CPU seconds (user + system) this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Window:
    """
    A measurement window: wall time, this process's CPU, the CPU of the
    server processes given, and the whole machine's CPU.

    CPU is reported in percent of one core (200 = both cores of a 2-core
    machine busy). ``start()`` then ``stop()``; ``stop`` returns the readings.
    """

    def __init__(self, server_pids: Iterable[int] = ()) -> None:
        self.server_pids = with_descendants(server_pids)  # a supervisor's workers count as the server
        self._t0 = 0.0
        self._own0 = 0.0
        self._srv0: Dict[int, Optional[float]] = {}
        self._machine0: Optional[List[int]] = None
        self._procs0: Dict[int, Tuple[str, float]] = {}

    def start(self) -> "Window":
        """Take the first readings."""
        self._t0 = time.monotonic()
        self._own0 = own_cpu_seconds()
        self._srv0 = {pid: process_cpu_seconds(pid) for pid in self.server_pids}
        self._machine0 = machine_cpu_ticks()
        self._procs0 = all_process_cpu()
        return self

    @property
    def elapsed(self) -> float:
        """Seconds since ``start``."""
        return time.monotonic() - self._t0

    def stop(self) -> Dict[str, Optional[float]]:
        """
        ``elapsed_s`` and CPU in % of one core: ``client_cpu_pct`` (this
        process), ``server_cpu_pct`` (summed over the server pids),
        ``postgres_cpu_pct`` and ``redis_cpu_pct`` (every process of that
        name), ``machine_cpu_pct`` and ``other_cpu_pct``, the rest of the
        machine's busy time.
        """
        procs1 = all_process_cpu()
        elapsed = self.elapsed
        out: Dict[str, Optional[float]] = {"elapsed_s": round(elapsed, 3)}
        out["client_cpu_pct"] = round(100.0 * (own_cpu_seconds() - self._own0) / elapsed, 1) if elapsed else None
        server: Optional[float] = None
        for pid, before in self._srv0.items():
            after = process_cpu_seconds(pid)
            if before is not None and after is not None:
                server = (server or 0.0) + (after - before)
        out["server_cpu_pct"] = round(100.0 * server / elapsed, 1) if server is not None and elapsed else None
        machine1 = machine_cpu_ticks()
        if self._machine0 is not None and machine1 is not None and machine1[1] > self._machine0[1]:
            busy = machine1[0] - self._machine0[0]
            total = machine1[1] - self._machine0[1]
            out["machine_cpu_pct"] = round(100.0 * (os.cpu_count() or 1) * busy / total, 1)
        else:
            out["machine_cpu_pct"] = None
        if procs1 and elapsed:
            groups = {"postgres_cpu_pct": 0.0, "redis_cpu_pct": 0.0}
            mine = {os.getpid()} | set(self.server_pids)
            for pid, (comm, cpu) in procs1.items():
                key = _SERVICE_NAMES.get(comm)
                if key is None or pid in mine:
                    continue
                earlier = self._procs0.get(pid)
                groups[key] += cpu - (earlier[1] if earlier is not None and earlier[0] == comm else 0.0)
            for key, used in groups.items():
                out[key] = round(100.0 * used / elapsed, 1)
        if out.get("machine_cpu_pct") is not None:
            # The residual: other client shards, other users of the machine,
            # processes that came and went, kernel work not charged to a process.
            ours = sum(out.get(k) or 0.0 for k in ("client_cpu_pct", "server_cpu_pct", "postgres_cpu_pct",
                                                    "redis_cpu_pct"))
            out["other_cpu_pct"] = round(max(0.0, (out["machine_cpu_pct"] or 0.0) - ours), 1)
        return out


CPU_KEYS = ("client_cpu_pct", "server_cpu_pct", "postgres_cpu_pct", "redis_cpu_pct", "other_cpu_pct", "machine_cpu_pct")


def merge_cpu(parts: Sequence[Dict[str, Optional[float]]]) -> Dict[str, Optional[float]]:
    """
    CPU readings of several shards' windows: client CPU summed over shards;
    the rest from shard 0 (the one that watched the server), with the other
    shards' client CPU moved out of ``other``.
    """
    out = {k: parts[0].get(k) for k in CPU_KEYS}
    clients = [p.get("client_cpu_pct") for p in parts]
    known = [c for c in clients if c is not None]
    out["client_cpu_pct"] = round(sum(known), 1) if known else None
    other = out.get("other_cpu_pct")
    if other is not None:
        out["other_cpu_pct"] = round(max(0.0, other - sum(c or 0.0 for c in clients[1:])), 1)
    return out
