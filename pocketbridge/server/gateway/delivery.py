"""
What both outbound strategies of a session share: the ``replay_response``
page (PROTOCOL.md §7) and its byte budget; and the v1 delivery cursor of one
socket (§7.2), pure bookkeeping.

The device's ``delivered_seq`` may advance to S only when every event due to
the device with seq ≤ S was sent on this connection and acknowledged, or was
already covered when the connection began. v1 acks name the *sender's*
device_seq, so acknowledgement is counted per device_seq value.
"""

from __future__ import annotations

import heapq
from typing import Any, Dict, List, Optional, Set, Tuple

from pocketbridge.protocol import wire
from pocketbridge.protocol.events import StoredEvent, relay_payload
from pocketbridge.server import metrics
from pocketbridge.server.config import Settings

#: Room kept in a message for everything around the events of a page.
PAGE_MARGIN = 64 * 1024


def page_bytes(settings: Settings) -> int:
    """The most payload bytes one page read from storage may carry (a page is one message)."""
    return settings.max_message_bytes - PAGE_MARGIN


def replay_page(events: List[StoredEvent], more: bool, remaining: int, pos: int) -> bytes:
    """
    One ``replay_response`` page, counted in the metrics. ``remaining`` is
    what the backlog count still expects, ``pos`` the seq the page reaches
    (the continuation point when ``more``).
    """
    payload: Dict[str, Any] = {
        "type": "replay_response",
        "events": [relay_payload(e) for e in events],
        "has_more": more,
        "page_size": len(events),
        "total_events": max(remaining, len(events)) if events else 0,
    }
    if more:
        payload["continuation_token"] = "seq:{}".format(pos)
    metrics.REPLAY_PAGES.inc()
    metrics.EVENTS_RELAYED.labels(path="replay").inc(len(events))
    return wire.encode("replay_response", payload)


class _Outstanding:
    """The events a v1 socket sent that acks have not balanced yet, by the sender's device_seq."""

    __slots__ = ("sent", "acks", "seqs", "heap")

    def __init__(self) -> None:
        self.sent: Dict[int, int] = {}  # device_seq → events sent and not yet balanced
        self.acks: Dict[int, int] = {}
        self.seqs: Dict[int, Set[int]] = {}  # device_seq → seqs of unbalanced events
        self.heap: List[Tuple[int, int]] = []  # (seq, device_seq), lazily cleaned


class V1Tracker:
    """
    What one v1 socket sent, what the device acknowledged, and the cursor that follows.

    The bookkeeping of unacknowledged events (``_Outstanding``: three dicts
    and a heap) exists only while something is unacknowledged: a socket with
    everything acked, the idle case, holds none of it.
    """

    __slots__ = ("start", "head", "backlog_pos", "live_pos", "max_tracked", "_out", "_tracked", "frozen", "_best")

    def __init__(self, start: int, head: int, max_tracked: int = 10_000) -> None:
        self.start = start
        self.head = head  # H: the backlog is start < seq ≤ head
        self.backlog_pos = start if start < head else head  # backlog covered up to here
        self.live_pos = head  # live events handled (sent or not due) up to here, contiguously
        self.max_tracked = max_tracked
        self._out: Optional[_Outstanding] = None  # None: nothing sent is unbalanced
        self._tracked = 0  # events in ``_out`` (the sum of its ``sent``)
        self.frozen: Optional[int] = None  # cursor value when tracking overflowed
        self._best = start

    # events going out
    def sent(self, seq: int, device_seq: int) -> None:
        """An event was written to the socket."""
        if self.frozen is not None:
            return
        out = self._out
        if out is None:
            out = self._out = _Outstanding()
        out.sent[device_seq] = out.sent.get(device_seq, 0) + 1
        out.seqs.setdefault(device_seq, set()).add(seq)
        heapq.heappush(out.heap, (seq, device_seq))
        self._tracked += 1
        if self._tracked > self.max_tracked:
            self.frozen = self.delivered()

    def backlog_covered(self, upto: int) -> None:
        """Every due backlog event with seq ≤ upto was sent (pages are contiguous)."""
        self.backlog_pos = max(self.backlog_pos, min(upto, self.head))

    def live_handled(self, seq: int) -> None:
        """Live event ``seq`` (> head) was sent or is not due to this device."""
        if seq == self.live_pos + 1:
            self.live_pos = seq

    def live_handled_through(self, after: int, upto: int) -> None:
        """Every live event with after < seq ≤ upto was sent or is not due (a page read from storage)."""
        if self.live_pos >= after:
            self.live_pos = max(self.live_pos, upto)

    # acks coming in
    def expects_ack(self, device_seq: int) -> bool:
        """True when an ack for ``device_seq`` would match an event sent on this socket."""
        out = self._out
        return out is not None and out.sent.get(device_seq, 0) > out.acks.get(device_seq, 0)

    def ack(self, device_seq: int) -> bool:
        """Count an ack; False when it matches nothing (ignored)."""
        out = self._out
        if out is None or not self.expects_ack(device_seq):
            return False
        acks = out.acks.get(device_seq, 0) + 1
        if acks == out.sent[device_seq]:
            # Balanced: every event sent with this device_seq is acknowledged.
            self._tracked -= acks
            del out.sent[device_seq]
            out.acks.pop(device_seq, None)
            out.seqs.pop(device_seq, None)
            if self._tracked == 0:
                self._out = None  # all balanced; what is left in the heap is stale
        else:
            out.acks[device_seq] = acks
        return True

    def lowest_unacked(self) -> Optional[int]:
        """The lowest seq sent and not yet acknowledged."""
        out = self._out
        if out is None:
            return None
        heap = out.heap
        while heap:
            seq, d = heap[0]
            if seq in out.seqs.get(d, ()):
                return seq
            heapq.heappop(heap)
        return None

    def delivered(self) -> int:
        """The highest S this connection proves delivered (monotonic)."""
        if self.frozen is not None:
            return self.frozen
        covered = self.backlog_pos if self.backlog_pos < self.head else self.live_pos
        low = self.lowest_unacked()
        if low is not None:
            covered = min(covered, low - 1)
        if covered > self._best:
            self._best = covered
        return self._best
