"""
``twistd pocketbridge``: options and service wiring (STYLE.md §2).

``makeService`` builds a MultiService in dependency order — storage, bus and
hub, writer, web, background loops — from plain constructors. Configuration
errors end the process with one line naming the setting.

The package installs without the server's own dependencies (they are the
``server`` extra; ``pip install pocketbridge`` is the SDK and CLI). This
module imports none of them at import time, and ``Options`` checks for them
first, so ``twistd pocketbridge`` without them prints one line naming the
install command instead of a traceback.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage

from pocketbridge.server import config
from pocketbridge.server.config import ConfigError, Settings
from pocketbridge.server.cluster.drain import start_drain

if TYPE_CHECKING:  # the server's own dependencies are imported in makeService, not here
    from pocketbridge.server.cluster.limits import Limits
    from pocketbridge.server.cluster.presence import Presence
    from pocketbridge.server.context import Node
    from pocketbridge.server.fanout.bus import Bus, BusReceiver
    from pocketbridge.server.fanout.redisconn import RedisConnection
    from pocketbridge.server.storage import Outcome, Storage

log = Logger()

#: The modules of the ``server`` extra (setup.cfg) that the server imports;
#: hiredis is left out: txredisapi only uses it to parse replies faster.
SERVER_MODULES = ("klein", "prometheus_client", "psycopg2", "txredisapi")
SERVER_INSTALL_HINT = "pip install 'pocketbridge[server]'"


def missing_server_modules() -> List[str]:
    """The entries of ``SERVER_MODULES`` that cannot be imported here (found, not imported)."""
    return [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]


def _named(setting: config.Setting) -> Any:
    def coerce(value: str) -> str:
        try:
            setting.coerce(value)
        except (ValueError, TypeError) as e:
            raise ValueError("--{}: {} (got {!r})".format(setting.name.replace("_", "-"), e, value[:80])) from None
        return value

    coerce.coerceDoc = ""  # type: ignore[attr-defined]
    return coerce


class Options(usage.Options):
    """Command line of ``twistd pocketbridge``; each option also has an environment variable."""

    optFlags = [
        ["legacy-clients", None, "Accept X-User-ID REST auth of old web clients (env PB_LEGACY_CLIENTS=1)"],
        ["require-v2", None, "Refuse protocol v1 clients (env PB_REQUIRE_V2=1)"],
        ["migrate-only", None, "Apply database migrations and exit"],
    ]
    optParameters = [
        [s.name.replace("_", "-"), None, None, s.help + (" (env {})".format(s.env) if s.env else ""), _named(s)]
        for s in config.SETTINGS
        if s.coerce is not config.flag and s.cli
    ]

    def parseOptions(self, options: Optional[list] = None) -> None:
        """Parse; a bad value, or a package installed without the server extra,
        ends the process with one line, not a usage dump or a traceback."""
        missing = missing_server_modules()
        if missing:
            raise _fail("the server's dependencies are not installed (no {}); install them with: {}".format(
                ", ".join(missing), SERVER_INSTALL_HINT))
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            msg = str(e).replace("Parameter type enforcement failed: ", "")
            sys.stderr.write("pocketbridge: configuration error: {}\n".format(msg))
            raise SystemExit(2)

    def postOptions(self) -> None:
        cli: Dict[str, Any] = {}
        for s in config.SETTINGS:
            key = s.name.replace("_", "-")
            if not s.cli:
                continue
            if s.coerce is config.flag:
                cli[s.name] = True if self.get(key) else None
            else:
                cli[s.name] = self.get(key)
        try:
            self["settings"] = config.resolve(cli, config.environment())
        except ConfigError as e:
            raise usage.UsageError(str(e))


def _fail(message: str) -> "SystemExit":
    sys.stderr.write("pocketbridge: {}\n".format(message))
    return SystemExit(2)


class _Loops(Service):
    """Periodic node upkeep: cursor writes and rate-limit sweeps."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.sweep = LoopingCall(node.sweep)
        self.sweep.clock = node.clock
        self.refresh = LoopingCall(self._refresh)
        self.refresh.clock = node.clock

    def _refresh(self) -> None:
        from pocketbridge.server.api.admin import node_stats

        node = self.node
        node.presence.refresh().addErrback(lambda f: log.warn("presence refresh failed: {e}", e=f.getErrorMessage()))
        node.presence.publish_node(node.node_id, node_stats(node)).addErrback(
            lambda f: log.warn("node stats publish failed: {e}", e=f.getErrorMessage()))

    def startService(self) -> None:
        super().startService()
        self.node.cursors.start()
        self.sweep.start(60, now=False)
        self.refresh.start(self.node.settings.presence_ttl / 3.0, now=False)

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        for loop in (self.sweep, self.refresh):
            if loop.running:
                loop.stop()
        return self.node.cursors.stop()


class _Storage(Service):
    """Opens the connection pool on start, closes it last."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def startService(self) -> None:
        super().startService()
        self.storage.open()

    def stopService(self) -> None:
        super().stopService()
        self.storage.close()


class _Gateway(Service):
    """On stop: close sockets 1001 and flush the writer before the pool closes."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        node = self.node

        async def drain_then_flush() -> None:
            # Stop accepting, close sockets 1001 spread over the shutdown
            # window, then commit what the writer still holds.
            await start_drain(node, node.settings.shutdown_window)
            await node.writer.flush()

        return Deferred.fromCoroutine(drain_then_flush())


class OrderedServices(MultiService):
    """Starts children in order and stops them one at a time in reverse, each
    after the previous one finished (the writer must flush before the pool closes)."""

    def stopService(self) -> "Deferred[None]":
        Service.stopService(self)
        children = list(self)[::-1]

        async def stop_all() -> None:
            for child in children:
                try:
                    await maybeDeferred(child.stopService)
                except Exception:
                    log.failure("stopping {service}", service=type(child).__name__)

        return Deferred.fromCoroutine(stop_all())


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """
    Wire the server from its options, in dependency order: storage, Redis,
    hub and bus, writer, node context, web, jobs. Each object gets what it
    uses from its constructor; nothing is patched in afterwards. ``reactor``
    is the global one unless given (tests pass a ``MemoryReactorClock``).
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor

    from pocketbridge.server.accept import Admission, AdmissionFactory, connection_budget, raise_fd_limit
    from pocketbridge.server.cluster.jobs import Jobs
    from pocketbridge.server.context import Node
    from pocketbridge.server.fanout.hub import DeliveryHub
    from pocketbridge.server.gateway.adapter import make_factory
    from pocketbridge.server.keys import load_server_key
    from pocketbridge.server.storage import open_storage
    from pocketbridge.server.storage.sync import migrate_now
    from pocketbridge.server.web import Root, build_api, build_site, metrics_site
    from pocketbridge.server.writer import EventWriter
    from pocketbridge.server import workers

    settings: Settings = options["settings"]
    seat = workers.seat_from_environment(config.environment())
    supervising = seat is None and settings.workers > 1 and not options.get("migrate-only")
    if supervising and workers.refusal(settings):
        raise _fail(str(workers.refusal(settings)))
    if seat is not None:
        settings = workers.worker_settings(settings)
    try:
        server_key = load_server_key(settings.data_dir, config.environment())
    except ConfigError as e:
        raise _fail("configuration error: {}".format(e))
    try:
        version = migrate_now(settings) if seat is None else 0  # the supervisor migrated
    except Exception as e:  # one line, never a traceback
        raise _fail("storage error: {}".format(_one_line(e)))
    if options.get("migrate-only"):
        sys.stdout.write("pocketbridge: database at schema version {}\n".format(version))
        raise SystemExit(0)
    if supervising:
        return workers.supervisor_service(reactor, settings)

    # After twistd has started its log observers (it does so after makeService).
    reactor.callWhenRunning(_set_log_level, settings.log_level)
    node_id = settings.node_id or "{}:{}".format(socket.gethostname(), os.getpid())
    storage = open_storage(settings)
    redis = _redis_connection(reactor, settings)
    hub = DeliveryHub(storage, _bus_maker(reactor, redis, settings, node_id), read_page=settings.hub_read_page)

    def publish(outcome: Outcome) -> None:
        """The writer's effect after a commit: every node's hub hears of the stored event."""
        if outcome.stored is not None:
            hub.bus.publish_event(outcome.stored)

    writer = EventWriter(
        storage, reactor, publish, settings.max_user_bytes,
        max_batch=settings.writer_max_batch, delay=settings.writer_delay_ms / 1000.0,
        retry_max=settings.writer_retry_max, log_interval=settings.storage_log_interval,
        pipeline=min(settings.writer_pipeline, settings.db_pool_size - 1) if settings.database else 1,
    )
    presence, limits = _shared_state(reactor, redis, settings, node_id)
    node = Node(settings, storage, writer, hub, reactor, server_key, node_id, presence=presence, limits=limits)
    api = build_api(node)
    site = build_site(Root(node, api.app, make_factory(node), api), reactor)
    old_soft, fd_soft, fd_hard = raise_fd_limit()
    budget = connection_budget(fd_soft, settings.fd_reserve, settings.db_pool_size, settings.max_connections)
    # The private --metrics-listen port has its own small share of the
    # budget, so a full main port cannot starve the metrics scrape.
    private = min(max(4, settings.reserved_connections), budget // 2) if settings.metrics_listen else 0
    admission = Admission.from_settings(reactor, settings, max(1, budget - private))
    log.info("file descriptors: soft limit {old} raised to {soft} (hard limit {hard}); client connections per node "
             "{cap} ({reserved} of them for /health and /metrics only), {private} on --metrics-listen, per IP {per_ip}",
             old=old_soft, soft=fd_soft, hard=fd_hard, cap=admission.node_cap, reserved=admission.reserved,
             private=private, per_ip=admission.per_ip)

    top = OrderedServices()
    _Storage(storage).setServiceParent(top)
    if redis is not None:
        redis.setServiceParent(top)
    _Loops(node).setServiceParent(top)
    _Gateway(node).setServiceParent(top)
    if seat is not None:  # a worker adopts its supervisor's socket
        endpoint: Any = workers.AdoptedEndpoint(reactor, seat, settings.listen)
        workers.worker_services(reactor, seat, settings).setServiceParent(top)
    else:
        endpoint = _endpoint(reactor, settings.listen, settings.listen_backlog, "--listen")
    web = StreamServerEndpointService(endpoint, AdmissionFactory(site, admission, _refuse_with_none(settings.listen)))
    web._raiseSynchronously = True
    web.setServiceParent(top)
    Jobs(node, settings.jobs_interval, settings.job_batch).setServiceParent(top)
    if settings.metrics_listen and seat is None:  # a worker's is for its supervisor only
        StreamServerEndpointService(
            _endpoint(reactor, settings.metrics_listen, settings.listen_backlog, "--metrics-listen"),
            AdmissionFactory(metrics_site(node, api.auth, reactor),
                             Admission.from_settings(reactor, settings, max(1, private), reserved=0),
                             _refuse_with_none(settings.metrics_listen)),
        ).setServiceParent(top)

    log.info("PocketBridge {version} node {node} listening on {listen}; storage {storage}; server key {pub}",
             version=_version(), node=node_id, listen=settings.listen,
             storage=("postgresql" if settings.database else "sqlite") + (" + redis bus" if settings.redis else ""), pub=bytes(server_key.verify_key).hex())
    if not settings.legacy_clients:
        log.info("legacy REST auth (X-User-ID) is off; enable with --legacy-clients for old web clients")
    else:
        log.warn("legacy REST auth (X-User-ID) is ON: any caller who knows a user_id can use the legacy routes")
    if settings.listen.startswith("tcp") and not settings.trusted_proxies:
        log.warn("listening on plain TCP without a trusted proxy: use TLS (ssl:...) in production")
    return top


def _redis_connection(reactor: Any, settings: Settings) -> Optional[RedisConnection]:
    """The node's Redis connection in the cluster shape (``--redis``); None in the embedded shape."""
    if not settings.redis:
        return None
    from pocketbridge.server.fanout.redisconn import RedisConnection

    return RedisConnection(reactor, settings.redis)


def _bus_maker(reactor: Any, redis: Optional[RedisConnection], settings: Settings,
               node_id: str) -> Callable[[BusReceiver], Bus]:
    """How the hub makes its bus: in-process, or over ``redis``."""
    from pocketbridge.server.fanout.localbus import LocalBus

    if redis is None:
        return LocalBus
    from pocketbridge.server.fanout.redisbus import RedisBus

    def redis_bus(receiver: BusReceiver) -> Bus:
        return RedisBus(reactor, redis, receiver, node_id, prefix=settings.redis_prefix,
                        held_users=settings.bus_held_users, resend_rate=settings.bus_resend_rate)

    return redis_bus


def _shared_state(reactor: Any, redis: Optional[RedisConnection], settings: Settings,
                  node_id: str) -> Tuple[Optional[Presence], Optional[Limits]]:
    """Presence and limits every node shares (over ``redis``); None, None for the node's own in-process ones."""
    if redis is None:
        return None, None
    from pocketbridge.server.cluster.limits import RedisLimits
    from pocketbridge.server.cluster.presence import RedisPresence

    presence = RedisPresence(redis, node_id, lambda: int(reactor.seconds() * 1000), settings.redis_prefix,
                             settings.presence_ttl)
    return presence, RedisLimits(redis, settings.redis_prefix, reactor.seconds)


def _endpoint(reactor: Any, listen: str, backlog: int, option: str) -> Any:
    """The server endpoint of a listen string; a bad one ends the process with one line naming ``option``."""
    try:
        return serverFromString(reactor, _with_backlog(listen, backlog))
    except (ValueError, TypeError, KeyError) as e:
        raise _fail("configuration error: {}: {}".format(option, _one_line(e)))


def _with_backlog(listen: str, backlog: int) -> str:
    """``listen`` with ``backlog=`` added for tcp/ssl/unix endpoints that do not set one (Twisted's default is 50)."""
    kind = listen.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl", "unix") and "backlog=" not in listen:
        return "{}:backlog={}".format(listen, backlog)
    return listen


def _refuse_with_none(listen: str) -> bool:
    """Whether the endpoint hands our factory's None to the reactor (plain TCP, UNIX) rather than to a wrapper such as TLS."""
    return listen.split(":", 1)[0].lower() in ("tcp", "tcp6", "unix")


def _version() -> str:
    from pocketbridge import __version__

    return __version__


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _set_log_level(level: str) -> None:
    import txaio

    txaio.set_global_log_level({"warn": "warn", "critical": "critical"}.get(level, level))  # type: ignore[attr-defined]  # exists at runtime
    from twisted.logger import LogLevel

    from pocketbridge.server.log import install_level_filter

    install_level_filter(LogLevel.levelWithName(level))
