"""
The worker supervisor's bookkeeping (``--workers N``, docs/operations.md "Workers").

``Supervisor`` holds no process code: it decides *when* a worker starts, is
restarted, is asked to stop and is killed, through a ``spawn`` callable and a
clock, so the restart backoff and the stop sequence are unit tested with a
fake spawner and ``twisted.internet.task.Clock``. ``workers.py`` supplies the
real spawner (``reactor.spawnProcess``); ``SupervisorService`` at the end is
the twistd service around it, with the box's ``/health`` and ``/metrics``.

Restart policy: a worker that dies while the supervisor is not stopping is
started again after a delay that starts at ``BACKOFF_MIN`` and doubles, up to
``BACKOFF_MAX``, each time that worker dies young; once a worker has lived
``HEALTHY_AFTER`` seconds its next death restarts it after ``BACKOFF_MIN``
again. A crash loop (bad configuration, database gone) so costs one spawn per
30 s per worker instead of a busy fork loop, while an isolated crash is
repaired within a second.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Optional, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

log = Logger()

BACKOFF_MIN = 1.0
BACKOFF_MAX = 30.0
#: Seconds alive after which a worker's death no longer counts as dying young.
HEALTHY_AFTER = 60.0


class WorkerHandle(Protocol):
    """A started worker: its pid and a way to signal it."""

    pid: int

    def signal(self, name: str) -> None:
        """Send ``"TERM"`` or ``"KILL"``; a worker already gone is ignored."""


#: ``spawn(index, on_exit)`` starts worker ``index``; ``on_exit(description)``
#: must be called once when that process has ended.
Spawn = Callable[[int, Callable[[str], None]], WorkerHandle]


class _Slot:
    """One worker position: the process in it now, and its restart state."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.handle: Optional[WorkerHandle] = None
        self.started_at = 0.0
        self.backoff = BACKOFF_MIN
        self.pending: Optional[Any] = None  # the IDelayedCall of a scheduled restart


class Supervisor:
    """
    Keeps ``count`` workers alive until ``stop()``; then stops them all.

    ``stop_timeout`` is how long ``stop()`` waits after SIGTERM before SIGKILL
    (the workers' shutdown window plus a margin for the writer's last flush).
    """

    def __init__(self, clock: Any, spawn: Spawn, count: int, stop_timeout: float) -> None:
        self.clock = clock
        self._spawn = spawn
        self.stop_timeout = stop_timeout
        self.slots: List[_Slot] = [_Slot(i) for i in range(count)]
        self.restarts = 0
        self.stopping = False
        self._waiters: List["Deferred[None]"] = []
        self._killer: Optional[Any] = None

    @property
    def alive(self) -> int:
        """How many worker processes are running now."""
        return sum(1 for s in self.slots if s.handle is not None)

    def pids(self) -> List[Optional[int]]:
        """The pid of each worker position (None while it is down)."""
        return [s.handle.pid if s.handle is not None else None for s in self.slots]

    def start(self) -> None:
        """Start every worker."""
        for slot in self.slots:
            self._start(slot)

    def _start(self, slot: _Slot) -> None:
        slot.pending = None
        if self.stopping:
            return
        slot.started_at = self.clock.seconds()
        try:
            slot.handle = self._spawn(slot.index, lambda how: self._exited(slot, how))
        except Exception as e:  # fork/exec failure: treat like a worker that died at once
            log.error("worker {index}: could not start: {e}", index=slot.index, e=str(e)[:300])
            slot.handle = None
            self._schedule(slot)
            return
        log.info("worker {index} started (pid {pid})", index=slot.index, pid=slot.handle.pid)

    def _exited(self, slot: _Slot, how: str) -> None:
        pid = slot.handle.pid if slot.handle is not None else None
        slot.handle = None
        if self.stopping:
            log.info("worker {index} (pid {pid}) stopped: {how}", index=slot.index, pid=pid, how=how)
            self._maybe_stopped()
            return
        lived = self.clock.seconds() - slot.started_at
        if lived >= HEALTHY_AFTER:
            slot.backoff = BACKOFF_MIN
        log.warn("worker {index} (pid {pid}) died after {lived:.1f} s: {how}; restarting in {delay:.0f} s",
                 index=slot.index, pid=pid, lived=lived, how=how, delay=slot.backoff)
        self._schedule(slot)

    def _schedule(self, slot: _Slot) -> None:
        delay = slot.backoff
        slot.backoff = min(BACKOFF_MAX, slot.backoff * 2)
        self.restarts += 1
        slot.pending = self.clock.callLater(delay, self._start, slot)

    def stop(self) -> "Deferred[None]":
        """
        SIGTERM every worker (each drains: stops accepting, closes its sockets
        1001, flushes its writer); SIGKILL those still running after
        ``stop_timeout``. Fires once every worker has exited.
        """
        if self.stopping:
            return self._wait()
        self.stopping = True
        for slot in self.slots:
            if slot.pending is not None and slot.pending.active():
                slot.pending.cancel()
            slot.pending = None
            if slot.handle is not None:
                slot.handle.signal("TERM")
        self._killer = self.clock.callLater(self.stop_timeout, self._kill_rest)
        waiter = self._wait()
        self._maybe_stopped()
        return waiter

    def _wait(self) -> "Deferred[None]":
        d: "Deferred[None]" = Deferred()
        if self.stopping and not self.alive and self._killer is None and not self._waiters:
            d.callback(None)  # already stopped
        else:
            self._waiters.append(d)
        return d

    def _kill_rest(self) -> None:
        self._killer = None
        for slot in self.slots:
            if slot.handle is not None:
                log.warn("worker {index} (pid {pid}) still running {t:.0f} s after SIGTERM: SIGKILL",
                         index=slot.index, pid=slot.handle.pid, t=self.stop_timeout)
                slot.handle.signal("KILL")

    def _maybe_stopped(self) -> None:
        if not self.stopping or self.alive:
            return
        if self._killer is not None and self._killer.active():
            self._killer.cancel()
        self._killer = None
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


# ---- the supervisor as a twistd service, and its --metrics-listen port


class SupervisorService(Service):
    """
    The twistd service of a supervisor: starts the workers on the socket it
    was given, serves ``--metrics-listen`` (see ``SupervisorSite``), and on
    stop closes its copy of the socket, then stops the workers.
    """

    def __init__(self, reactor: Any, settings: Any, sock: Any) -> None:
        from pocketbridge.server import workers

        self.reactor = reactor
        self.settings = settings
        self.sock = sock
        self.supervisor = Supervisor(reactor, workers.process_spawner(reactor, settings, sock), settings.workers,
                                     settings.shutdown_window + workers.STOP_MARGIN)
        self.metrics_port: Any = None

    def startService(self) -> None:
        super().startService()
        self.supervisor.start()
        if self.settings.metrics_listen:
            from twisted.internet.endpoints import serverFromString

            from pocketbridge.server.accept import Admission, AdmissionFactory
            from pocketbridge.server.tap import _refuse_with_none

            # The same accept-time bounds as a single node's --metrics-listen port:
            # a small connection budget of its own, per-IP cap, head/body deadlines.
            admission = Admission.from_settings(self.reactor, self.settings,
                                                max(4, self.settings.reserved_connections), reserved=0)
            d = serverFromString(self.reactor, self.settings.metrics_listen).listen(AdmissionFactory(
                supervisor_site(self.reactor, self.settings, self.supervisor), admission,
                _refuse_with_none(self.settings.metrics_listen)))
            d.addCallbacks(self._metrics_listening,
                           lambda f: log.error("--metrics-listen: {e}", e=f.getErrorMessage()))

    def _metrics_listening(self, port: Any) -> None:
        self.metrics_port = port

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        # The workers hold their own copies; the socket closes when the last one stops listening.
        self.sock.close()
        if self.metrics_port is not None:
            self.metrics_port.stopListening()
        return self.supervisor.stop()


def supervisor_site(reactor: Any, settings: Any, supervisor: Supervisor) -> Any:
    """The ``--metrics-listen`` site of a supervisor: ``/health`` and ``/metrics`` of the whole box."""
    from twisted.web.server import Site

    site = Site(_SupervisorResource(reactor, settings, supervisor), reactor=reactor)
    site.timeOut = 10
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # no access log, as on the main site
    return site


class _SupervisorResource(Resource):
    """``/health``: 200 while every worker is alive, else 503. ``/metrics``: see ``scrape``."""

    isLeaf = True

    def __init__(self, reactor: Any, settings: Any, supervisor: Supervisor) -> None:
        super().__init__()
        self.reactor = reactor
        self.settings = settings
        self.supervisor = supervisor

    def render_GET(self, request: Any) -> Any:
        if request.path == b"/health":
            sup = self.supervisor
            ok = sup.alive == len(sup.slots) and not sup.stopping
            request.setResponseCode(200 if ok else 503)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"status": "ok" if ok else "degraded", "workers": len(sup.slots),
                               "alive": sup.alive, "restarts": sup.restarts}).encode()
        if request.path != b"/metrics":
            request.setResponseCode(404)
            return b"not found\n"
        d = Deferred.fromCoroutine(scrape(self.reactor, self.settings, self.supervisor))

        def done(body: bytes) -> None:
            if not request.finished and not request._disconnected:
                request.setHeader(b"content-type", CONTENT_TYPE.encode())
                request.write(body)
                request.finish()

        d.addCallback(done)
        d.addErrback(lambda f: log.failure("scraping the workers' metrics", f))
        return NOT_DONE_YET


#: Seconds a worker's /metrics may take before the supervisor leaves it out of a scrape.
SCRAPE_TIMEOUT = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def fetch_worker_metrics(reactor: Any, path: str) -> bytes:
    """GET /metrics from a worker's private UNIX socket."""
    from twisted.internet.endpoints import UNIXClientEndpoint
    from twisted.web.client import Agent, readBody

    class _Endpoints:
        def endpointForURI(self, uri: Any) -> Any:
            return UNIXClientEndpoint(reactor, path, timeout=SCRAPE_TIMEOUT)

    agent = Agent.usingEndpointFactory(reactor, _Endpoints())
    d = agent.request(b"GET", b"http://worker/metrics")
    d.addTimeout(SCRAPE_TIMEOUT, reactor)
    response = await d
    body = readBody(response)
    body.addTimeout(SCRAPE_TIMEOUT, reactor)
    return bytes(await body)


async def scrape(reactor: Any, settings: Any, supervisor: Supervisor) -> bytes:
    """
    Every live worker's samples with a ``worker="i"`` label added, plus the
    supervisor's gauges. Box-wide totals are PromQL's ``sum without (worker)``;
    a worker that does not answer in time is left out of this scrape (its
    absence shows in ``pocketbridge_workers_alive`` only if it is down).
    """
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    from pocketbridge.server.workers import metrics_socket_path

    families: Dict[str, Any] = {}
    for index, pid in enumerate(supervisor.pids()):
        if pid is None:
            continue
        try:
            text = (await fetch_worker_metrics(reactor, metrics_socket_path(settings, index))).decode("utf-8")
            parsed = list(text_string_to_metric_families(text))
        except Exception as e:
            log.warn("worker {index}: /metrics not read: {e}", index=index, e=str(e)[:200])
            continue
        for fam in parsed:
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                labels = dict(s.labels)
                labels["worker"] = str(index)
                merged.samples.append(Sample(s.name, labels, s.value, s.timestamp, s.exemplar))
    own = [
        GaugeMetricFamily("pocketbridge_workers", "Worker processes configured (--workers)",
                          value=len(supervisor.slots)),
        GaugeMetricFamily("pocketbridge_workers_alive", "Worker processes running now", value=supervisor.alive),
        CounterMetricFamily("pocketbridge_worker_restarts", "Worker restarts after an unexpected exit",
                            value=supervisor.restarts),
    ]

    class _Collected:
        def collect(self) -> List[Any]:
            return list(families.values()) + own

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected())  # type: ignore[arg-type]  # any object with collect() will do
    return bytes(generate_latest(registry))
