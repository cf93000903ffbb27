"""
Draining a node (ARCHITECTURE.md, "Graceful stop and drain").

A draining node refuses new WebSocket upgrades (HTTP 503, see ``web.py`` and
``gateway.py``), reports ``draining`` on ``/health``, and closes its open
sockets with 1001 at random moments spread over a window, so that their
clients reconnect to the other nodes gradually instead of all at once.

Used by ``POST /admin/drain``; a SIGTERM shutdown can reuse it with a short
window. A socket stops reading first; the events it has read are committed
and acknowledged before its 1001 close, so a client is told about every
event it sent that was stored, and sends again only those it never saw
read (the server deduplicates them).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, List, Optional, Set

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

if TYPE_CHECKING:
    from pocketbridge.server.context import Node
    from pocketbridge.server.gateway.adapter import GatewayProtocol

log = Logger()

#: Seconds between checks for the last socket to be gone.
POLL_INTERVAL = 0.1
#: Seconds after the window at which the Deferred fires even if sockets remain
#: (the close handshake times out after 5 s, then Autobahn drops the TCP).
GRACE = 10.0
CLOSE_REASON = "Server going away"

_active: "weakref.WeakKeyDictionary[Node, Drain]" = weakref.WeakKeyDictionary()


class Drain:
    """
    One drain of one node: closes the node's sockets 1001, each at a
    uniformly random moment in ``[0, window]`` seconds (``node.rng``,
    ``node.clock``). Reactor thread only.
    """

    def __init__(self, node: Node, window: float) -> None:
        self.node = node
        self.window = max(0.0, float(window))
        self.started_at = 0.0
        self.closed = 0
        self.finished = False
        self._closers: List[IDelayedCall] = []  # one timer per socket open at the start
        self._sweeper: Optional[IDelayedCall] = None
        self._asked: Set[GatewayProtocol] = set()  # sockets already sent their close
        self._waiters: List["Deferred[int]"] = []
        self._poll: Optional[IDelayedCall] = None

    def start(self) -> None:
        """Refuse new sockets and schedule the closing of the open ones."""
        node = self.node
        node.draining = True
        self.started_at = node.clock.seconds()
        sockets = list(node.connections)
        log.info("draining: closing {n} sockets over {window} s", n=len(sockets), window=self.window)
        for proto in sockets:
            delay = node.rng.uniform(0.0, self.window)
            self._closers.append(node.clock.callLater(delay, self._close, proto))
        # Sockets whose upgrade was already under way when the drain began.
        self._sweeper = node.clock.callLater(self.window, self._close_stragglers)
        self._check()

    def wait(self) -> "Deferred[int]":
        """A Deferred firing with the number of sockets closed once none is left."""
        d: "Deferred[int]" = Deferred()
        if self.finished:
            d.callback(self.closed)
        else:
            self._waiters.append(d)
        return d

    def _close(self, proto: GatewayProtocol) -> None:
        if proto not in self.node.connections or proto in self._asked:
            return  # gone on its own meanwhile, or closing already
        self._asked.add(proto)
        self.closed += 1
        session = getattr(proto, "session", None)
        if session is not None:
            # Stop reading, send the acks of events already read once they
            # commit, then close 1001 (so no committed event goes unacked).
            session.close_after_acks(1001, CLOSE_REASON)
        else:
            proto.close(1001, CLOSE_REASON)

    def _close_stragglers(self) -> None:
        for proto in list(self.node.connections):
            self._close(proto)

    def _check(self) -> None:
        self._poll = None
        if self.finished:
            return
        clock = self.node.clock
        pending = any(t.active() for t in self._closers)
        if not pending and not self.node.connections:
            self._finish()
            return
        if clock.seconds() - self.started_at > self.window + GRACE:
            log.warn("drain: {n} sockets still open after the window; giving up waiting",
                     n=len(self.node.connections))
            self._finish()
            return
        self._poll = clock.callLater(POLL_INTERVAL, self._check)

    def _finish(self) -> None:
        self.finished = True
        self._asked.clear()
        log.info("drain finished: {n} sockets closed", n=self.closed)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self.closed)


def start_drain(node: Node, window: float) -> "Deferred[int]":
    """
    Start draining ``node`` over ``window`` seconds (a second call joins the
    drain under way and keeps its window). The Deferred fires with the number
    of sockets closed when the node has no socket left.
    """
    drain = _active.get(node)
    if drain is None:
        drain = Drain(node, window)
        _active[node] = drain
        drain.start()
    return drain.wait()


def current_drain(node: Node) -> Optional[Drain]:
    """The drain under way on ``node``, if any."""
    return _active.get(node)
