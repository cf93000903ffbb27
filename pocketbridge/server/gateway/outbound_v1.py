"""
What a v1 session sends (PROTOCOL.md §7.1–§7.2): live events as the hub
routes them, the backlog in pages the client asks for (``replay_request``),
and after a full send buffer the live events it missed, read back from
storage page by page. Acks name the sender's ``device_seq``; ``V1Tracker``
turns them into the device's delivery cursor.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pocketbridge.protocol import wire
from pocketbridge.protocol.events import StoredEvent, relay_payload
from pocketbridge.server import metrics
from pocketbridge.server.gateway.delivery import V1Tracker, page_bytes, replay_page
from pocketbridge.server.gateway.inbound import SERVER_REQUEST, Host

log = Logger()

#: Events per page when a paused v1 socket resumes from storage.
BACKFILL_PAGE = 100
#: Events per page a fresh device gets without asking (and a request without a usable limit).
FIRST_PAGE = 100


class V1Outbound:
    """The outbound side of one v1 socket: pages on request, live relay, backfill after a pause."""

    __slots__ = ("host", "settings", "busy", "head", "early_live", "tracker", "replay_pos", "replay_remaining",
                 "backfilling", "live_seen", "live_last")

    def __init__(self, host: Host) -> None:
        self.host = host
        self.settings = host.node.settings
        self.busy = False  # a replay page is being read: the inbound queue waits
        self.head: Optional[int] = None  # H; None until read
        #: Routed before H was read (None: none; never again once H is known).
        self.early_live: Optional[List[Tuple[StoredEvent, bytes]]] = None
        self.tracker: Optional[V1Tracker] = None
        self.replay_pos = 0
        self.replay_remaining: Optional[int] = None
        self.backfilling = False  # a paused socket is reading what it missed, page by page
        self.live_seen = 0  # highest live seq routed to this socket
        self.live_last = 0  # highest live seq handled by this socket

    def start(self, head: int, delivered_seq: int, last_device_seq: int,
              resume_from: Optional[int], purged_below: int) -> None:
        """H was read: set up the backlog and release live events queued meanwhile (v1 pages on request)."""
        self.head = head
        self.live_last = head
        start = min(delivered_seq, head)
        self.replay_pos = start
        self.tracker = V1Tracker(start, head, self.settings.v1_unacked_tracked)
        early, self.early_live = self.early_live, None
        for event, frame in early or ():
            self.deliver_live(event, frame)
        if last_device_seq == 0 and start < head:
            # v1 clients only ask for pages when they think they have stored
            # something; push the first page to a fresh device ourselves.
            self.host.request("replay_request", {"limit": FIRST_PAGE})

    # ------------------------------------------------------------ acks

    def matches_delivery(self, fields: Dict[str, Any]) -> bool:
        d = fields.get("device_seq")
        return self.tracker is not None and type(d) is int and self.tracker.expects_ack(d)

    def on_ack(self, fields: Dict[str, Any]) -> None:
        """An ack names the sender's device_seq; one that matches nothing sent is ignored."""
        d = fields.get("device_seq")
        if type(d) is not int or self.tracker is None:
            return
        if self.tracker.ack(d):
            self._cursor_changed()

    def _cursor_changed(self) -> None:
        assert self.tracker is not None
        host = self.host
        host.node.cursors.update(host.user_id, host.device_id, self.tracker.delivered())

    # ------------------------------------------------------------ the backlog, on request

    def on_replay(self, fields: Dict[str, Any]) -> None:
        limit = fields.get("limit")
        limit = min(max(limit, 1), 1000) if type(limit) is int else FIRST_PAGE
        self.busy = True
        d = Deferred.fromCoroutine(self._serve_page(limit, bool(fields.get(SERVER_REQUEST))))
        d.addErrback(self._page_failed)

    async def _serve_page(self, limit: int, unsolicited: bool) -> None:
        assert self.head is not None and self.tracker is not None
        host = self.host
        storage = host.node.storage
        now = host.node.now_ms()
        if self.replay_remaining is None:
            self.replay_remaining = await storage.count_backlog(
                host.user_id, self.replay_pos, self.head, host.device_id, now)
        events: List[StoredEvent] = []
        more = False
        if self.replay_pos < self.head:
            events, more = await storage.read_page(
                host.user_id, self.replay_pos, self.head, host.device_id, limit, page_bytes(self.settings), now)
        if host.closed:
            return
        if unsolicited and not events:
            self.replay_pos = self.head
            self.tracker.backlog_covered(self.head)
            self._page_done()
            return
        self.replay_pos = events[-1].seq if more else self.head
        frame = replay_page(events, more, self.replay_remaining, self.replay_pos)
        self.replay_remaining = max(0, self.replay_remaining - len(events))
        for e in events:
            self.tracker.sent(e.seq, e.device_seq)
        self.tracker.backlog_covered(self.replay_pos)
        host.conn.send(frame)
        self._cursor_changed()
        self._page_done()

    def _page_done(self) -> None:
        self.busy = False
        self.host.pump()

    def _page_failed(self, failure: Failure) -> None:
        self.busy = False
        self.host.failed(failure)

    # ------------------------------------------------------------ live relay

    def deliver_live(self, event: StoredEvent, frame: bytes) -> None:
        """The hub routes a committed event of this user (in seq order, no gaps)."""
        if self.host.closed:
            return
        if self.head is None:
            if self.early_live is None:
                self.early_live = []
            self.early_live.append((event, frame))
            return
        if event.seq <= self.live_last:
            return  # in the backlog, or already handled
        self.live_seen = max(self.live_seen, event.seq)
        if self.backfilling or self.host.out_paused:
            return  # read from storage when the buffer drains
        self._send_live(event, frame)

    def _send_live(self, event: StoredEvent, frame: bytes) -> None:
        assert self.tracker is not None
        host = self.host
        self.live_last = event.seq
        if event.device_id != host.device_id and not event.expired(host.node.now_ms()):
            self.tracker.sent(event.seq, event.device_seq)
            metrics.EVENTS_RELAYED.labels(path="live").inc()
            host.conn.send(frame)
        self.tracker.live_handled(event.seq)
        self._cursor_changed()

    def resumed(self) -> None:
        """The send buffer drained: send from storage what was held back, page by page, then go on."""
        if self.backfilling:
            return  # the running backfill goes on with its next page
        self.backfilling = True
        d = Deferred.fromCoroutine(self._backfill())
        d.addErrback(self._backfill_failed)

    async def _backfill(self) -> None:
        """Pages of live events missed while paused, each within the outbound bound; stops when paused again."""
        assert self.tracker is not None
        host = self.host
        storage = host.node.storage
        s = self.settings
        max_bytes = max(1, min(s.outbound_pause_bytes, page_bytes(s)))
        target = await storage.head(host.user_id)
        while not host.closed and not host.out_paused:
            target = max(target, self.live_seen)
            after = self.live_last
            if after >= target:
                break
            events, more = await storage.read_page(
                host.user_id, after, target, None, BACKFILL_PAGE, max_bytes, host.node.now_ms())
            if host.closed:
                return
            upto = events[-1].seq if more and events else target
            for event in events:
                if event.seq > self.live_last:
                    self._send_live(event, wire.encode("event", relay_payload(event)))
            # Events of the range the page skipped (expired) are handled too.
            self.tracker.live_handled_through(after, upto)
            self.live_last = max(self.live_last, upto)
            self._cursor_changed()
        self.backfilling = False
        if host.closed:
            return
        if host.out_paused:
            return  # resumed later, from where it stopped
        host.pump()

    def _backfill_failed(self, failure: Failure) -> None:
        self.backfilling = False
        self._page_failed(failure)

    # ------------------------------------------------------------ ending

    def lost(self) -> None:
        """The socket is gone: write the cursor; count an event that stalled delivery."""
        if self.tracker is not None:
            self._cursor_changed()
            self._note_unacked()

    def _note_unacked(self) -> None:
        """If delivery stalled on one unacknowledged event, count it (§7.2 give-up rule)."""
        assert self.tracker is not None
        low = self.tracker.lowest_unacked()
        delivered = self.tracker.delivered()
        if low is None or low != delivered + 1 or self.tracker.frozen is not None:
            return
        host = self.host
        d = host.node.storage.record_unacked(host.user_id, host.device_id, delivered, low, host.node.now_ms())

        def done(gave_up: bool) -> None:
            if gave_up:
                metrics.DELIVERY_GAVE_UP.inc()
                log.info("event delivered 3 times without an ack; treating it as acknowledged")

        d.addCallbacks(done, lambda f: log.warn("could not record unacked event: {e}", e=f.getErrorMessage()))
