"""
``twistd pocketbridge --workers N``: one listening socket, N worker processes
(issue 11 item 2; docs/operations.md "Workers").

A Twisted process uses one core. With N > 1 the twistd process becomes a
*supervisor*: after the usual checks, the migrations and the server key (done
once, in ``tap.makeService``), it binds the listening socket once and starts N
``twistd -n pocketbridge`` workers that inherit it (``PB_WORKER_FD``) and
adopt it with ``reactor.adoptStreamPort``; the kernel hands each accepted
connection to one of them. The supervisor never accepts. Each worker is a
full node on the shared PostgreSQL and Redis, so everything cross-node
(fan-out, budgets, presence) already works between workers of one box.

The workers get their configuration through the environment (every setting's
variable, from the supervisor's resolved settings), not their command line:
a DATABASE_URL password stays out of ``ps``. The embedded shape (SQLite file,
in-process bus) belongs to one process and is refused, as is any listen
endpoint other than plain ``tcp:``/``tcp6:`` (TLS is terminated in front).
"""

from __future__ import annotations

import math
import os
import socket
import sys
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

from twisted.application.service import MultiService, Service
from twisted.web.resource import Resource
from twisted.internet import protocol
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pocketbridge.server import config
from pocketbridge.server.config import Settings

log = Logger()

ENV_FD = "PB_WORKER_FD"
ENV_INDEX = "PB_WORKER_INDEX"
ENV_PARENT = "PB_WORKER_PARENT"

EMBEDDED_REFUSAL = ("--workers needs PostgreSQL and Redis (DATABASE_URL, REDIS_URL): the SQLite file and the "
                    "in-process bus belong to one process; use --workers 1")
#: Longest worker output line relayed into the supervisor's log (the rest is cut).
MAX_LINE = 4096
#: Seconds after the workers' shutdown window before a worker still running is killed
#: (a drain waits up to 10 s for slow close handshakes, then the writer flushes).
STOP_MARGIN = 15.0
#: Seconds between a worker's checks that its supervisor is still its parent.
PARENT_CHECK = 1.0

_TWISTD_MAIN = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


class Seat(NamedTuple):
    """What a worker process was handed by its supervisor."""

    fd: int
    position: int  # the worker index (``index`` is a tuple method)
    parent: int


def seat_from_environment(environ: Mapping[str, str]) -> Optional[Seat]:
    """The worker's seat when this process was started by a supervisor, else None."""
    if ENV_FD not in environ:
        return None
    return Seat(int(environ[ENV_FD]), int(environ.get(ENV_INDEX, "0")), int(environ.get(ENV_PARENT, "0")))


def refusal(settings: Settings) -> Optional[str]:
    """The one line that refuses ``--workers N>1`` with these settings, or None when they can run."""
    if not (settings.database and settings.redis):
        return EMBEDDED_REFUSAL
    kind = settings.listen.split(":", 1)[0].lower()
    if kind not in ("tcp", "tcp6"):
        return ("--workers needs a plain tcp: or tcp6: --listen endpoint (got {}:): terminate TLS in front of "
                "the workers, see docs/operations.md".format(kind[:20]))
    return None


def worker_settings(settings: Settings) -> Settings:
    """
    A worker's share of the box-wide limits: the open connections per client
    IP are divided between the workers (rounded up), since the kernel may hand
    one address's connections to any of them; the box-wide bound stays the
    configured value (within N - 1). Budgets kept in Redis are shared already.
    """
    per_ip = int(math.ceil(settings.conn_open_per_ip / float(max(1, settings.workers))))
    return settings.replace(conn_open_per_ip=max(1, per_ip))


# ---- the listening socket


def _split_endpoint(listen: str) -> List[str]:
    """Twisted endpoint-string fields: split on ``:`` not escaped by a backslash."""
    fields, current, escaped = [], "", False
    for ch in listen:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            fields.append(current)
            current = ""
        else:
            current += ch
    fields.append(current)
    return fields


def parse_tcp_listen(listen: str, default_backlog: int) -> Tuple[int, str, int, int]:
    """(family, interface, port, backlog) of a ``tcp:``/``tcp6:`` endpoint string; ValueError when bad."""
    fields = _split_endpoint(listen)
    kind = fields[0].lower()
    family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
    positional: List[str] = []
    named: Dict[str, str] = {}
    for f in fields[1:]:
        if "=" in f:
            k, v = f.split("=", 1)
            named[k] = v
        else:
            positional.append(f)
    port = named.pop("port", positional[0] if positional else "")
    interface = named.pop("interface", "::" if family == socket.AF_INET6 else "")
    backlog = named.pop("backlog", str(default_backlog))
    if named or len(positional) > 1:
        raise ValueError("unsupported field in {!r}".format(listen[:80]))
    if not port.isdigit() or not backlog.isdigit():
        raise ValueError("port and backlog must be numbers in {!r}".format(listen[:80]))
    return family, interface, int(port), int(backlog)


def open_listening_socket(listen: str, default_backlog: int) -> socket.socket:
    """Bound, listening, non-blocking: the socket every worker adopts (same options as Twisted's own ports)."""
    family, interface, port, backlog = parse_tcp_listen(listen, default_backlog)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((interface, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    In a worker, the endpoint of the main port: ``listen`` adopts the socket
    inherited from the supervisor (``adoptStreamPort`` duplicates it, so the
    inherited descriptor is closed) instead of binding one.
    """

    def __init__(self, reactor: Any, seat: Seat, listen: str) -> None:
        self.reactor = reactor
        self.seat = seat
        self.family = socket.AF_INET6 if listen.lower().startswith("tcp6") else socket.AF_INET

    def listen(self, factory: Any) -> "Deferred[Any]":
        try:
            port = self.reactor.adoptStreamPort(self.seat.fd, self.family, factory)
        except Exception:
            return fail()
        os.close(self.seat.fd)
        log.info("worker {index} (pid {pid}) serving the supervisor's socket", index=self.seat.position, pid=os.getpid())
        return succeed(port)


class ParentWatch(Service):
    """
    Stops a worker gracefully once its supervisor is gone (its parent pid
    changed), so a supervisor killed with SIGKILL leaves no orphan serving.
    """

    def __init__(self, reactor: Any, seat: Seat) -> None:
        self.reactor = reactor
        self.seat = seat
        self.loop = LoopingCall(self._check)
        self.loop.clock = reactor

    def startService(self) -> None:
        super().startService()
        if self.seat.parent:
            self.loop.start(PARENT_CHECK, now=False)

    def _check(self) -> None:
        if os.getppid() != self.seat.parent:
            log.warn("worker {index}: supervisor (pid {pid}) is gone; stopping", index=self.seat.position,
                     pid=self.seat.parent)
            self.loop.stop()
            if self.reactor.running:
                self.reactor.stop()

    def stopService(self) -> None:
        super().stopService()
        if self.loop.running:
            self.loop.stop()


class _WorkerMetrics(Resource):
    """``/metrics`` of this worker's registry, for the supervisor only (a 0600 socket in a 0700 directory)."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if request.path != b"/metrics":
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return bytes(generate_latest())


def worker_services(reactor: Any, seat: Seat, settings: Settings) -> MultiService:
    """A worker's ties to its supervisor: the parent watch and, with --metrics-listen, the private metrics socket."""
    from twisted.application.internet import StreamServerEndpointService
    from twisted.internet.endpoints import UNIXServerEndpoint
    from twisted.web.server import Site

    top = MultiService()
    ParentWatch(reactor, seat).setServiceParent(top)
    if settings.metrics_listen:
        site = Site(_WorkerMetrics(), reactor=reactor)
        site.timeOut = 10
        site.log = lambda request: None  # type: ignore[method-assign]  # no access log
        endpoint = UNIXServerEndpoint(reactor, metrics_socket_path(settings, seat.position), mode=0o600)
        StreamServerEndpointService(endpoint, site).setServiceParent(top)
    return top


# ---- starting workers


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def metrics_socket_path(settings: Settings, index: int) -> str:
    """Where worker ``index`` serves its /metrics for the supervisor (a 0700 directory in the data dir)."""
    return os.path.join(os.path.abspath(settings.data_dir), "workers", "metrics-{}.sock".format(index))


def worker_environment(settings: Settings, index: int, fd: int, base: Mapping[str, str]) -> Dict[str, str]:
    """The environment of worker ``index``: the supervisor's, every setting's variable, and the seat."""
    env = dict(base)
    for s in config.SETTINGS:
        if s.env:
            env[s.env] = _env_value(settings.values[s.name])
    env.pop("PORT", None)  # --listen is on the command line
    if settings.node_id:
        env["PB_NODE_ID"] = "{}-w{}".format(settings.node_id, index)
    if settings.metrics_listen:
        path = metrics_socket_path(settings, index).replace("\\", "\\\\").replace(":", "\\:")
        env["PB_METRICS_LISTEN"] = "unix:{}:mode=600".format(path)  # informative: see worker_services
    env[ENV_FD] = str(fd)
    env[ENV_INDEX] = str(index)
    env[ENV_PARENT] = str(os.getpid())
    return env


def worker_argv(settings: Settings) -> List[str]:
    """``twistd -n pocketbridge`` for a worker; the rest of the configuration is in its environment."""
    return [sys.executable, "-c", _TWISTD_MAIN, "-n", "--pidfile=", "pocketbridge", "--listen", settings.listen]


def describe_exit(reason: Failure) -> str:
    """``exit code 3`` / ``killed by signal 9`` for a ProcessDone/ProcessTerminated."""
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig is not None:
        return "killed by signal {}".format(sig)
    return "exit code {}".format(getattr(value, "exitCode", "?"))


class LineRelay:
    """Splits a byte stream into lines of at most ``MAX_LINE`` characters for ``emit``."""

    def __init__(self, emit: Callable[[str], None], limit: int = MAX_LINE) -> None:
        self.emit = emit
        self.limit = limit
        self.buffer = b""
        self.skipping = False  # inside a line already cut at the limit

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while True:
            cut = self.buffer.find(b"\n")
            if cut < 0:
                if len(self.buffer) > self.limit:
                    if not self.skipping:
                        self._emit(self.buffer[: self.limit] + b" [cut]")
                    self.skipping = True
                    self.buffer = b""
                return
            line, self.buffer = self.buffer[:cut], self.buffer[cut + 1:]
            if not self.skipping:
                self._emit(line[: self.limit] + (b" [cut]" if len(line) > self.limit else b""))
            self.skipping = False

    def flush(self) -> None:
        if self.buffer and not self.skipping:
            self._emit(self.buffer[: self.limit])
        self.buffer = b""

    def _emit(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if text:
            self.emit(text)


class WorkerProcess(protocol.ProcessProtocol):
    """One worker child: relays its output into the supervisor's log and reports its end."""

    def __init__(self, index: int, on_exit: Callable[[str], None]) -> None:
        self.index = index
        self.on_exit = on_exit
        self.pid = 0
        self.relays = {fd: LineRelay(self._relay) for fd in (1, 2)}

    def _relay(self, line: str) -> None:
        log.info("[worker {index}] {line}", index=self.index, line=line)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        relay = self.relays.get(childFD)
        if relay is not None:
            relay.feed(data)

    def signal(self, name: str) -> None:
        if self.transport is None:
            return
        try:
            self.transport.signalProcess(name)
        except Exception:  # already gone: ProcessExitedAlready
            pass

    def processEnded(self, reason: Failure) -> None:
        for relay in self.relays.values():
            relay.flush()
        self.on_exit(describe_exit(reason))


def process_spawner(reactor: Any, settings: Settings, sock: socket.socket) -> Callable[..., WorkerProcess]:
    """The ``Supervisor``'s spawn function: a real ``twistd`` child holding ``sock`` at the same fd number."""
    fd = sock.fileno()
    devnull = os.open(os.devnull, os.O_RDONLY)
    argv = worker_argv(settings)
    if settings.metrics_listen:
        os.makedirs(os.path.dirname(metrics_socket_path(settings, 0)), mode=0o700, exist_ok=True)
        os.chmod(os.path.dirname(metrics_socket_path(settings, 0)), 0o700)

    def spawn(index: int, on_exit: Callable[[str], None]) -> WorkerProcess:
        if settings.metrics_listen:
            try:
                os.unlink(metrics_socket_path(settings, index))  # the previous worker's, if it died
            except FileNotFoundError:
                pass
        proc = WorkerProcess(index, on_exit)
        transport = reactor.spawnProcess(
            proc, argv[0], argv, env=worker_environment(settings, index, fd, config.environment()),
            childFDs={0: devnull, 1: "r", 2: "r", fd: fd})
        proc.pid = transport.pid
        return proc

    return spawn


def supervisor_service(reactor: Any, settings: Settings) -> Any:
    """The twistd service of a supervisor, its socket bound now so that a taken port fails with one line."""
    from pocketbridge.server.supervisor import SupervisorService

    try:
        sock = open_listening_socket(settings.listen, settings.listen_backlog)
    except (OSError, ValueError) as e:
        sys.stderr.write("pocketbridge: configuration error: --listen: {}\n".format(str(e)[:300]))
        raise SystemExit(2)
    log.info("PocketBridge supervisor (pid {pid}): {n} workers on {listen}", pid=os.getpid(), n=settings.workers,
             listen=settings.listen)
    return SupervisorService(reactor, settings, sock)
