"""
WebSocket baselines against the bare echo server (``pocketbridge.bench.echo``):
what Twisted + Autobahn + the SDK's ``RawConnection`` cost on this machine
without any PocketBridge logic.

- ``roundtrips``: closed-loop echo of event-sized JSON frames over as many
  sockets and with the same window as the events scenario;
- ``connects``: new sockets per second, each doing two echo round trips (the
  shape of a v1 handshake without its crypto and storage);
- ``latency``: echo round-trip time at the fixed rate of scenario 3;
- ``memory``: the echo server's RSS growth per idle socket.

The echo server runs as a subprocess started by ``start_echo_server``; each
measurement runs in a child process (``runner``).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import LoopingCall

from pocketbridge.bench import load
from pocketbridge.bench.stats import Window, latency_summary, process_rss_kib, rate
from pocketbridge.client import RawConnection

_USER = "ab" * 32


def start_echo_server(timeout: float = 20.0) -> Tuple["subprocess.Popen[bytes]", int]:
    """Start the echo server subprocess; (process, port). Raises RuntimeError if it does not come up."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pocketbridge.bench.echo", "--port", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    import select

    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if not line.strip().isdigit():
        stop_echo_server(proc)
        raise RuntimeError("the echo server did not start")
    return proc, int(line)


def stop_echo_server(proc: "subprocess.Popen[bytes]") -> None:
    """Close its stdin (it stops itself); terminate it if it lingers."""
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.terminate()  # our own child, by its handle
        proc.wait(5)


def event_frame(make_payload: load.PayloadMaker, seq: int) -> Dict[str, Any]:
    """A message shaped and sized like a v1 ``event`` frame."""
    return {"type": "event", "payload": {
        "event_id": str(uuid.uuid4()), "user_id": _USER, "device_id": str(uuid.uuid4()), "device_seq": seq,
        "stream_id": load.STREAM, "stream_seq": 0, "type": load.TYPE, "encrypted_payload": make_payload(),
    }}


async def _open_many(reactor: Any, url: str, count: int, concurrency: int) -> Tuple[List[RawConnection], List[str]]:
    pending = iter(range(count))
    conns: List[RawConnection] = []
    errors: List[str] = []

    async def worker() -> None:
        for _ in pending:
            try:
                conns.append(await RawConnection.open(reactor, url, timeout=30.0))
            except Exception as e:
                errors.append("{}: {}".format(type(e).__name__, e))

    await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(max(1, min(count, concurrency)))])
    return conns, errors


async def _close(reactor: Any, conns: Sequence[RawConnection]) -> None:
    waits = []
    for c in conns:
        d = c.close()
        d.addTimeout(10, reactor)
        d.addErrback(lambda f: None)
        waits.append(d)
    if waits:
        await gatherResults(waits)


class _Echoer:
    """Counts echoes (and their round-trip time) per connection while recording."""

    def __init__(self, make_payload: load.PayloadMaker, resend: bool) -> None:
        self.make_payload = make_payload
        self.resend = resend
        self.running = True
        self.recording = False
        self.count = 0
        self.rtts: List[float] = []
        self.seq = 0

    def send(self, conn: RawConnection) -> None:
        self.seq += 1
        conn.send_json(event_frame(self.make_payload, self.seq))

    def receiver(self, conn: RawConnection) -> Any:
        def received(message: Any) -> None:
            if self.recording:
                self.count += 1
                stamp = load.sent_at(message["payload"]["encrypted_payload"])
                if stamp is not None:
                    self.rtts.append((time.monotonic_ns() - stamp) / 1e9)
            if self.resend and self.running:
                self.send(conn)

        return received


async def roundtrips(
    reactor: Any, url: str, conns: int, window: int, payload_bytes: int, duration: float, warmup: float,
    server_pids: Sequence[int] = (),
) -> Dict[str, Any]:
    """Echo round trips/s with ``window`` frames in flight on each of ``conns`` sockets."""
    sockets, errors = await _open_many(reactor, url, conns, 50)
    if errors:
        return {"error": errors[0]}
    echo = _Echoer(load.PayloadMaker(payload_bytes), resend=True)
    for c in sockets:
        c.set_receiver(echo.receiver(c))
        for _ in range(window):
            echo.send(c)
    await load.sleep(reactor, warmup)
    echo.recording = True
    win = Window(server_pids).start()
    await load.sleep(reactor, duration)
    echo.recording = False
    stats = win.stop()
    echo.running = False
    await load.sleep(reactor, 0.2)
    await _close(reactor, sockets)
    return {"roundtrips_per_s": rate(echo.count, stats["elapsed_s"] or 0.0), **stats,
            **latency_summary(echo.rtts, "rtt_")}


async def connects(
    reactor: Any, url: str, count: int, concurrency: int, payload_bytes: int, server_pids: Sequence[int] = (),
) -> Dict[str, Any]:
    """New sockets/s, each with two echo round trips before it counts, ``concurrency`` at a time."""
    make_payload = load.PayloadMaker(payload_bytes)
    pending = iter(range(count))
    opened: List[RawConnection] = []
    errors: List[str] = []

    async def worker() -> None:
        for i in pending:
            try:
                conn = await RawConnection.open(reactor, url, timeout=30.0)
                for _ in range(2):
                    conn.send_json(event_frame(make_payload, i))
                    await conn.next_message(timeout=30.0)
                opened.append(conn)
            except Exception as e:
                errors.append("{}: {}".format(type(e).__name__, e))

    win = Window(server_pids).start()
    await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(max(1, min(count, concurrency)))])
    stats = win.stop()
    await _close(reactor, opened)
    return {"connects_per_s": rate(len(opened), stats["elapsed_s"] or 0.0), "errors": len(errors),
            "first_error": errors[0] if errors else None, **stats}


async def latency(
    reactor: Any, url: str, conns: int, rate_per_s: float, payload_bytes: int, duration: float, warmup: float,
) -> Dict[str, Any]:
    """Echo round-trip time at ``rate_per_s`` frames/s in total over ``conns`` sockets."""
    sockets, errors = await _open_many(reactor, url, conns, 50)
    if errors:
        return {"error": errors[0]}
    echo = _Echoer(load.PayloadMaker(payload_bytes), resend=False)
    for c in sockets:
        c.set_receiver(echo.receiver(c))
    t0 = reactor.seconds()
    sent = [0]

    def tick() -> None:
        due = int((reactor.seconds() - t0) * rate_per_s) - sent[0]
        for _ in range(max(0, due)):
            echo.send(sockets[sent[0] % len(sockets)])
            sent[0] += 1

    loop = LoopingCall(tick)
    loop.clock = reactor
    loop.start(0.002)
    await load.sleep(reactor, warmup)
    echo.recording = True
    await load.sleep(reactor, duration)
    echo.recording = False
    loop.stop()
    await load.sleep(reactor, 0.2)
    await _close(reactor, sockets)
    return {"rate_per_s": rate_per_s, **latency_summary(echo.rtts, "rtt_")}


async def memory(reactor: Any, url: str, count: int, concurrency: int, server_pid: int) -> Dict[str, Any]:
    """The echo server's RSS growth per idle open socket (``count`` sockets)."""
    from pocketbridge.bench.scenario_connections import settle_time

    before = process_rss_kib(server_pid)
    sockets, errors = await _open_many(reactor, url, count, concurrency)
    await load.sleep(reactor, settle_time(count))
    after = process_rss_kib(server_pid)
    await _close(reactor, sockets)
    per: Optional[float] = None
    if before is not None and after is not None and sockets:
        per = round((after - before) / len(sockets), 2)
    return {"connections": len(sockets), "errors": len(errors), "rss_before_kib": before, "rss_after_kib": after,
            "per_conn_kib": per}
