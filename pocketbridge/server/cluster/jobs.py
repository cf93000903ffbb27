"""
Background jobs (ARCHITECTURE.md "Cluster concerns"): TTL deletion of expired
events, retention, pairing-record expiry and the presence sweep.

Every node runs them; each storage batch takes a cluster-wide lock
(a PostgreSQL advisory lock) so one node does each run, deletes at most
``batch`` rows per transaction, and is counted in metrics. One failing job is
logged and does not stop the others or the next run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pocketbridge.server import metrics

if TYPE_CHECKING:
    from pocketbridge.server.context import Node

log = Logger()
MAX_BATCHES_PER_RUN = 100


class Jobs(Service):
    """Runs every job every ``interval`` seconds."""

    def __init__(self, node: Node, interval: float = 60.0, batch: int = 1000) -> None:
        self.node = node
        self.interval = interval
        self.batch = batch
        self.loop = LoopingCall(self.run_once)
        self.loop.clock = node.clock
        self.running_now: Optional["Deferred[None]"] = None

    def startService(self) -> None:
        super().startService()
        self.loop.start(self.interval, now=False).addErrback(lambda f: log.failure("jobs loop", f))

    def stopService(self) -> Any:
        super().stopService()
        if self.loop.running:
            self.loop.stop()
        return self.running_now

    def jobs(self) -> List[Tuple[str, Callable[[], Awaitable[int]]]]:
        """(name, coroutine function returning rows affected) of every job."""
        return [
            ("event_ttl", self.event_ttl),
            ("retention", self.retention),
            ("pairing_expiry", self.pairing_expiry),
            ("mailbox_expiry", self.mailbox_expiry),
            ("presence_sweep", self.presence_sweep),
        ]

    def run_once(self) -> "Deferred[None]":
        """One run of every job (skipped if the previous run is still going)."""
        if self.running_now is not None:
            return self.running_now
        d = Deferred.fromCoroutine(self._run_all())

        def done(_: Any) -> None:
            self.running_now = None

        d.addBoth(done)
        self.running_now = d
        return d

    async def _run_all(self) -> None:
        for name, job in self.jobs():
            try:
                n = await job()
            except Exception as e:
                metrics.JOB_RUNS.labels(job=name, result="error").inc()
                log.warn("job {job} failed: {error}", job=name, error=str(e) or type(e).__name__)
                continue
            metrics.JOB_RUNS.labels(job=name, result="ok").inc()
            if n:
                metrics.JOB_ROWS.labels(job=name).inc(n)
                log.info("job {job} removed {n} rows", job=name, n=n)

    async def _batches(self, job: str, batch: Callable[[], "Deferred[Optional[int]]"]) -> int:
        """Call ``batch`` (one locked storage batch) until a short one; None means another node does this run."""
        total = 0
        for _ in range(MAX_BATCHES_PER_RUN):
            n = await batch()
            if n is None:  # another node holds the lock: it does this run
                metrics.JOB_RUNS.labels(job=job, result="skipped").inc()
                break
            total += n
            if n < self.batch:
                break
        return total

    async def event_ttl(self) -> int:
        """Delete events whose ttl passed more than 5 minutes ago."""
        storage, now = self.node.storage, self.node.now_ms()
        return await self._batches("event_ttl", lambda: storage.delete_expired_events(now, self.batch))

    async def retention(self) -> int:
        """Delete events older than ``event_retention_days`` and raise purged_below_seq."""
        cutoff = self.node.now_ms() - int(self.node.settings.event_retention_days * 86_400_000)
        storage = self.node.storage
        return await self._batches("retention", lambda: storage.apply_retention(cutoff, self.batch))

    async def pairing_expiry(self) -> int:
        """Delete expired pairing records."""
        storage, now = self.node.storage, self.node.now_ms()
        return await self._batches("pairing_expiry", lambda: storage.delete_expired_pairing(now, self.batch))

    async def mailbox_expiry(self) -> int:
        """Delete expired v2 pairing mailboxes."""
        storage, now = self.node.storage, self.node.now_ms()
        return await self._batches("mailbox_expiry", lambda: storage.delete_expired_mailboxes(now, self.batch))

    async def presence_sweep(self) -> int:
        """Drop presence entries of crashed nodes and announce those devices offline."""
        node = self.node
        now = node.now_ms()
        gone = await node.presence.sweep(now)
        for user_id, device_id in gone:
            device = await node.storage.get_device(user_id, device_id)
            name, dtype = (device.name, device.type) if device is not None else (None, "unknown")
            node.announce_presence(user_id, device_id, name, dtype, False, now)
        return len(gone)
