"""
What a v2 session sends (PROTOCOL.md §7.2–§7.3, §8, §12): cumulative
``{seq}`` acks, server-pushed catch-up under a flow-control window, and every
event on the socket in strictly increasing ``seq``.

The outbound side is one ordered stream: ``pos`` is the highest seq handled
(sent, or not due to this device). During catch-up the stream is read from
storage page by page up to H, then ``caught_up``; after that a live event
that follows ``pos`` directly is sent from the bus notification, and anything
else (a gap, a full window, a paused socket) is read from storage later. A
window that stays full without an ack advancing closes the socket 4008.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, List, Optional

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from pocketbridge.protocol import wire
from pocketbridge.protocol.events import StoredEvent, relay_payload
from pocketbridge.server import metrics
from pocketbridge.server.gateway.delivery import page_bytes, replay_page
from pocketbridge.server.gateway.inbound import Host, error_frame


class V2Outbound:
    """
    The outbound stream of one v2 socket under its window.

    Its two queues exist only while they have entries (an empty deque costs
    ~760 bytes, more than the rest of the object): an idle socket holds neither.
    """

    __slots__ = ("host", "settings", "busy", "head", "pos", "catching_up", "known_head", "held", "unacked",
                 "unacked_bytes", "acked", "highest_sent", "delivered", "reading", "generation", "remaining",
                 "last_progress", "slow_timer")

    def __init__(self, host: Host) -> None:
        self.host = host
        self.settings = host.node.settings
        self.busy = False  # a replay_request's restart is reading the head: the inbound queue waits
        self.head: Optional[int] = None  # the catch-up target; None until read
        self.pos = 0
        self.catching_up = True
        self.known_head = 0
        #: Read from storage, waiting for window room (None: none).
        self.held: Optional[Deque[StoredEvent]] = None
        #: [seq, payload bytes] of each event sent and not yet acknowledged, in seq order (None: none).
        self.unacked: Optional[Deque[List[int]]] = None
        self.unacked_bytes = 0
        self.acked = 0
        self.highest_sent = 0
        self.delivered = 0
        self.reading = False
        self.generation = 0  # a restart makes reads of an older catch-up stale
        self.remaining: Optional[int] = None
        self.last_progress = host.node.clock.seconds()
        self.slow_timer: Any = None

    def start(self, head: int, delivered_seq: int, last_device_seq: int,
              resume_from: Optional[int], purged_below: int) -> None:
        """H was read: start the pushed catch-up (live events before H are in it, or read later)."""
        self.delivered = delivered_seq
        self.acked = delivered_seq
        start = delivered_seq if resume_from is None else min(delivered_seq, resume_from)
        self._begin_catch_up(start, head, purged_below)

    def _begin_catch_up(self, start: int, head: int, purged_below: int) -> None:
        self.generation += 1
        self.pos = start
        self.head = head
        self.known_head = max(self.known_head, head)
        self.catching_up = True
        self.remaining = None
        self.held = None
        self.unacked = None
        self.unacked_bytes = 0
        if purged_below and start < purged_below - 1:
            self.host.conn.send(wire.encode("resync_required", {"reason": "retention", "oldest_seq": purged_below}))
        self._push()

    # ------------------------------------------------------------ acks and resume

    def matches_delivery(self, fields: Dict[str, Any]) -> bool:
        seq = fields.get("seq")
        if not self.unacked:
            return False
        return type(seq) is int and seq >= self.unacked[0][0]

    def on_ack(self, fields: Dict[str, Any]) -> None:
        """A cumulative ack: everything sent up to ``seq`` is delivered; the window opens."""
        host = self.host
        seq = fields.get("seq")
        if type(seq) is not int or seq < 0:
            host.conn.send(error_frame("bad_request", "ack needs an integer seq >= 0", "ack"))
            return
        seq = min(seq, self.highest_sent)
        # Events sent again by a resumed catch-up may sit at or below the old
        # ack point: an ack still frees their window room.
        released = False
        while self.unacked and self.unacked[0][0] <= seq:
            _, size = self.unacked.popleft()
            self.unacked_bytes -= size
            released = True
        if not self.unacked:
            self.unacked = None
        if seq <= self.acked and not released:
            return
        self.acked = max(self.acked, seq)
        self.last_progress = host.node.clock.seconds()
        if seq > self.delivered:
            self.delivered = seq
            host.node.cursors.update(host.user_id, host.device_id, seq)
        self._push()

    def on_replay(self, fields: Dict[str, Any]) -> None:
        """``replay_request{resume_from}``: restart the catch-up from there (at most the cursor)."""
        resume = fields.get("resume_from")
        if type(resume) is not int or resume < 0:
            self.host.conn.send(error_frame("bad_request", "resume_from must be an integer >= 0", "replay_request"))
            return
        self.busy = True
        d = Deferred.fromCoroutine(self._restart(resume))
        d.addErrback(self._restart_failed)

    async def _restart(self, resume: int) -> None:
        host = self.host
        head, purged = await host.node.storage.user_state(host.user_id)
        if host.closed:
            return
        self._begin_catch_up(min(self.delivered, resume), head, purged)
        self.busy = False
        host.pump()

    def _restart_failed(self, failure: Failure) -> None:
        self.busy = False
        self.host.failed(failure)

    # ------------------------------------------------------------ the outbound stream

    def _window_open(self, size: int) -> bool:
        if not self.unacked:
            return True
        return (len(self.unacked) < self.settings.v2_window_events
                and self.unacked_bytes + size <= self.settings.v2_window_bytes)

    def _track(self, event: StoredEvent) -> None:
        size = len(event.encrypted_payload)
        if self.unacked is None:
            self.unacked = deque()
        self.unacked.append([event.seq, size])
        self.unacked_bytes += size
        self.highest_sent = max(self.highest_sent, event.seq)
        if len(self.unacked) == 1:
            self.last_progress = self.host.node.clock.seconds()

    def deliver_live(self, event: StoredEvent, frame: bytes) -> None:
        """A committed event of the user: send it now if it continues the stream, else read it later."""
        host = self.host
        if host.closed:
            return
        self.known_head = max(self.known_head, event.seq)
        if self.head is None or self.catching_up or self.reading or self.held or host.out_paused:
            self._push()
            return
        if event.seq != self.pos + 1:
            self._push()
            return
        due = event.device_id != host.device_id and not event.expired(host.node.now_ms())
        if due and not self._window_open(len(event.encrypted_payload)):
            self._push()
            return
        self.pos = event.seq
        if due:
            self._track(event)
            metrics.EVENTS_RELAYED.labels(path="live").inc()
            host.conn.send(frame)

    def resumed(self) -> None:
        """The send buffer drained: go on with the stream, then with the frames read."""
        self._push()
        self.host.pump()

    def _push(self) -> None:
        """Send what the window allows; read more from storage when nothing is held."""
        host = self.host
        if host.closed or self.head is None or host.out_paused:
            return
        while self.held and self._window_open(len(self.held[0].encrypted_payload)):
            event = self.held.popleft()
            self._track(event)
            host.conn.send(wire.encode("event", relay_payload(event)))
            metrics.EVENTS_RELAYED.labels(path="live").inc()
        if not self.held:
            self.held = None
        if self.held or self.reading:
            self._watch_slow()
            return
        target = self.head if self.catching_up else self.known_head
        if self.pos >= target:
            if self.catching_up:
                self.catching_up = False
                host.conn.send(wire.encode("caught_up", {"seq": self.head}))
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
        host = self.host
        node = host.node
        s = self.settings
        room = max(1, s.v2_window_events - len(self.unacked or ()))
        room_bytes = max(1, min(s.v2_window_bytes - self.unacked_bytes, page_bytes(s)))
        now = node.now_ms()
        if self.catching_up and self.remaining is None:
            self.remaining = await node.storage.count_backlog(host.user_id, self.pos, target, host.device_id, now)
        events, more = await node.storage.read_page(
            host.user_id, self.pos, target, host.device_id, min(room, 1000), room_bytes, now)
        self.reading = False
        if host.closed or generation != self.generation:
            self._push()
            return
        new_pos = events[-1].seq if more else target
        if self.catching_up:
            # A page: everything in it fits the window (read with the window's room).
            for e in events:
                self._track(e)
            remaining = self.remaining or 0
            self.remaining = max(0, remaining - len(events))
            self.pos = new_pos
            if events:  # a page holds at least one event; nothing due → just caught_up
                host.conn.send(replay_page(events, more, remaining, new_pos))
        else:
            self.pos = new_pos
            if events:
                if self.held is None:
                    self.held = deque()
                self.held.extend(events)
        self._push()

    def _read_failed(self, failure: Failure) -> None:
        self.reading = False
        self.host.failed(failure)

    def _watch_slow(self) -> None:
        """4008 when events wait and no ack has advanced for ``slow_consumer_timeout``."""
        if self.slow_timer is not None and self.slow_timer.active():
            return
        self.slow_timer = self.host.node.clock.callLater(self.settings.slow_consumer_timeout / 4.0, self._check_slow)

    def _check_slow(self) -> None:
        self.slow_timer = None
        host = self.host
        if host.closed:
            return
        assert self.head is not None  # set before _push scheduled this check, never reset to None
        waiting = bool(self.held) or self.pos < (self.head if self.catching_up else self.known_head)
        if not waiting or not self.unacked:
            return
        if host.node.clock.seconds() - self.last_progress >= self.settings.slow_consumer_timeout:
            metrics.LIMIT_HITS.labels(limit="v2_window").inc()
            host.close(4008, "Slow consumer")
            return
        self._watch_slow()

    # ------------------------------------------------------------ ending

    def lost(self) -> None:
        """The socket is gone: stop watching the window (v2 acks move the cursor as they come)."""
        if self.slow_timer is not None and self.slow_timer.active():
            self.slow_timer.cancel()
