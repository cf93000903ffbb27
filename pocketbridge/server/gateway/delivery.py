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


class V1Tracker:
    """What one v1 socket sent, what the device acknowledged, and the cursor that follows."""

    def __init__(self, start: int, head: int, max_tracked: int = 10_000) -> None:
        self.start = start
        self.head = head  # H: the backlog is start < seq ≤ head
        self.backlog_pos = start if start < head else head  # backlog covered up to here
        self.live_pos = head  # live events handled (sent or not due) up to here, contiguously
        self.max_tracked = max_tracked
        self._sent: Dict[int, int] = {}  # device_seq → events sent and not yet balanced
        self._acks: Dict[int, int] = {}
        self._seqs: Dict[int, Set[int]] = {}  # device_seq → seqs of unbalanced events
        self._heap: List[Tuple[int, int]] = []  # (seq, device_seq), lazily cleaned
        self._tracked = 0
        self.frozen: Optional[int] = None  # cursor value when tracking overflowed
        self._best = start

    # events going out
    def sent(self, seq: int, device_seq: int) -> None:
        """An event was written to the socket."""
        if self.frozen is not None:
            return
        self._sent[device_seq] = self._sent.get(device_seq, 0) + 1
        self._seqs.setdefault(device_seq, set()).add(seq)
        heapq.heappush(self._heap, (seq, device_seq))
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
        return self._sent.get(device_seq, 0) > self._acks.get(device_seq, 0)

    def ack(self, device_seq: int) -> bool:
        """Count an ack; False when it matches nothing (ignored)."""
        if not self.expects_ack(device_seq):
            return False
        acks = self._acks.get(device_seq, 0) + 1
        if acks == self._sent[device_seq]:
            # Balanced: every event sent with this device_seq is acknowledged.
            self._tracked -= acks
            del self._sent[device_seq]
            self._acks.pop(device_seq, None)
            self._seqs.pop(device_seq, None)
        else:
            self._acks[device_seq] = acks
        return True

    def lowest_unacked(self) -> Optional[int]:
        """The lowest seq sent and not yet acknowledged."""
        while self._heap:
            seq, d = self._heap[0]
            if seq in self._seqs.get(d, ()):
                return seq
            heapq.heappop(self._heap)
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
