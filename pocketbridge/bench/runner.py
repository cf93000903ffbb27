"""
Run each measurement in its own child process.

A Twisted reactor runs once per process, and the load generator must not
share a Python interpreter (one core) with the code that orchestrates and
reports. So every scenario and every baseline is an ``async def
measure(reactor, **kwargs) -> dict`` run by ``run_child`` in a forked process
with a fresh reactor; its result comes back through a pipe. The parent never
imports the reactor.

``run_sharded`` runs the same measurement in several processes at once (the
load split between them); ``start_together`` lets the shards finish their
setup (connections, handshakes) before any of them starts its clock.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import sys
import time
import traceback
from typing import Any, Callable, Coroutine, Dict, List, Optional

Measure = Callable[..., Coroutine[Any, Any, Dict[str, Any]]]

#: Seconds a shard waits for the others at ``start_together`` before giving up.
BARRIER_TIMEOUT = 300.0

_ctx = multiprocessing.get_context("fork")  # children inherit imports; no reactor is installed here


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _child(conn: Any, measure: Measure, kwargs: Dict[str, Any]) -> None:
    """Body of a child process: run ``measure`` on a fresh reactor and send back its result."""
    raise_fd_limit()
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner
    from twisted.logger import textFileLogObserver

    # Errors only: a benchmark run opens thousands of sockets, and the SDK's
    # per-connection info lines would be noise on the terminal.
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.error)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])], redirectStandardIO=False
    )
    outcome: Dict[str, Any] = {}

    def start() -> None:
        d: "Deferred[Dict[str, Any]]" = Deferred.fromCoroutine(measure(reactor, **kwargs))

        def ok(result: Dict[str, Any]) -> None:
            outcome["result"] = result

        def failed(failure: Any) -> None:
            outcome["error"] = "{}: {}".format(failure.type.__name__, failure.getErrorMessage())
            outcome["traceback"] = failure.getTraceback()

        d.addCallbacks(ok, failed)
        d.addBoth(lambda _: reactor.callLater(0, reactor.stop))  # type: ignore[attr-defined]

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    try:
        reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    except BaseException:
        outcome.setdefault("error", traceback.format_exc(limit=5))
    try:
        conn.send(outcome)
    finally:
        conn.close()
        # Skip atexit handlers and stdio flushing of inherited state; the parent owns them.
        sys.stderr.flush()
        os._exit(0)


def _collect(proc: Any, conn: Any, deadline: float) -> Dict[str, Any]:
    remaining = max(0.0, deadline - time.monotonic())
    try:
        if conn.poll(remaining):
            outcome = conn.recv()
        else:
            outcome = {"error": "timed out"}
    except (EOFError, OSError) as e:
        outcome = {"error": "child process died ({})".format(type(e).__name__)}
    proc.join(5)
    if proc.is_alive():
        proc.terminate()  # our own child, by its handle
        proc.join(5)
    if "result" not in outcome and proc.exitcode not in (0, None):
        outcome.setdefault("error", "child exited with {}".format(proc.exitcode))
    return dict(outcome)


def run_child(measure: Measure, timeout: float, **kwargs: Any) -> Dict[str, Any]:
    """
    Run ``await measure(reactor, **kwargs)`` in a child process.

    Returns its result dict, or ``{"error": ...}`` when it raised, died or
    ran longer than ``timeout`` seconds (the child is then terminated).
    """
    return run_sharded(measure, 1, timeout, **kwargs)[0]


def run_sharded(measure: Measure, shards: int, timeout: float, **kwargs: Any) -> List[Dict[str, Any]]:
    """
    Run ``measure`` in ``shards`` child processes at once, each called with
    ``shard=i, shards=n, barrier=<Barrier>`` besides ``kwargs``; a list of
    their outcomes (each a result dict or ``{"error": ...}``), in shard order.
    """
    barrier = _ctx.Barrier(shards) if shards > 1 else None
    started = []
    for i in range(shards):
        parent_end, child_end = _ctx.Pipe(duplex=False)
        extra: Dict[str, Any] = dict(kwargs)
        if shards > 1:
            extra.update(shard=i, shards=shards, barrier=barrier)
        proc = _ctx.Process(target=_child, args=(child_end, measure, extra), daemon=True)
        proc.start()
        child_end.close()
        started.append((proc, parent_end))
    deadline = time.monotonic() + timeout
    outcomes: List[Dict[str, Any]] = []
    for proc, conn in started:
        outcome = _collect(proc, conn, deadline)
        outcomes.append(outcome["result"] if "result" in outcome else outcome)
        if "error" in outcome and barrier is not None:
            barrier.abort()  # release shards still waiting for this one
    return outcomes


async def start_together(reactor: Any, barrier: Optional[Any]) -> None:
    """Wait (in a thread, so the reactor keeps serving sockets) until every shard is ready."""
    if barrier is None:
        return
    from twisted.internet.threads import deferToThreadPool

    await deferToThreadPool(reactor, reactor.getThreadPool(), barrier.wait, BARRIER_TIMEOUT)


def error_of(outcome: Optional[Dict[str, Any]]) -> Optional[str]:
    """The error message of a child's outcome, or None when it succeeded."""
    if outcome is None:
        return "not run"
    err = outcome.get("error")
    return str(err) if err else None
