"""
v1 catch-up bookkeeping for one connection (PROTOCOL.md §7.3), sans-IO.

Pages answer ``replay_request``s in order. One page may come unasked: when
``session_established`` said ``last_ack_device_seq == 0`` and the backlog is
not empty, the server pushes the first page before answering anything. The
client cannot see the backlog, but the rule decides it anyway: with that
watermark, a non-empty first page is the pushed one (an empty backlog gets no
push, and then the answer to our first request is the empty page).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger()

Page = Dict[str, Any]


class _PageWait:
    """A ``replay_request`` waiting for its page."""

    __slots__ = ("deferred", "abandoned")

    def __init__(self) -> None:
        self.abandoned = False
        self.deferred: "Deferred[Page]" = Deferred(canceller=self._abandon)

    def _abandon(self, d: "Deferred[Page]") -> None:
        self.abandoned = True  # the page still comes, in order; drop it then


class ReplayPages:
    """
    Matches replay pages to requests and remembers the replayed events.

    ``continuation_token`` is the token of the last page with ``has_more``.
    Reactor thread only.
    """

    def __init__(self, last_ack_device_seq: int) -> None:
        self._push_possible = last_ack_device_seq == 0
        self._waits: List[_PageWait] = []
        self._pages_seen = 0
        self._replayed: List[Dict[str, Any]] = []
        self._mark = 0
        self.continuation_token: Optional[str] = None

    def expect(self) -> "Deferred[Page]":
        """Register a request about to be sent; fires with the page that answers it."""
        wait = _PageWait()
        self._waits.append(wait)
        return wait.deferred

    def receive(self, page: Page, on_event: Callable[[Dict[str, Any]], None]) -> bool:
        """
        Hand each event of ``page`` to ``on_event`` (in order), then resolve
        the request it answers. False when the page answered no request (the
        pushed first page, or one nobody asked for).
        """
        events = page.get("events")
        if not isinstance(events, list):
            events = []
        pushed = self._pages_seen == 0 and self._push_possible and bool(events)
        self._pages_seen += 1
        for event in events:
            if isinstance(event, dict):
                self._replayed.append(event)
                on_event(event)
        token = page.get("continuation_token")
        self.continuation_token = token if page.get("has_more") and isinstance(token, str) else None
        if pushed:
            return False
        if not self._waits:
            log.warn("Unrequested replay_response")
            return False
        wait = self._waits.pop(0)
        if not wait.abandoned:
            wait.deferred.callback(page)
        return True

    def take_replayed(self, keep: bool = True) -> List[Dict[str, Any]]:
        """The events replayed since the last call; with ``keep=False`` forget them too."""
        events = self._replayed[self._mark:]
        if keep:
            self._mark = len(self._replayed)
        else:
            self._replayed, self._mark = [], 0
        return events

    def fail_all(self, exc: BaseException) -> None:
        """Fail every waiting request (the connection closed)."""
        waits, self._waits = self._waits, []
        for wait in waits:
            if not wait.abandoned:
                wait.deferred.errback(exc)
