"""
``Inbox``: what a ``Client`` received, kept for its caller.

Receiving has two halves. Which messages mean what (acks, events, pages,
errors) depends on the protocol version and lives in ``Client`` and its
strategy; what a caller can read or wait for afterwards does not, and lives
here: the history of messages and events (``messages``,
``events_received``), the ``next_event`` queue, the ``wait_for`` watchers
and the ``on_event`` callback. Keeping them apart lets the Client stay about
the connection, and lets this half be tested without a socket.

An Inbox outlives connections, like its Client: ``opened`` starts a new one,
``closed`` fails whatever waits on the old one. Reactor thread only.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from pocketbridge.client._util import WaitQueue
from pocketbridge.client.connection import CloseInfo, ConnectionClosed

__all__ = ["EventCallback", "Inbox"]

log = Logger()

#: ``Client.on_event``: called with each received event payload.
EventCallback = Callable[[Dict[str, Any]], None]


class Inbox:
    """
    The received side of one ``Client``, over all its connections.

    With ``keep_history`` false nothing is stored or queued (long-running
    watchers use ``on_event``, which is called either way); both may be
    changed at any time, as on the Client.
    """

    def __init__(self, clock: Any, keep_history: bool = True, on_event: Optional[EventCallback] = None) -> None:
        self.clock = clock
        self.keep_history = keep_history
        self.on_event = on_event
        #: Every message received after authentication, in order (when history is kept).
        self.messages: List[Any] = []
        #: Every event payload received, live or replayed (when history is kept).
        self.events_received: List[Dict[str, Any]] = []
        self._events: WaitQueue[Dict[str, Any]] = WaitQueue(clock)
        self._watchers: List[Tuple[str, "Deferred[Any]"]] = []
        self._close_info: Optional[CloseInfo] = None

    def opened(self) -> None:
        """A new connection began: waiting works again."""
        self._close_info = None
        self._events.reopen()

    def record_message(self, message: Any) -> None:
        """Keep one message in ``messages`` (before it is handled, so a handler sees it there)."""
        if self.keep_history:
            self.messages.append(message)

    def notify(self, msg_type: Optional[str], message: Any) -> None:
        """Fire the ``wait_for`` watchers of ``msg_type`` (after the message was handled)."""
        watchers, self._watchers = self._watchers, []
        for wanted, d in watchers:
            if wanted == msg_type:
                d.callback(message)
            else:
                self._watchers.append((wanted, d))

    def record_event(self, event: Dict[str, Any]) -> None:
        """Keep a received event in the history and give it to ``on_event``."""
        if self.keep_history:
            self.events_received.append(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.failure("on_event callback failed")

    def queue_event(self, event: Dict[str, Any]) -> None:
        """Queue a received event for ``next_event`` when history is kept."""
        if self.keep_history:
            self._events.put(event)

    def closed(self, exc: ConnectionClosed) -> None:
        """
        The connection closed: ``next_event`` fails with ``exc`` once the
        queue is drained, every watcher fails now, and new ones fail at once.
        """
        self._close_info = (exc.code, exc.reason)
        self._events.fail(exc)
        watchers, self._watchers = self._watchers, []
        for _, d in watchers:
            d.errback(exc)

    def next_event(self, timeout: Optional[float] = 5.0) -> "Deferred[Dict[str, Any]]":
        """See ``Client.next_event``."""
        return self._events.get(timeout)

    def wait_for(self, msg_type: str, timeout: Optional[float] = 5.0, since: Optional[int] = 0) -> "Deferred[Any]":
        """See ``Client.wait_for``."""
        if since is not None:
            for message in self.messages[since:]:
                if isinstance(message, dict) and message.get("type") == msg_type:
                    return succeed(message)
        if self._close_info is not None:
            return fail(ConnectionClosed(*self._close_info))
        d: "Deferred[Any]" = Deferred(canceller=self._forget_watcher)
        self._watchers.append((msg_type, d))
        if timeout is not None:
            d.addTimeout(timeout, self.clock)
        return d

    def _forget_watcher(self, d: "Deferred[Any]") -> None:
        """Drop a cancelled ``wait_for``."""
        self._watchers = [(t, w) for t, w in self._watchers if w is not d]
