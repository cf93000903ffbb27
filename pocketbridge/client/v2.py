"""
Protocol v2 bookkeeping for one client, sans-IO (PROTOCOL.md §6–§8).

- ``V2Outcomes``: every v2 event gets exactly one answer, an ``ack`` or a
  typed ``error``, in the order the events arrived (§6 step 6); this matches
  each answer to the send it belongs to and fails the send with
  ``EventRejected`` on an error.
- ``SeenEvents``: delivery is at-least-once (§7.2), so received events are
  deduplicated by ``event_id``; an explicit ``replay_request`` forgets the
  ids it asks for again.
- ``CatchUp``: the server pushes catch-up pages and ends every catch-up with
  exactly one ``caught_up`` (§7.3). It tracks the running catch-up, the
  ``replay_request``s waiting for their turn and who waits for the end.

Nothing here touches a socket or a clock.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any, Deque, Dict, List, Mapping, Optional, Tuple

from twisted.internet.defer import Deferred

from pocketbridge.client._util import is_wire_int
from pocketbridge.client.acks import AckTracker


class EventRejected(Exception):
    """
    The server answered an event with a typed v2 ``error`` (§8): ``code`` is
    ``not_owner``, ``invalid_event``, ``seq_conflict`` or ``quota_exceeded``;
    ``payload`` is the whole error payload (``in_reply_to``, ``event_id``, ``device_seq``).
    """

    def __init__(self, code: str, message: str, payload: Mapping[str, Any]) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.payload = dict(payload)

    def __str__(self) -> str:
        """``"<code>: <message>"``."""
        return "{}: {}".format(self.code, self.message)


class V2Outcomes(AckTracker):
    """
    The events sent on one connection and not yet answered. Acks match as
    in ``AckTracker``; ``match_error`` matches an ``error`` whose
    ``in_reply_to`` is ``event`` the same way (by ``event_id``, then
    ``device_seq``). An error without either field goes to the oldest send
    whose ``event_id`` was not a string: the server copies the fields it can,
    so any other send would have been named. Reactor thread only.
    """

    def match_error(self, error: Mapping[str, Any]) -> bool:
        """Fail the send this error answers with ``EventRejected``; False when none matches."""
        found = self._find(error)
        if found is None and error.get("event_id") is None and error.get("device_seq") is None:
            found = next((p for p in self._pending if p.event_id is None), None)
        if found is None:
            return False
        self._pending.remove(found)
        if not found.abandoned:
            code = error.get("code")
            message = error.get("message")
            found.deferred.errback(EventRejected(
                code if isinstance(code, str) else "unknown", message if isinstance(message, str) else "", error))
        return True


class SeenEvents:
    """
    The ``event_id``s (lowercased) of the last ``capacity`` received events,
    with their ``seq``. Events without a string ``event_id`` are always new.
    """

    def __init__(self, capacity: int = 10000) -> None:
        self.capacity = capacity
        self._seen: "OrderedDict[str, Any]" = OrderedDict()

    def __len__(self) -> int:
        """How many ids are remembered."""
        return len(self._seen)

    def add(self, event: Mapping[str, Any]) -> bool:
        """Remember ``event``; True the first time its ``event_id`` is seen."""
        event_id = event.get("event_id")
        if not isinstance(event_id, str):
            return True
        key = event_id.lower()
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = event.get("seq")
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True

    def forget_above(self, seq: int) -> None:
        """Forget every id whose ``seq`` is above ``seq`` (they were asked for again)."""
        for key in [k for k, s in self._seen.items() if not is_wire_int(s) or s > seq]:
            del self._seen[key]


class CatchUp:
    """
    The catch-up state of one v2 connection.

    A catch-up starts at authentication. ``replay_request`` starts another
    one, but only once the running one has ended: ``caught_up`` carries no
    tag, so a request sent mid-catch-up could be answered by the old
    ``caught_up`` or not, and the client could not tell. Requests wait in a
    queue and each is sent when the ``caught_up`` before it arrives; each
    request's Deferred fires with the head ``H`` of its own ``caught_up``.
    ``wait_idle`` fires once a ``caught_up`` leaves nothing queued.
    Reactor thread only.
    """

    def __init__(self) -> None:
        self.running = True
        self.head: Optional[int] = None  # H of the last caught_up
        self.events: List[Dict[str, Any]] = []  # page events delivered since the last take
        self._idle: List["Deferred[int]"] = []
        self._queued: Deque[Tuple[int, "Deferred[int]"]] = deque()
        self._current: Optional["Deferred[int]"] = None

    @property
    def idle(self) -> bool:
        """True when no catch-up runs and no request waits."""
        return not self.running and not self._queued

    def wait_idle(self) -> "Deferred[int]":
        """Fires with H of the ``caught_up`` that leaves the client fully caught up."""
        d: "Deferred[int]" = Deferred(canceller=lambda d: self._forget(d))
        if self.idle and self.head is not None:
            d.callback(self.head)
        else:
            self._idle.append(d)
        return d

    def request(self, resume_from: int) -> Tuple["Deferred[int]", bool]:
        """
        Register a ``replay_request``; returns its Deferred and whether to
        send it now (else ``caught_up`` returns it when its turn comes).
        """
        d: "Deferred[int]" = Deferred(canceller=lambda d: self._forget(d))
        if self.running or self._queued:
            self._queued.append((resume_from, d))
            return d, False
        self.running = True
        self._current = d
        return d, True

    def caught_up(self, head: int) -> Optional[int]:
        """
        The running catch-up ended at ``head``. Returns the ``resume_from`` of
        the next queued request, to be sent now, or None.
        """
        self.running = False
        self.head = head
        current, self._current = self._current, None
        if current is not None and not current.called:
            current.callback(head)
        if self._queued:
            resume_from, d = self._queued.popleft()
            self.running = True
            self._current = d
            return resume_from
        idle, self._idle = self._idle, []
        for d in idle:
            if not d.called:
                d.callback(head)
        return None

    def take_events(self) -> List[Dict[str, Any]]:
        """The page events delivered since the last call."""
        events, self.events = self.events, []
        return events

    def _forget(self, d: "Deferred[int]") -> None:
        """A cancelled waiter (its request, if queued, is still sent)."""
        if d in self._idle:
            self._idle.remove(d)

    def fail_all(self, exc: BaseException) -> None:
        """The connection closed: fail every waiter and queued request."""
        waiters = list(self._idle) + [d for _, d in self._queued]
        if self._current is not None:
            waiters.append(self._current)
        self._idle, self._queued, self._current = [], deque(), None
        for d in waiters:
            if not d.called:
                d.errback(exc)
