"""
The event writer: group commit of events from every session (ARCHITECTURE.md §2–3).

Sessions call ``submit``; the writer gathers what arrives while a commit is in
flight (or within ``delay`` when idle) and commits it as one transaction. Each
submit's Deferred fires with its ``Outcome`` only after the commit; then the
writer publishes one notification per stored event on the bus.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import metrics
from .events import NewEvent
from .storage import Outcome, Storage

log = Logger()


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
    ) -> None:
        self.storage = storage
        self.clock = clock
        self.publish = publish
        self.max_user_bytes = max_user_bytes
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.delay = delay
        self._now_ms = now_ms or (lambda: int(clock.seconds() * 1000))
        self._pending: Deque[Tuple[NewEvent, "Deferred[Outcome]"]] = deque()
        self._solo = 0  # events to commit one per transaction after a failed batch
        self._in_flight = False
        self._scheduled: Any = None
        self._idle_waiters: List["Deferred[None]"] = []

    def submit(self, event: NewEvent) -> "Deferred[Outcome]":
        """Queue ``event``; fires with its Outcome after commit, or fails with StorageUnavailable."""
        d: "Deferred[Outcome]" = Deferred()
        self._pending.append((event, d))
        if not self._in_flight and self._scheduled is None:
            # Wait for the end of this reactor turn so a burst read in one
            # dataReceived call shares one transaction.
            self._scheduled = self.clock.callLater(self.delay, self._flush)
        return d

    @property
    def queued(self) -> int:
        """Events waiting for a commit (not counting the batch in flight)."""
        return len(self._pending)

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
            return
        batch = self._take_batch()
        self._in_flight = True
        started = time.perf_counter()
        d = self.storage.commit_batch([ev for ev, _ in batch], self._now_ms(), self.max_user_bytes)
        d.addCallbacks(self._committed, self._failed, callbackArgs=(batch, started), errbackArgs=(batch,))
        d.addErrback(self._bug)

    def _committed(self, outcomes: List[Outcome], batch: List[Tuple[NewEvent, "Deferred[Outcome]"]], started: float) -> None:
        metrics.COMMIT_BATCH_SIZE.observe(len(batch))
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        self._in_flight = False
        for (_, d), outcome in zip(batch, outcomes):
            metrics.EVENTS_WRITTEN.labels(outcome=outcome.kind).inc()
            d.callback(outcome)
        for outcome in outcomes:
            if outcome.kind == "stored":
                self.publish(outcome)
        self._flush()

    def _failed(self, failure: Failure, batch: List[Tuple[NewEvent, "Deferred[Outcome]"]]) -> None:
        self._in_flight = False
        log.warn("commit of {n} events failed: {error}", n=len(batch), error=failure.getErrorMessage())
        if len(batch) > 1:
            # A constraint backstop or a transient failure: retry one event per
            # transaction so one bad event cannot fail its neighbours.
            self._pending.extendleft(reversed(batch))
            self._solo += len(batch)
            self._flush()
            return
        for _, d in batch:
            d.errback(failure)
        self._flush()

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
