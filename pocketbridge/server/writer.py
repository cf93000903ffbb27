"""
The event writer: group commit of events from every session (ARCHITECTURE.md §2–3).

Sessions call ``submit``; the writer gathers what arrives while a commit is in
flight (or within ``delay`` when idle) and commits it as one transaction. Each
submit's Deferred fires with its ``Outcome`` only after the commit; then the
writer publishes one notification per stored event on the bus — and per
duplicate too: a duplicate is an event that was committed but whose ack may
never have gone out (the node died, or its connection dropped mid-COMMIT), so
it may never have been relayed either. Publishing it again is harmless (every
hub drops seqs it has already routed) and guarantees the live relay.

Failures. A failed batch is retried with its first event alone (a probe):
if that commits, the failure was specific to some event and the rest is
retried one event per transaction so one bad event cannot fail its
neighbours. If the probe fails too, storage is down: the writer stops
splitting, fails what it tried, and waits (exponential backoff up to
``retry_max`` seconds) before each further attempt, so an outage costs at
most one commit per interval. While idle and failing it commits a tiny probe
write instead, so ``storage_ok`` recovers by itself. One outage logs a
bounded number of lines: when it starts, a reminder every ``log_interval``
seconds, and when storage is back.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Tuple

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pocketbridge.server import metrics
from pocketbridge.protocol.events import NewEvent
from pocketbridge.server.storage import Outcome, OutcomeKind, Storage, StorageUnavailable, Txn

log = Logger()

#: Outcomes whose stored row is announced on the bus.
PUBLISHED = frozenset({OutcomeKind.STORED, OutcomeKind.DUPLICATE})
#: First wait after two commits in a row failed; doubles up to ``retry_max``.
RETRY_INITIAL = 0.25
#: Free bytes the embedded shape's probe write wants at least (and twice the last failed batch).
PROBE_FREE_MIN = 1024 * 1024


def probe_write(storage: Storage, need_bytes: int = PROBE_FREE_MIN) -> "Deferred[Any]":
    """
    A write transaction that changes nothing visible: proves storage can commit again.

    On SQLite a commit this small can succeed on a full disk (the WAL reuses
    space it already holds) while real events still fail, so the embedded
    shape first requires ``need_bytes`` free on the database's filesystem.
    """
    path = getattr(storage, "path", None)
    if isinstance(path, str):
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
        free = st.f_bavail * st.f_frsize
        if free < need_bytes:
            return fail(StorageUnavailable("probe_write: {} bytes free".format(free)))

    def txn(t: Txn) -> None:
        storage._execute(t, "UPDATE schema_version SET applied_at = applied_at"
                            " WHERE version = (SELECT MAX(version) FROM schema_version)")

    return storage.run("probe_write", txn)


class EventWriter:
    """Batches events into transactions; one batch in flight at a time."""

    def __init__(
        self,
        storage: Storage,
        clock: IReactorTime,
        publish: Callable[[Outcome], None],
        max_user_bytes: int,
        max_batch: int = 1000,
        max_batch_bytes: int = 32 * 1024 * 1024,
        delay: float = 0.0,
        now_ms: Optional[Callable[[], int]] = None,
        retry_max: float = 5.0,
        log_interval: float = 60.0,
        probe: Optional[Callable[[], "Deferred[Any]"]] = None,
    ) -> None:
        self.storage = storage
        self.clock = clock
        self.publish = publish
        self.max_user_bytes = max_user_bytes
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.delay = delay
        self.retry_max = retry_max
        self.log_interval = log_interval
        self._failed_bytes = 0  # payload bytes of the last failed batch (the probe's size hint)
        self._probe = probe if probe is not None else (
            lambda: probe_write(storage, max(PROBE_FREE_MIN, 2 * self._failed_bytes)))
        self._now_ms = now_ms or (lambda: int(clock.seconds() * 1000))
        self._pending: Deque[Tuple[NewEvent, "Deferred[Outcome]"]] = deque()
        self._solo = 0  # events to commit one per transaction after a failed batch
        self._probing = False  # the next solo commit decides: event-specific failure or outage
        self._isolate = 0  # events of the failed batch to isolate once the probe committed
        self._in_flight = False
        self._scheduled: Any = None
        self._idle_waiters: List["Deferred[None]"] = []
        # Failure state: commits failed in a row, since when, and the log throttle.
        self.failures = 0
        self.failing_since: Optional[float] = None
        self._failed_commits = 0
        self._next_reminder = 0.0
        self._backoff = 0.0
        self._probe_call: Any = None

    @property
    def storage_ok(self) -> bool:
        """False from a failed commit until the next commit (or probe write) succeeds."""
        return self.failures == 0

    def submit(self, event: NewEvent) -> "Deferred[Outcome]":
        """Queue ``event``; fires with its Outcome after commit, or fails with StorageUnavailable."""
        d: "Deferred[Outcome]" = Deferred()
        self._pending.append((event, d))
        if not self._in_flight and self._scheduled is None:
            # Wait for the end of this reactor turn so a burst read in one
            # dataReceived call shares one transaction (or for the backoff).
            self._scheduled = self.clock.callLater(self._wait(), self._flush)
        return d

    @property
    def queued(self) -> int:
        """Events waiting for a commit (not counting the batch in flight)."""
        return len(self._pending)

    def _wait(self) -> float:
        return max(self.delay, self._backoff)

    def _take_batch(self) -> List[Tuple[NewEvent, "Deferred[Outcome]"]]:
        batch: List[Tuple[NewEvent, "Deferred[Outcome]"]] = []
        size = 0
        if self._solo:
            self._solo -= 1
            return [self._pending.popleft()]
        while self._pending and len(batch) < self.max_batch:
            ev = self._pending[0][0]
            if batch and size + ev.payload_size > self.max_batch_bytes:
                break
            batch.append(self._pending.popleft())
            size += ev.payload_size
        return batch

    def _flush(self) -> None:
        self._scheduled = None
        if self._in_flight:
            return
        if not self._pending:
            self._notify_idle()
            if self.failures and self._probe_call is None:
                self._probe_call = self.clock.callLater(max(self._backoff, RETRY_INITIAL), self._probe_now)
            return
        if self._probe_call is not None and self._probe_call.active():
            self._probe_call.cancel()
        self._probe_call = None
        batch = self._take_batch()
        self._in_flight = True
        started = time.perf_counter()
        d = self.storage.commit_batch([ev for ev, _ in batch], self._now_ms(), self.max_user_bytes)
        d.addCallbacks(self._committed, self._failed, callbackArgs=(batch, started), errbackArgs=(batch,))
        d.addErrback(self._bug)

    def _next(self) -> None:
        """Start the next commit: at the next turn, or after the backoff while storage is failing."""
        if self._scheduled is not None:
            return
        wait = self._wait() if self._pending else 0.0
        if wait > 0:
            self._scheduled = self.clock.callLater(wait, self._flush)
        else:
            self._flush()

    def _committed(self, outcomes: List[Outcome], batch: List[Tuple[NewEvent, "Deferred[Outcome]"]], started: float) -> None:
        metrics.COMMIT_BATCH_SIZE.observe(len(batch))
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        self._in_flight = False
        if self._probing:
            # The first event of a failed batch committed alone: storage works,
            # so isolate the rest of that batch one event per transaction.
            self._probing = False
            self._solo = self._isolate
        self._recovered()
        for (_, d), outcome in zip(batch, outcomes):
            metrics.EVENTS_WRITTEN.labels(outcome=outcome.kind).inc()
            d.callback(outcome)
        for outcome in outcomes:
            if outcome.kind in PUBLISHED and outcome.stored is not None:
                self.publish(outcome)
        self._next()

    def _failed(self, failure: Failure, batch: List[Tuple[NewEvent, "Deferred[Outcome]"]]) -> None:
        self._in_flight = False
        self._failed_bytes = sum(ev.payload_size for ev, _ in batch)
        self._note_failure(failure, len(batch))
        if len(batch) > 1 and self.failures == 1:
            # A constraint backstop or an outage: commit the first event alone to tell.
            self._pending.extendleft(reversed(batch))
            self._probing = True
            self._isolate = len(batch) - 1
            self._solo = 1
            self._next()
            return
        if self.failures >= 2:
            # Two commits in a row failed: storage is down, stop splitting.
            self._probing = False
            self._solo = 0
        for _, d in batch:
            d.errback(failure)
        self._next()

    def _note_failure(self, failure: Failure, n: int) -> None:
        self.failures += 1
        self._failed_commits += 1
        now = self.clock.seconds()
        if self.failures == 1:
            self.failing_since = now
            log.warn("commit of {n} events failed: {error}", n=n, error=failure.getErrorMessage())
            return
        if self.failures == 2:
            self._backoff = RETRY_INITIAL
            self._next_reminder = now + self.log_interval
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.failing_since or now))
            log.warn("storage unavailable since {since} (commits failing; retrying at most every {cap} s)",
                     since=since, cap=self.retry_max)
            return
        self._backoff = min(self.retry_max, max(RETRY_INITIAL, self._backoff * 2))
        if now >= self._next_reminder:
            self._next_reminder = now + self.log_interval
            log.warn("storage still unavailable after {seconds:.0f} s ({failed} failed commits)",
                     seconds=now - (self.failing_since or now), failed=self._failed_commits)

    def _recovered(self) -> None:
        if self.failures >= 2:
            log.info("storage back after {seconds:.1f} s ({failed} failed commits)",
                     seconds=self.clock.seconds() - (self.failing_since or 0.0), failed=self._failed_commits)
        self.failures = 0
        self._failed_commits = 0
        self.failing_since = None
        self._backoff = 0.0

    def _probe_now(self) -> None:
        """Idle while commits fail: try a tiny write, so health recovers without traffic."""
        self._probe_call = None
        if self._in_flight or self._pending or not self.failures:
            return
        self._in_flight = True
        d = maybeDeferred(self._probe)  # storage closed at shutdown: a failure, not an unhandled error

        def ok(_: Any) -> None:
            self._in_flight = False
            self._recovered()
            self._next()

        def failed(f: Failure) -> None:
            self._in_flight = False
            self._note_failure(f, 0)
            self._next()

        d.addCallbacks(ok, failed)
        d.addErrback(self._bug)

    def _bug(self, failure: Failure) -> None:
        log.failure("event writer bug", failure)
        self._in_flight = False
        self._flush()

    def _notify_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for w in waiters:
            w.callback(None)

    def flush(self) -> "Deferred[None]":
        """Fires once everything submitted so far is committed (for shutdown)."""
        d: "Deferred[None]" = Deferred()
        if not self._in_flight and not self._pending:
            d.callback(None)
            return d
        self._idle_waiters.append(d)
        return d
