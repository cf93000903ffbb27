"""
The node's Redis connection (cluster shape): one object that the bus,
presence and the shared limits receive, instead of borrowing the bus's
publisher.

It keeps the *command* connection up (publishes, presence scripts, shared
limits, reconnecting with backoff) and opens further connections to the same
server on request: the bus's pub/sub connection is one (STYLE.md §11: a
subscribed connection cannot send ordinary commands). Reactor thread only.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple
from urllib.parse import urlparse

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from pocketbridge.server import metrics

log = Logger()



class Commands(Protocol):
    """The Redis commands the node sends (txredisapi's ``RedisProtocol`` offers them; replies are bytes)."""

    def publish(self, channel: str, message: bytes) -> "Deferred[Any]": ...

    def eval(self, source: str, keys: Sequence[str] = ..., args: Sequence[Any] = ...) -> "Deferred[Any]": ...

    def execute_command(self, *args: Any) -> "Deferred[Any]": ...

    def set(self, key: str, value: bytes, expire: Optional[int] = None, pexpire: Optional[int] = None,
            only_if_not_exists: bool = False) -> "Deferred[Any]": ...

    def hset(self, key: str, field: str, value: Any) -> "Deferred[Any]": ...

    def hgetall(self, key: str) -> "Deferred[Any]": ...

    def hdel(self, key: str, fields: Any) -> "Deferred[Any]": ...

    def sadd(self, key: str, members: Any) -> "Deferred[Any]": ...

    def smembers(self, key: str) -> "Deferred[Any]": ...

    def whenConnected(self) -> "Deferred[Any]": ...


#: Called with the command connection each time it becomes usable.
ReadyHook = Callable[[Commands], None]


def parse_redis_url(url: str) -> Tuple[str, int, Optional[int], Optional[str]]:
    """(host, port, db, password) of a ``redis://`` URL."""
    u = urlparse(url)
    db = None
    if u.path and u.path.strip("/"):
        db = int(u.path.strip("/"))
    return u.hostname or "127.0.0.1", u.port or 6379, db, u.password


class _CommandProtocol(txredisapi.RedisProtocol):
    """The command connection's protocol: tells its ``RedisConnection`` when it comes and goes."""

    owner: "RedisConnection"

    def connectionMade(self) -> Any:
        self.transport.setTcpNoDelay(True)
        d = super().connectionMade()
        self.owner._made(self)
        return d

    def connectionLost(self, why: Any) -> None:
        self.owner._lost(self)
        super().connectionLost(why)


class _CommandFactory(Factory):
    def __init__(self, owner: "RedisConnection") -> None:
        self.owner = owner

    def buildProtocol(self, addr: Any) -> _CommandProtocol:
        p = _CommandProtocol(**self.owner.protocol_options())
        p.factory = self
        p.owner = self.owner
        return p


class RedisConnection(MultiService):
    """
    A service keeping the node's connections to one Redis server.

    ``command()`` is the command connection while it is up (after AUTH and
    SELECT), and raises ``ConnectionError`` while it is down: callers fall
    back or fail, they never wait. Hooks given to ``on_ready`` run each time
    it becomes usable, the first time included.
    """

    def __init__(self, reactor: Any, url: str) -> None:
        super().__init__()
        host, port, self.db, self.password = parse_redis_url(url)
        self.reactor: IReactorTime = reactor
        self.endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=5)
        self.current: Optional[Commands] = None
        self.ever_connected = False
        self._ready_hooks: List[ReadyHook] = []
        self.connect(_CommandFactory(self))

    def protocol_options(self) -> Dict[str, Any]:
        """The txredisapi protocol arguments of every connection: bytes replies, AUTH and SELECT from the URL."""
        return {"charset": None, "password": self.password, "dbid": self.db, "convertNumbers": False}

    def connect(self, factory: Factory) -> ClientService:
        """Keep one more connection to the server up (0.2 s to 5 s backoff), started and stopped with this service."""
        service = ClientService(self.endpoint, factory, retryPolicy=backoffPolicy(initialDelay=0.2, maxDelay=5.0),
                                clock=self.reactor)
        service.setServiceParent(self)
        return service

    def on_ready(self, hook: ReadyHook) -> None:
        """Call ``hook(commands)`` each time the command connection becomes usable (at once if it is)."""
        self._ready_hooks.append(hook)
        if self.current is not None:
            hook(self.current)

    def command(self) -> Commands:
        """The command connection; ``ConnectionError`` while it is down."""
        if self.current is None:
            raise ConnectionError("redis unavailable")
        return self.current

    def healthy(self) -> bool:
        """True while the command connection is usable."""
        return self.current is not None

    def _made(self, proto: Commands) -> None:
        def ready(_: Any) -> None:
            self.current = proto
            if self.ever_connected:
                metrics.BUS_RECONNECTS.labels(connection="publisher").inc()
            self.ever_connected = True
            for hook in list(self._ready_hooks):
                hook(proto)

        proto.whenConnected().addCallback(ready).addErrback(
            lambda f: log.warn("bus connect failed: {error}", error=f.getErrorMessage()))

    def _lost(self, proto: Commands) -> None:
        if self.current is proto:
            self.current = None
            log.warn("bus publisher connection lost")
