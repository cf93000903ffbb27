"""
Matching the server's acks to the events a client sent, sans-IO.

The server acks each event in the order the events arrived (PROTOCOL.md §6
step 6). An ack carries ``device_seq`` and, when the event's ``event_id`` was a
string, that ``event_id``; a dropped event's ack has ``"dropped": true`` and no
``seq``. Events ignored without an ack (another user's or device's, or a
``device_seq`` that is not an integer) never get one, so matching is by id,
not by position: the oldest pending send with the ack's ``event_id`` (compared
lowercased) and ``device_seq``, else the oldest with that ``event_id``, else the oldest with its ``device_seq`` whose event_id was not a
string; an ack without an ``event_id`` falls back to any send with its
``device_seq``. An ack whose string ``event_id`` matches no send matches
nothing (a server echoing the wrong id is a bug to surface, not to paper over).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from twisted.internet.defer import Deferred

from pocketbridge.client._util import is_wire_int


class _Pending:
    """One sent event waiting for its ack."""

    __slots__ = ("event_id", "device_seq", "deferred", "abandoned")

    def __init__(self, event_id: Optional[str], device_seq: Any) -> None:
        self.event_id = event_id
        self.device_seq = device_seq
        self.deferred: "Deferred[Dict[str, Any]]" = Deferred(canceller=self._abandon)
        self.abandoned = False

    def _abandon(self, d: "Deferred[Dict[str, Any]]") -> None:
        # Keep the slot: the ack may still come and must not be matched to a
        # later event with the same device_seq.
        self.abandoned = True

    def same_seq(self, device_seq: Any) -> bool:
        """True when this send used ``device_seq`` (integers only, as on the wire)."""
        return is_wire_int(device_seq) and is_wire_int(self.device_seq) and device_seq == self.device_seq


class AckTracker:
    """
    The FIFO of events sent on one connection and not yet acked.

    ``expect`` registers a send and returns a Deferred that fires with the ack
    payload; ``match`` consumes an incoming ack. Reactor thread only.
    """

    def __init__(self) -> None:
        self._pending: List[_Pending] = []

    def __len__(self) -> int:
        """The number of sends still waiting for an ack (abandoned ones included)."""
        return len(self._pending)

    def expect(self, event_id: Any, device_seq: Any) -> "Deferred[Dict[str, Any]]":
        """
        Register an event about to be sent. Cancelling the returned Deferred
        (e.g. by a timeout) abandons it; its ack is then consumed silently.
        """
        pending = _Pending(event_id.lower() if isinstance(event_id, str) else None, device_seq)
        self._pending.append(pending)
        return pending.deferred

    def match(self, ack: Mapping[str, Any]) -> bool:
        """
        Fire the Deferred of the send this ack belongs to. False when no
        pending send matches (a stray or repeated ack).
        """
        found = self._find(ack)
        if found is None:
            return False
        self._pending.remove(found)
        if not found.abandoned:
            found.deferred.callback(dict(ack))
        return True

    def _find(self, ack: Mapping[str, Any]) -> Optional[_Pending]:
        """The pending send an ack belongs to, or None."""
        event_id = ack.get("event_id")
        device_seq = ack.get("device_seq")
        if isinstance(event_id, str):
            wanted = event_id.lower()
            same_id = [p for p in self._pending if p.event_id == wanted]
            for pending in same_id:
                if pending.same_seq(device_seq):
                    return pending  # a re-send of one event_id under several seqs
            if same_id:
                return same_id[0]
        # Sends whose event_id was not a string get acks without one.
        for pending in self._pending:
            if pending.event_id is None and pending.same_seq(device_seq):
                return pending
        if event_id is None:
            for pending in self._pending:
                if pending.same_seq(device_seq):
                    return pending
        return None

    def fail_all(self, exc: BaseException) -> None:
        """Fail every pending send with ``exc`` (the connection closed)."""
        pending, self._pending = self._pending, []
        for p in pending:
            if not p.abandoned:
                p.deferred.errback(exc)
