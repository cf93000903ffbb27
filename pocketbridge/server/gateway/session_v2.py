"""
A protocol v2 session (PROTOCOL.md §5, §7.2–§7.3, §8, §12): typed errors,
cumulative ``{seq}`` acks, server-pushed catch-up under a flow-control window,
and every event on the socket in strictly increasing ``seq``.

The outbound side is one ordered stream: ``pos`` is the highest seq handled
(sent, or not due to this device). During catch-up the stream is read from
storage page by page up to H, then ``caught_up``; after that a live event
that follows ``pos`` directly is sent from the bus notification, and anything
else (a gap, a full window, a paused socket) is read from storage later.
"""

from __future__ import annotations

from typing import Any, Deque, Dict, List, Optional
from collections import deque

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pocketbridge.server import metrics

from pocketbridge.protocol import wire
from pocketbridge.protocol.events import StoredEvent, relay_payload
from pocketbridge.server.gateway.session import KIB, Session
from pocketbridge.server.storage import StorageUnavailable

log = Logger()


class V2Session(Session):
    """An authenticated v2 socket."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pos = 0
        self.catching_up = True
        self.known_head = 0
        self.held: Deque[StoredEvent] = deque()  # read from storage, waiting for window room
        self.unacked: Deque[List[int]] = deque()  # [seq, payload bytes]
        self.unacked_bytes = 0
        self.acked = 0
        self.highest_sent = 0
        self.delivered = 0
        self.reading = False
        self.generation = 0
        self.remaining: Optional[int] = None
        self.last_progress = self.node.clock.seconds()
        self.slow_timer: Any = None

    # ------------------------------------------------------------ start

    warns_before_expiry = True

    def established(self, head: int, delivered_seq: int, last_device_seq: int,
                    resume_from: Optional[int] = None, purged_below: int = 0) -> None:
        """H was read: start the pushed catch-up."""
        self.head = head
        self.delivered = delivered_seq
        self.acked = delivered_seq
        start = delivered_seq if resume_from is None else min(delivered_seq, resume_from)
        self.early_live = []  # live events before H are in the backlog or read later from storage
        self._begin_catch_up(start, head, purged_below)
        self.pump()

    def _begin_catch_up(self, start: int, head: int, purged_below: int) -> None:
        self.generation += 1
        self.pos = start
        self.head = head
        self.known_head = max(self.known_head, head)
        self.catching_up = True
        self.remaining = None
        self.held.clear()
        self.unacked.clear()
        self.unacked_bytes = 0
        if purged_below and start < purged_below - 1:
            self.conn.send(wire.encode("resync_required", {"reason": "retention", "oldest_seq": purged_below}))
        self._push()

    # ------------------------------------------------------------ errors instead of silence

    def _error(self, code: str, message: str, in_reply_to: str, event_id: Any = None, device_seq: Any = None) -> bytes:
        payload: Dict[str, Any] = {"code": code, "message": message, "in_reply_to": in_reply_to}
        if isinstance(event_id, str):
            payload["event_id"] = event_id
        if type(device_seq) is int:
            payload["device_seq"] = device_seq
        return wire.encode("error", payload)

    def _unknown_type(self, msg_type: str) -> None:
        self.conn.send(self._error("unknown_type", "unknown message type", msg_type[:64]))

    def _ignored_frame(self, checked: Any) -> Optional[bytes]:
        code = "not_owner" if checked.verdict.value == "not_owner" else "invalid_event"
        return self._error(code, checked.reason, "event", checked.event_id, checked.device_seq)

    def _rejected_frame(self, code: str, reason: str, device_seq: Optional[int], event_id: Optional[str]) -> bytes:
        return self._error(code, reason, "event", event_id, device_seq)

    # ------------------------------------------------------------ acks and resume

    def _admit(self, msg_type: str, fields: Dict[str, Any]) -> float:
        if msg_type == "ack" and self.unacked:
            seq = fields.get("seq")
            if type(seq) is int and seq >= self.unacked[0][0]:
                return 0.0  # it acknowledges a delivery: acks come at the delivery rate
        # Any other ack (a repeat, or one matching nothing sent) is a frame like the rest (§12).
        return super()._admit(msg_type, fields)

    def _on_ack(self, fields: Dict[str, Any]) -> None:
        seq = fields.get("seq")
        if type(seq) is not int or seq < 0:
            self.conn.send(self._error("bad_request", "ack needs an integer seq >= 0", "ack"))
            return
        seq = min(seq, self.highest_sent)
        # Events sent again by a resumed catch-up may sit at or below the old
        # ack point: an ack still frees their window room.
        released = False
        while self.unacked and self.unacked[0][0] <= seq:
            _, size = self.unacked.popleft()
            self.unacked_bytes -= size
            released = True
        if seq <= self.acked and not released:
            return
        self.acked = max(self.acked, seq)
        self.last_progress = self.node.clock.seconds()
        if seq > self.delivered:
            self.delivered = seq
            self.node.cursors.update(self.user_id, self.device_id, seq)
        self._push()

    def _on_replay(self, fields: Dict[str, Any]) -> None:
        resume = fields.get("resume_from")
        if type(resume) is not int or resume < 0:
            self.conn.send(self._error("bad_request", "resume_from must be an integer >= 0", "replay_request"))
            return
        self.page_busy = True
        d = Deferred.fromCoroutine(self._restart(resume))
        d.addErrback(self._page_failed)

    async def _restart(self, resume: int) -> None:
        head, purged = await self.node.storage.user_state(self.user_id)
        if self.closed:
            return
        self._begin_catch_up(min(self.delivered, resume), head, purged)
        self._page_done()

    # ------------------------------------------------------------ the outbound stream

    def _window_open(self, size: int) -> bool:
        if not self.unacked:
            return True
        return (len(self.unacked) < self.settings.v2_window_events
                and self.unacked_bytes + size <= self.settings.v2_window_bytes)

    def _track(self, event: StoredEvent) -> None:
        size = len(event.encrypted_payload)
        self.unacked.append([event.seq, size])
        self.unacked_bytes += size
        self.highest_sent = max(self.highest_sent, event.seq)
        if len(self.unacked) == 1:
            self.last_progress = self.node.clock.seconds()

    def deliver_live(self, event: StoredEvent, frame: bytes) -> None:
        """A committed event of the user: send it now if it continues the stream, else read it later."""
        if self.closed:
            return
        self.known_head = max(self.known_head, event.seq)
        if self.head is None or self.catching_up or self.reading or self.held or self.out_paused:
            self._push()
            return
        if event.seq != self.pos + 1:
            self._push()
            return
        due = event.device_id != self.device_id and not event.expired(self.node.now_ms())
        if due and not self._window_open(len(event.encrypted_payload)):
            self._push()
            return
        self.pos = event.seq
        if due:
            self._track(event)
            metrics.EVENTS_RELAYED.labels(path="live").inc()
            self.conn.send(frame)

    def _push(self) -> None:
        """Send what the window allows; read more from storage when nothing is held."""
        if self.closed or self.head is None or self.out_paused:
            return
        while self.held and self._window_open(len(self.held[0].encrypted_payload)):
            event = self.held.popleft()
            self._track(event)
            self.conn.send(wire.encode("event", relay_payload(event)))
            metrics.EVENTS_RELAYED.labels(path="live").inc()
        if self.held or self.reading:
            self._watch_slow()
            return
        target = self.head if self.catching_up else self.known_head
        if self.pos >= target:
            if self.catching_up:
                self.catching_up = False
                self.conn.send(wire.encode("caught_up", {"seq": self.head}))
                if self.known_head > self.pos:
                    self._push()
            return
        if not self._window_open(1):
            self._watch_slow()
            return
        self.reading = True
        d = Deferred.fromCoroutine(self._read(self.generation, target))
        d.addErrback(self._read_failed)

    async def _read(self, generation: int, target: int) -> None:
        node = self.node
        s = self.settings
        room = max(1, s.v2_window_events - len(self.unacked))
        room_bytes = max(1, min(s.v2_window_bytes - self.unacked_bytes, s.max_message_bytes - 64 * KIB))
        now = node.now_ms()
        if self.catching_up and self.remaining is None:
            self.remaining = await node.storage.count_backlog(self.user_id, self.pos, target, self.device_id, now)
        events, more = await node.storage.read_page(
            self.user_id, self.pos, target, self.device_id, min(room, 1000), room_bytes, now)
        self.reading = False
        if self.closed or generation != self.generation:
            self._push()
            return
        new_pos = events[-1].seq if more else target
        if self.catching_up:
            # A page: everything in it fits the window (read with the window's room).
            for e in events:
                self._track(e)
            remaining = self.remaining or 0
            payload: Dict[str, Any] = {
                "type": "replay_response", "events": [relay_payload(e) for e in events],
                "has_more": more, "page_size": len(events), "total_events": max(remaining, len(events)),
            }
            if more:
                payload["continuation_token"] = "seq:{}".format(new_pos)
            self.remaining = max(0, remaining - len(events))
            self.pos = new_pos
            if events:  # a page holds at least one event; nothing due → just caught_up
                metrics.REPLAY_PAGES.inc()
                metrics.EVENTS_RELAYED.labels(path="replay").inc(len(events))
                self.conn.send(wire.encode("replay_response", payload))
        else:
            self.pos = new_pos
            self.held.extend(events)
        self._push()

    def _read_failed(self, failure: Failure) -> None:
        self.reading = False
        if failure.check(StorageUnavailable):
            self.close(1013, "Storage unavailable")
        else:
            self._bug(failure)

    def _watch_slow(self) -> None:
        """4008 when events wait and no ack has advanced for ``slow_consumer_timeout``."""
        if self.slow_timer is not None and self.slow_timer.active():
            return
        self.slow_timer = self.node.clock.callLater(self.settings.slow_consumer_timeout / 4.0, self._check_slow)

    def _check_slow(self) -> None:
        self.slow_timer = None
        if self.closed:
            return
        assert self.head is not None  # set before _push scheduled this check, never reset to None
        waiting = bool(self.held) or self.pos < (self.head if self.catching_up else self.known_head)
        if not waiting or not self.unacked:
            return
        if self.node.clock.seconds() - self.last_progress >= self.settings.slow_consumer_timeout:
            metrics.LIMIT_HITS.labels(limit="v2_window").inc()
            self.close(4008, "Slow consumer")
            return
        self._watch_slow()

    def outbound_resumed(self) -> None:
        if self.out_paused and not self.closed:
            self.out_paused = False
            self._push()
            self.pump()

    def lost(self) -> None:
        if self.slow_timer is not None and self.slow_timer.active():
            self.slow_timer.cancel()
        self.tracker = None  # v2 keeps its own cursor
        super().lost()
