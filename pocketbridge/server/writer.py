"""
The event writer: group commit of events from every session (ARCHITECTURE.md §2–3).

Sessions call ``submit``; the writer gathers what arrives while a commit is in
flight (or within ``delay`` when idle) and commits it as one transaction. Up to
``pipeline`` transactions may be in flight at once, but never two holding the
same user: an event whose user has a batch in flight waits for that batch, so
a user's seqs follow arrival order and its counter row has one writer per
node. Batches of different users may commit in any order. Each
submit's Deferred fires with its ``Outcome`` only after its batch's commit; then the
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
most one commit per interval. While a failure is being handled (failures, a
probe, isolation) the pipeline is one deep, and a batch that was already in
flight when another failed is retried with it rather than counted on its own. While idle and failing it commits a tiny probe
write instead, so ``storage_ok`` recovers by itself. One outage logs a
bounded number of lines: when it starts, a reminder every ``log_interval``
seconds, and when storage is back.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Set, Tuple

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


Item = Tuple[NewEvent, "Deferred[Outcome]"]


class _Batch:
    """One transaction in flight: its events, their users, and the failure epoch it started in."""

    __slots__ = ("items", "users", "epoch", "probe", "started")

    def __init__(self, items: List[Item], epoch: int, probe: bool) -> None:
        self.items = items
        self.users: Set[str] = {ev.user_id for ev, _ in items}
        self.epoch = epoch  # a failure since then makes its own outcome stale for the failure state
        self.probe = probe  # the first event of a failed batch, alone: decides outage or bad event
        self.started = time.perf_counter()


class EventWriter:
    """Batches events into transactions; up to ``pipeline`` batches of disjoint users in flight."""

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
        pipeline: int = 1,
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
        self.pipeline = max(1, pipeline)
        self._failed_bytes = 0  # payload bytes of the last failed batch (the probe's size hint)
        self._probe = probe if probe is not None else (
            lambda: probe_write(storage, max(PROBE_FREE_MIN, 2 * self._failed_bytes)))
        self._now_ms = now_ms or (lambda: int(clock.seconds() * 1000))
        self._pending: Deque[Item] = deque()
        self._solo = 0  # events to commit one per transaction after a failed batch
        self._probing = False  # the next solo commit decides: event-specific failure or outage
        self._isolate = 0  # events of the failed batch to isolate once the probe committed
        self._batches: List[_Batch] = []  # in flight, oldest first
        self._busy: Set[str] = set()  # users with a batch in flight
        self._epoch = 0  # counts failed commits; a batch remembers the count it started at
        self._probe_busy = False  # the idle probe write is in flight
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
        if self._scheduled is None and self._room() and event.user_id not in self._busy:
            # Wait for the end of this reactor turn so a burst read in one
            # dataReceived call shares one transaction (or for the backoff).
            self._scheduled = self.clock.callLater(self._wait(), self._flush)
        return d

    @property
    def queued(self) -> int:
        """Events waiting for a commit (not counting the batches in flight)."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Batches committing now."""
        return len(self._batches)

    def _room(self) -> bool:
        """May another batch start? One at a time while a failure is being handled."""
        if self._probe_busy:
            return False
        depth = 1 if (self.failures or self._solo or self._probing) else self.pipeline
        return len(self._batches) < depth

    def _wait(self) -> float:
        return max(self.delay, self._backoff)

    def _take_batch(self) -> List[Item]:
        """
        The oldest pending events whose users have nothing in flight, up to the
        batch limits. A user's events are taken in arrival order or not at all:
        the scan stops at the first event that does not fit, and every event of
        a busy user stays behind (and a user joins the busy set with its batch).
        """
        if self._solo:
            self._solo -= 1
            return [self._pending.popleft()]
        batch: List[Item] = []
        size = 0
        busy = self._busy
        rest: Deque[Item] = deque()
        pending = self._pending
        while pending:
            ev = pending[0][0]
            if ev.user_id in busy:
                rest.append(pending.popleft())
                continue
            if len(batch) >= self.max_batch or (batch and size + ev.payload_size > self.max_batch_bytes):
                break
            batch.append(pending.popleft())
            size += ev.payload_size
        if rest:
            rest.extend(pending)
            self._pending = rest
        return batch

    def _flush(self) -> None:
        self._scheduled = None
        if not self._pending:
            if not self._batches and not self._probe_busy:
                self._notify_idle()
                if self.failures and self._probe_call is None:
                    self._probe_call = self.clock.callLater(max(self._backoff, RETRY_INITIAL), self._probe_now)
            return
        while self._pending and self._room():
            probe = self._probing and self._solo > 0
            batch = self._take_batch()
            if not batch:
                return  # every pending event's user is in flight: its commit calls _next
            if self._probe_call is not None and self._probe_call.active():
                self._probe_call.cancel()
            self._probe_call = None
            self._start(_Batch(batch, self._epoch, probe))

    def _start(self, b: _Batch) -> None:
        self._batches.append(b)
        self._busy |= b.users
        d = self.storage.commit_batch([ev for ev, _ in b.items], self._now_ms(), self.max_user_bytes)
        d.addCallbacks(self._committed, self._failed, callbackArgs=(b,), errbackArgs=(b,))
        d.addErrback(self._bug, b)

    def _finish(self, b: _Batch) -> None:
        """``b`` is no longer in flight: its users may start their next batch."""
        if b in self._batches:
            self._batches.remove(b)
            self._busy -= b.users

    def _next(self) -> None:
        """Start the next commit: at the next turn, or after the backoff while storage is failing."""
        if self._scheduled is not None:
            return
        wait = self._wait() if self._pending else 0.0
        if wait > 0:
            self._scheduled = self.clock.callLater(wait, self._flush)
        else:
            self._flush()

    def _committed(self, outcomes: List[Outcome], b: _Batch) -> None:
        metrics.COMMIT_BATCH_SIZE.observe(len(b.items))
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - b.started)
        self._finish(b)
        if b.epoch == self._epoch:
            # Started after the last failure, so it speaks for storage now.
            if b.probe:
                # The first event of a failed batch committed alone: storage works,
                # so isolate the rest of that batch one event per transaction.
                self._probing = False
                self._solo = self._isolate
            self._recovered()
        for (_, d), outcome in zip(b.items, outcomes):
            metrics.EVENTS_WRITTEN.labels(outcome=outcome.kind).inc()
            d.callback(outcome)
        for outcome in outcomes:
            if outcome.kind in PUBLISHED and outcome.stored is not None:
                self.publish(outcome)
        self._next()

    def _failed(self, failure: Failure, b: _Batch) -> None:
        self._finish(b)
        batch = b.items
        if b.epoch != self._epoch:
            # In flight when another batch failed: that failure's handling
            # (probe, isolation or outage) decides, and these events go with it,
            # ahead of their users' later events. Nothing acked, nothing reordered.
            self._pending.extendleft(reversed(batch))
            if self._probing:
                self._isolate += len(batch)
            self._next()
            return
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
        self._epoch += 1
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
        if self._batches or self._probe_busy or self._pending or not self.failures:
            return
        self._probe_busy = True
        d = maybeDeferred(self._probe)  # storage closed at shutdown: a failure, not an unhandled error

        def ok(_: Any) -> None:
            self._probe_busy = False
            self._recovered()
            self._next()

        def failed(f: Failure) -> None:
            self._probe_busy = False
            self._note_failure(f, 0)
            self._next()

        d.addCallbacks(ok, failed)
        d.addErrback(self._bug)

    def _bug(self, failure: Failure, b: Optional[_Batch] = None) -> None:
        log.failure("event writer bug", failure)
        if b is None:
            self._probe_busy = False
        else:
            self._finish(b)
        self._flush()

    def _notify_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for w in waiters:
            w.callback(None)

    def flush(self) -> "Deferred[None]":
        """Fires once everything submitted so far is committed (for shutdown)."""
        d: "Deferred[None]" = Deferred()
        if not self._batches and not self._probe_busy and not self._pending:
            d.callback(None)
            return d
        self._idle_waiters.append(d)
        return d
