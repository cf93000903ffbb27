"""
An authenticated connection (PROTOCOL.md §6–§9, §12): what it reads, in what
order it answers, what it relays, and when it stops reading.

The session is independent of Autobahn: it talks to its socket through a
small ``Conn`` interface (send, close, pause/resume reading) so tests can drive
it with fakes. Every inbound frame goes through one queue, handled strictly
in arrival order; the queue stops (and the socket stops being read) while a
rate limit, a replay read, uncommitted bytes or a full outbound buffer says so.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, List, Optional, Protocol, Tuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pocketbridge.server import metrics

from pocketbridge.protocol import wire
from pocketbridge.server.gateway.delivery import V1Tracker
from pocketbridge.protocol.events import StoredEvent, Verdict, check_event, relay_payload
from pocketbridge.server.storage import Outcome, StorageUnavailable

log = Logger()

KIB = 1024
# Marks the server's own first-page request; a non-string key no client JSON can carry.
_UNSOLICITED: Any = object()
# WebSocket control frames in the inbox: frames like any other for the limits (§12),
# typed by objects no client JSON can carry.
WS_PING: Any = object()
WS_PONG: Any = object()
#: Events per page when a paused v1 socket resumes from storage.
BACKFILL_PAGE = 100


class Conn(Protocol):
    """The socket side of a session."""

    def send(self, data: bytes) -> None: ...

    def close(self, code: int, reason: str) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def send_pong(self, payload: bytes) -> None: ...

    def pong_received(self) -> None: ...


class _Slot:
    """One event's place in the ack order."""

    __slots__ = ("frame", "done")

    def __init__(self) -> None:
        self.frame: Optional[bytes] = None  # the ack to send; None = nothing to send
        self.done = False


class Session:
    """One authenticated socket of a device."""

    def __init__(
        self, node: Any, conn: Conn, user_id: str, device_id: str, session_id: str, version: int,
        device_name: Optional[str], device_type: str,
    ) -> None:
        self.node = node
        self.conn = conn
        self.user_id = user_id
        self.device_id = device_id
        self.session_id = session_id
        self.version = version
        self.device_name = device_name
        self.device_type = device_type
        s = node.settings
        self.settings = s
        self.inbox: Deque[Tuple[str, Dict[str, Any]]] = deque()
        self.frame_bucket = _bucket(s.frames_per_socket_rate, s.frames_per_socket_burst, node.clock.seconds)
        self.outcomes: Deque[_Slot] = deque()
        self.pending_bytes = 0
        self.page_busy = False
        self.out_paused = False
        self.reading_paused = False
        self.stopped = False  # no more frames are read (expiry, close)
        self.closed = False
        self.wake: Any = None
        self.head: Optional[int] = None  # H; None until read
        self.early_live: List[Tuple[StoredEvent, bytes]] = []
        self.tracker: Optional[V1Tracker] = None
        self.replay_pos = 0
        self.replay_remaining: Optional[int] = None
        self.backfilling = False  # a paused v1 socket is reading what it missed, page by page
        self.live_seen = 0  # highest live seq routed to this socket
        self.live_last = 0  # highest live seq handled by this socket
        self.final_close: Optional[Tuple[int, str]] = None  # close once the pending acks are out

    # ------------------------------------------------------------ start

    #: Whether the gateway sends ``session_expiring_soon`` 5 minutes before expiry (v2 only, PROTOCOL.md §9).
    warns_before_expiry = False

    def established(self, head: int, delivered_seq: int, last_device_seq: int,
                    resume_from: Optional[int] = None, purged_below: int = 0) -> None:
        """
        H was read: set up catch-up and release live events queued meanwhile.
        ``resume_from`` and ``purged_below`` matter to v2 only (v1 pages on request).
        """
        self.head = head
        self.live_last = head
        start = min(delivered_seq, head)
        self.replay_pos = start
        self.tracker = V1Tracker(start, head, self.settings.v1_unacked_tracked)
        early, self.early_live = self.early_live, []
        for event, frame in early:
            self.deliver_live(event, frame)
        if last_device_seq == 0 and start < head:
            # v1 clients only ask for pages when they think they have stored
            # something; push the first page to a fresh device ourselves.
            self.inbox.appendleft(("replay_request", {"limit": 100, _UNSOLICITED: True}))
        self.pump()

    # ------------------------------------------------------------ inbound

    def on_frame(self, msg_type: str, fields: Dict[str, Any]) -> None:
        """A parsed client frame arrived; queue it in arrival order."""
        if self.stopped:
            return
        self.inbox.append((msg_type, fields))
        self.pump()

    def _blocked(self) -> bool:
        return (
            self.stopped or self.head is None or self.page_busy or self.out_paused
            or self.pending_bytes > self.settings.pending_bytes_per_socket
        )

    def pump(self) -> None:
        """Handle queued frames until one must wait; pause the socket while they wait."""
        while self.inbox and not self._blocked() and self.wake is None:
            msg_type, fields = self.inbox[0]
            wait = self._admit(msg_type, fields)
            if wait > 0:
                self.wake = self.node.clock.callLater(wait, self._woken)
                break
            self.inbox.popleft()
            self._handle(msg_type, fields)
        self._set_reading(not self.inbox and not self._blocked())

    def _woken(self) -> None:
        self.wake = None
        self.pump()

    def _set_reading(self, reading: bool) -> None:
        if self.closed:
            return
        if reading and self.reading_paused:
            self.reading_paused = False
            self.conn.resume_reading()
        elif not reading and not self.reading_paused:
            self.reading_paused = True
            self.conn.pause_reading()

    def _admit(self, msg_type: str, fields: Dict[str, Any]) -> float:
        """Take rate-limit tokens for a frame; return seconds to wait (0 = go)."""
        if msg_type == "ack" and self.tracker is not None:
            d = fields.get("device_seq")
            if type(d) is int and self.tracker.expects_ack(d):
                return 0.0  # acks of delivered events come at the delivery rate
        if fields.get(_UNSOLICITED):
            return 0.0
        node = self.node
        buckets = [(self.frame_bucket, 1.0, "frames_per_socket")]
        if msg_type == "event":
            p = fields.get("encrypted_payload")
            size = len(p) if isinstance(p, str) else 0
            buckets += [
                (node.device_events.get((self.user_id, self.device_id)), 1.0, "events_per_device"),
                (node.user_events.get(self.user_id), 1.0, "events_per_user"),
                (node.user_bytes.get(self.user_id), float(size), "bytes_per_user"),
            ]
        worst = 0.0
        for bucket, n, name in buckets:
            wait = bucket.wait_for(n)
            if wait > 0:
                metrics.LIMIT_HITS.labels(limit=name).inc()
                worst = max(worst, wait)
        if worst > 0:
            return worst
        for bucket, n, _ in buckets:
            bucket.take(n)
        return 0.0

    def _handle(self, msg_type: str, fields: Dict[str, Any]) -> None:
        if msg_type == "event":
            self._on_event(fields)
        elif msg_type == "ack":
            self._on_ack(fields)
        elif msg_type == "replay_request":
            self._on_replay(fields)
        elif msg_type == "ping":
            self.conn.send(wire.encode("pong", {"timestamp": self.node.now_ms()}))
        elif msg_type is WS_PING:
            self.conn.send_pong(fields["payload"])
        elif msg_type is WS_PONG:
            self.conn.pong_received()
        else:
            self._unknown_type(msg_type)

    # What differs between protocol versions for rejected input; v1 answers as
    # old clients expect (silence or a "dropped" ack), v2 overrides with errors.

    def _unknown_type(self, msg_type: str) -> None:
        """v1: unknown types after authentication are ignored."""

    def _ignored_frame(self, checked: Any) -> Optional[bytes]:
        """v1: an event of another device, or without a usable device_seq, gets no answer."""
        return None

    def _rejected_frame(self, code: str, reason: str, device_seq: Optional[int], event_id: Optional[str]) -> bytes:
        """v1: a rejected event of the session's own device is acked and dropped."""
        return _dropped_ack(device_seq, event_id)

    # ------------------------------------------------------------ events

    def _on_event(self, fields: Dict[str, Any]) -> None:
        metrics.EVENTS_RECEIVED.inc()
        checked = check_event(fields, self.user_id, self.device_id, self.settings.max_payload_bytes, self.node.now_ms())
        if checked.verdict in (Verdict.NOT_OWNER, Verdict.NO_SEQ):
            metrics.EVENTS_REJECTED.labels(reason=checked.verdict.value).inc()
            frame = self._ignored_frame(checked)
            if frame is not None:
                self._answer_now(frame)
            return
        if checked.verdict is Verdict.INVALID:
            metrics.EVENTS_REJECTED.labels(reason=checked.code).inc()
            log.debug("event rejected: {reason}", reason=checked.reason)  # counted in a metric; a client could flood info
            self._answer_now(self._rejected_frame(checked.code, checked.reason, checked.device_seq, checked.event_id))
            return
        slot = _Slot()
        self.outcomes.append(slot)
        event = checked.event
        assert event is not None
        self.pending_bytes += event.payload_size
        d = self.node.writer.submit(event)
        d.addCallbacks(self._committed, self._commit_failed, callbackArgs=(slot, event), errbackArgs=(slot, event))
        d.addErrback(self._bug)

    def _committed(self, outcome: Outcome, slot: _Slot, event: Any) -> None:
        self.pending_bytes -= event.payload_size
        kind = outcome.kind
        if kind in ("stored", "duplicate"):
            if kind == "stored":
                metrics.EVENTS_STORED.inc()
            else:
                metrics.EVENTS_DUPLICATE.inc()
            slot.frame = wire.encode(
                "ack",
                {"device_seq": event.device_seq, "event_id": event.event_id, "seq": outcome.seq, "stream_seq": outcome.stream_seq},
            )
        elif kind == "no_user":
            slot.done = True
            self.close(4003, "Account deleted")
            return
        else:
            code = "seq_conflict" if kind == "conflict" else "quota_exceeded"
            metrics.EVENTS_REJECTED.labels(reason=code).inc()
            reason = "event_id or device_seq already used" if kind == "conflict" else "stored bytes quota exceeded"
            slot.frame = self._rejected_frame(code, reason, event.device_seq, event.event_id)
        slot.done = True
        self._send_acks()
        self.pump()

    def _answer_now(self, frame: bytes) -> None:
        """An answer decided without storage, sent after the answers before it."""
        slot = _Slot()
        slot.frame = frame
        slot.done = True
        self.outcomes.append(slot)
        self._send_acks()

    def _commit_failed(self, failure: Failure, slot: _Slot, event: Any) -> None:
        self.pending_bytes -= event.payload_size
        failure.trap(StorageUnavailable)
        self.close(1013, "Storage unavailable")

    def _send_acks(self) -> None:
        while self.outcomes and self.outcomes[0].done:
            slot = self.outcomes.popleft()
            if slot.frame is not None and not self.closed:
                self.conn.send(slot.frame)
        if self.final_close is not None and not self.outcomes:
            self.close(*self.final_close)

    # ------------------------------------------------------------ delivery acks

    def _on_ack(self, fields: Dict[str, Any]) -> None:
        d = fields.get("device_seq")
        if type(d) is not int or self.tracker is None:
            return
        if self.tracker.ack(d):
            self._cursor_changed()

    def _cursor_changed(self) -> None:
        assert self.tracker is not None
        self.node.cursors.update(self.user_id, self.device_id, self.tracker.delivered())

    # ------------------------------------------------------------ catch-up

    def _on_replay(self, fields: Dict[str, Any]) -> None:
        limit = fields.get("limit")
        limit = min(max(limit, 1), 1000) if type(limit) is int else 100
        self.page_busy = True
        d = Deferred.fromCoroutine(self._serve_page(limit, bool(fields.get(_UNSOLICITED))))
        d.addErrback(self._page_failed)

    async def _serve_page(self, limit: int, unsolicited: bool) -> None:
        assert self.head is not None and self.tracker is not None
        node = self.node
        now = node.now_ms()
        if self.replay_remaining is None:
            self.replay_remaining = await node.storage.count_backlog(
                self.user_id, self.replay_pos, self.head, self.device_id, now
            )
        events: List[StoredEvent] = []
        more = False
        if self.replay_pos < self.head:
            max_bytes = self.settings.max_message_bytes - 64 * KIB
            events, more = await node.storage.read_page(
                self.user_id, self.replay_pos, self.head, self.device_id, limit, max_bytes, now
            )
        if self.closed:
            return
        if unsolicited and not events:
            self.replay_pos = self.head
            self.tracker.backlog_covered(self.head)
            self._page_done()
            return
        self.replay_pos = events[-1].seq if more else self.head
        payload: Dict[str, Any] = {
            "type": "replay_response",
            "events": [relay_payload(e) for e in events],
            "has_more": more,
            "page_size": len(events),
            "total_events": max(self.replay_remaining, len(events)) if events else 0,
        }
        if more:
            payload["continuation_token"] = "seq:{}".format(self.replay_pos)
        self.replay_remaining = max(0, self.replay_remaining - len(events))
        for e in events:
            self.tracker.sent(e.seq, e.device_seq)
        self.tracker.backlog_covered(self.replay_pos)
        metrics.REPLAY_PAGES.inc()
        metrics.EVENTS_RELAYED.labels(path="replay").inc(len(events))
        self.conn.send(wire.encode("replay_response", payload))
        self._cursor_changed()
        self._page_done()

    def _page_done(self) -> None:
        self.page_busy = False
        self.pump()

    def _page_failed(self, failure: Failure) -> None:
        self.page_busy = False
        if failure.check(StorageUnavailable):
            self.close(1013, "Storage unavailable")
        else:
            self._bug(failure)

    # ------------------------------------------------------------ live relay

    def deliver_live(self, event: StoredEvent, frame: bytes) -> None:
        """The hub routes a committed event of this user (in seq order, no gaps)."""
        if self.closed:
            return
        if self.head is None:
            self.early_live.append((event, frame))
            return
        if event.seq <= self.live_last:
            return  # in the backlog, or already handled
        self.live_seen = max(self.live_seen, event.seq)
        if self.backfilling or self.out_paused:
            return  # read from storage when the buffer drains
        self._send_live(event, frame)

    def _send_live(self, event: StoredEvent, frame: bytes) -> None:
        assert self.tracker is not None
        self.live_last = event.seq
        if event.device_id != self.device_id and not event.expired(self.node.now_ms()):
            self.tracker.sent(event.seq, event.device_seq)
            metrics.EVENTS_RELAYED.labels(path="live").inc()
            self.conn.send(frame)
        self.tracker.live_handled(event.seq)
        self._cursor_changed()

    def outbound_paused(self) -> None:
        """The socket's send buffer passed its limit: stop sending and reading."""
        self.out_paused = True
        self._set_reading(False)

    def outbound_resumed(self) -> None:
        """The send buffer drained: send from storage what was held back, page by page, then go on."""
        if not self.out_paused or self.closed:
            return
        self.out_paused = False
        if self.backfilling:
            return  # the running backfill goes on with its next page
        self.backfilling = True
        d = Deferred.fromCoroutine(self._backfill())
        d.addErrback(self._backfill_failed)

    async def _backfill(self) -> None:
        """Pages of live events missed while paused, each within the outbound bound; stops when paused again."""
        assert self.tracker is not None
        storage = self.node.storage
        s = self.settings
        max_bytes = max(1, min(s.outbound_pause_bytes, s.max_message_bytes - 64 * KIB))
        target = await storage.head(self.user_id)
        while not self.closed and not self.out_paused:
            target = max(target, self.live_seen)
            after = self.live_last
            if after >= target:
                break
            events, more = await storage.read_page(
                self.user_id, after, target, None, BACKFILL_PAGE, max_bytes, self.node.now_ms())
            if self.closed:
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
        if self.closed:
            return
        if self.out_paused:
            return  # resumed later, from where it stopped
        self.pump()

    def _backfill_failed(self, failure: Failure) -> None:
        self.backfilling = False
        self._page_failed(failure)

    def send_notice(self, frame: bytes) -> None:
        """A presence or pairing notice for this device."""
        if not self.closed and self.head is not None:
            self.conn.send(frame)

    # ------------------------------------------------------------ ending

    def expire(self) -> None:
        """Session age reached: stop reading, send pending acks, then close 1001."""
        self.close_after_acks(1001, "Session key rotation required")

    def close_after_acks(self, code: int, reason: str) -> None:
        """Stop reading now; close once every event already read is committed and answered (§9, drain)."""
        if self.closed or self.final_close is not None:
            return
        self.stopped = True
        self.final_close = (code, reason)
        self.inbox.clear()
        self._set_reading(False)
        if not self.outcomes:
            self.close(code, reason)

    def close_for(self, code: int, reason: str, notice: Optional[bytes]) -> None:
        """Closed from outside (revocation, account deletion, drain)."""
        if notice is not None and not self.closed:
            self.conn.send(notice)
        self.close(code, reason)

    def close(self, code: int, reason: str) -> None:
        """Close the socket once."""
        if self.closed:
            return
        self.stopped = True
        self.conn.close(code, reason)  # the gateway counts the close (once)
        self.lost()

    def lost(self) -> None:
        """The socket is gone: write the cursor, release timers."""
        if self.closed:
            return
        self.closed = True
        self.stopped = True
        if self.wake is not None and self.wake.active():
            self.wake.cancel()
        self.wake = None
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
        d = self.node.storage.record_unacked(self.user_id, self.device_id, delivered, low, self.node.now_ms())

        def done(gave_up: bool) -> None:
            if gave_up:
                metrics.DELIVERY_GAVE_UP.inc()
                log.info("event delivered 3 times without an ack; treating it as acknowledged")

        d.addCallbacks(done, lambda f: log.warn("could not record unacked event: {e}", e=f.getErrorMessage()))

    def _bug(self, failure: Failure) -> None:
        log.failure("session bug", failure)
        self.close(1011, "Internal error")


def _dropped_ack(device_seq: Optional[int], event_id: Optional[str]) -> bytes:
    payload: Dict[str, Any] = {"device_seq": device_seq, "dropped": True}
    if isinstance(event_id, str):
        payload["event_id"] = event_id
    return wire.encode("ack", payload)


def _bucket(rate: float, burst: float, now: Any) -> Any:
    from pocketbridge.server.buckets import TokenBucket

    return TokenBucket(rate, burst, now)
