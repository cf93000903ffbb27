"""
The inbound path of a session, one for both protocol versions (PROTOCOL.md
§6, §12): frame and event limits, event validation, the writer, and the
answers in arrival order.

Every client frame goes through one queue, handled strictly in arrival
order; the queue stops (and the socket stops being read) while a rate limit,
a catch-up read, uncommitted bytes or a full outbound buffer says so. What
the protocol versions say differently to rejected input comes from an
``Answers`` object; acks and replay requests go to the session's outbound
strategy (``Delivery``), which also says which acks match a delivery.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Protocol, Tuple

from twisted.logger import Logger
from twisted.python.failure import Failure

from pocketbridge.protocol import wire
from pocketbridge.protocol.events import Checked, NewEvent, Verdict, check_event
from pocketbridge.protocol.wire import ProtocolError
from pocketbridge.server import metrics
from pocketbridge.server.buckets import TokenBucket
from pocketbridge.server.storage import Outcome

if TYPE_CHECKING:
    from pocketbridge.server.context import Node

log = Logger()

# Marks a request the server queues itself (v1's first page to a fresh
# device); a non-string key no client JSON can carry. Such a frame is free.
SERVER_REQUEST: Any = object()
# WebSocket control frames in the inbox: frames like any other for the limits (§12),
# typed by objects no client JSON can carry.
WS_PING: Any = object()
WS_PONG: Any = object()


class Conn(Protocol):
    """The socket side of a session."""

    def send(self, data: bytes) -> None: ...

    def close(self, code: int, reason: str) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def send_pong(self, payload: bytes) -> None: ...

    def pong_received(self) -> None: ...


class Host(Protocol):
    """What the inbound path and the outbound strategies use of their session."""

    node: "Node"
    conn: Conn
    user_id: str
    device_id: str
    joined: bool  # the head was read (``established``)
    stopped: bool  # no more frames are read
    closed: bool
    out_paused: bool  # the socket's send buffer is over its pause size

    def close(self, code: int, reason: str) -> None: ...

    def failed(self, failure: Failure) -> None: ...

    def pump(self) -> None: ...

    def request(self, msg_type: str, fields: Dict[str, Any]) -> None: ...


class Delivery(Protocol):
    """What the inbound path asks of the session's outbound strategy."""

    #: A catch-up read the client asked for runs: later frames wait for it.
    busy: bool

    def matches_delivery(self, fields: Dict[str, Any]) -> bool:
        """True when an ack acknowledges something sent: it comes at the delivery rate, free."""

    def on_ack(self, fields: Dict[str, Any]) -> None: ...

    def on_replay(self, fields: Dict[str, Any]) -> None: ...


class Answers(Protocol):
    """What a protocol version answers to input it does not take."""

    def unknown_type(self, msg_type: str) -> Optional[bytes]:
        """The answer to a frame of a type the session does not handle (None: silence)."""

    def ignored(self, checked: Checked) -> Optional[bytes]:
        """The answer to an event of another device or without a usable device_seq."""

    def rejected(self, code: str, reason: str, device_seq: Optional[int], event_id: Optional[str]) -> bytes:
        """The answer to an event refused before or by storage."""


def error_frame(code: str, message: str, in_reply_to: str, event_id: Any = None, device_seq: Any = None) -> bytes:
    """A v2 ``error`` message (PROTOCOL.md §8)."""
    payload: Dict[str, Any] = {"code": code, "message": message, "in_reply_to": in_reply_to}
    if isinstance(event_id, str):
        payload["event_id"] = event_id
    if type(device_seq) is int:
        payload["device_seq"] = device_seq
    return wire.encode("error", payload)


class V1Answers:
    """v1 answers as old clients expect: silence, or an ack marked dropped."""

    def unknown_type(self, msg_type: str) -> Optional[bytes]:
        return None  # unknown types after authentication are ignored

    def ignored(self, checked: Checked) -> Optional[bytes]:
        return None  # nothing a v1 client could match an answer to

    def rejected(self, code: str, reason: str, device_seq: Optional[int], event_id: Optional[str]) -> bytes:
        payload: Dict[str, Any] = {"device_seq": device_seq, "dropped": True}
        if isinstance(event_id, str):
            payload["event_id"] = event_id
        return wire.encode("ack", payload)


class V2Answers:
    """v2 answers every refusal with a typed ``error``."""

    def unknown_type(self, msg_type: str) -> Optional[bytes]:
        return error_frame("unknown_type", "unknown message type", msg_type[:64])

    def ignored(self, checked: Checked) -> Optional[bytes]:
        code = "not_owner" if checked.verdict is Verdict.NOT_OWNER else "invalid_event"
        return error_frame(code, checked.reason, "event", checked.event_id, checked.device_seq)

    def rejected(self, code: str, reason: str, device_seq: Optional[int], event_id: Optional[str]) -> bytes:
        return error_frame(code, reason, "event", event_id, device_seq)


class _Slot:
    """One event's place in the ack order."""

    __slots__ = ("frame", "done")

    def __init__(self) -> None:
        self.frame: Optional[bytes] = None  # the ack to send; None = nothing to send
        self.done = False


class Inbound:
    """
    The frames one socket reads, handled in arrival order and answered in that order.

    One per authenticated socket, so nothing is held while there is nothing
    to hold: the two queues exist only while they have entries (an empty
    deque costs ~760 bytes) and the frame bucket from the first frame that
    takes a token (a bucket made then is full, as one made at the start
    would be by then).
    """

    __slots__ = ("host", "answers", "delivery", "settings", "inbox", "frame_bucket", "outcomes", "pending_bytes",
                 "reading_paused", "wake", "final_close")

    def __init__(self, host: Host, answers: Answers, delivery: Delivery) -> None:
        self.host = host
        self.answers = answers
        self.delivery = delivery
        self.settings = host.node.settings
        #: Frames read and not yet handled (None: none).
        self.inbox: Optional[Deque[Tuple[str, Dict[str, Any]]]] = None
        self.frame_bucket: Optional[TokenBucket] = None  # frames_per_socket_*, from the first frame it counts
        #: Answers owed, in arrival order (None: none).
        self.outcomes: Optional[Deque[_Slot]] = None
        self.pending_bytes = 0  # payload bytes submitted to the writer and not yet committed
        self.reading_paused = False
        self.wake: Any = None  # the timer of a frame waiting for tokens
        self.final_close: Optional[ProtocolError] = None  # close once the pending acks are out

    # ------------------------------------------------------------ the queue

    def push(self, msg_type: str, fields: Dict[str, Any]) -> None:
        """A parsed client frame arrived; queue it in arrival order."""
        if self.host.stopped:
            return
        self._queue().append((msg_type, fields))
        self.pump()

    def push_first(self, msg_type: str, fields: Dict[str, Any]) -> None:
        """Queue the server's own request ahead of the client's frames; it takes no tokens."""
        fields[SERVER_REQUEST] = True
        self._queue().appendleft((msg_type, fields))

    def _queue(self) -> Deque[Tuple[str, Dict[str, Any]]]:
        """The inbox, made when the first frame waits in it."""
        if self.inbox is None:
            self.inbox = deque()
        return self.inbox

    def _blocked(self) -> bool:
        host = self.host
        return (
            host.stopped or not host.joined or self.delivery.busy or host.out_paused
            or self.pending_bytes > self.settings.pending_bytes_per_socket
        )

    def pump(self) -> None:
        """Handle queued frames until one must wait; pause the socket while they wait."""
        while self.inbox and not self._blocked() and self.wake is None:
            msg_type, fields = self.inbox[0]
            wait = self._admit(msg_type, fields)
            if wait > 0:
                self.wake = self.host.node.clock.callLater(wait, self._woken)
                break
            self.inbox.popleft()
            self._handle(msg_type, fields)
        if not self.inbox:
            self.inbox = None  # dropped once empty (an idle socket holds no deque)
        self.set_reading(self.inbox is None and not self._blocked())

    def _woken(self) -> None:
        self.wake = None
        self.pump()

    def set_reading(self, reading: bool) -> None:
        """Resume or pause reading the socket (once per change)."""
        if self.host.closed:
            return
        if reading and self.reading_paused:
            self.reading_paused = False
            self.host.conn.resume_reading()
        elif not reading and not self.reading_paused:
            self.reading_paused = True
            self.host.conn.pause_reading()

    def _admit(self, msg_type: str, fields: Dict[str, Any]) -> float:
        """Take rate-limit tokens for a frame; return seconds to wait (0 = go)."""
        if msg_type == "ack" and self.delivery.matches_delivery(fields):
            return 0.0  # acks of delivered events come at the delivery rate
        # Any other ack (a repeat, or one matching nothing sent) is a frame like the rest (§12).
        if fields.get(SERVER_REQUEST):
            return 0.0
        node = self.host.node
        host = self.host
        frames = self.frame_bucket
        if frames is None:
            s = self.settings
            frames = self.frame_bucket = TokenBucket(s.frames_per_socket_rate, s.frames_per_socket_burst, node.clock.seconds)
        buckets: List[Tuple[TokenBucket, float, str]] = [(frames, 1.0, "frames_per_socket")]
        if msg_type == "event":
            p = fields.get("encrypted_payload")
            size = len(p) if isinstance(p, str) else 0
            buckets += [
                (node.device_events.get((host.user_id, host.device_id)), 1.0, "events_per_device"),
                (node.user_events.get(host.user_id), 1.0, "events_per_user"),
                (node.user_bytes.get(host.user_id), float(size), "bytes_per_user"),
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
        conn = self.host.conn
        if msg_type == "event":
            self._on_event(fields)
        elif msg_type == "ack":
            self.delivery.on_ack(fields)
        elif msg_type == "replay_request":
            self.delivery.on_replay(fields)
        elif msg_type == "ping":
            conn.send(wire.encode("pong", {"timestamp": self.host.node.now_ms()}))
        elif msg_type is WS_PING:
            conn.send_pong(fields["payload"])
        elif msg_type is WS_PONG:
            conn.pong_received()
        else:
            frame = self.answers.unknown_type(msg_type)
            if frame is not None:
                conn.send(frame)

    # ------------------------------------------------------------ events

    def _on_event(self, fields: Dict[str, Any]) -> None:
        host = self.host
        metrics.EVENTS_RECEIVED.inc()
        checked = check_event(fields, host.user_id, host.device_id, self.settings.max_payload_bytes, host.node.now_ms())
        if checked.verdict in (Verdict.NOT_OWNER, Verdict.NO_SEQ):
            metrics.EVENTS_REJECTED.labels(reason=checked.verdict.value).inc()
            frame = self.answers.ignored(checked)
            if frame is not None:
                self._answer_now(frame)
            return
        if checked.verdict is Verdict.INVALID:
            metrics.EVENTS_REJECTED.labels(reason=checked.code).inc()
            log.debug("event rejected: {reason}", reason=checked.reason)  # counted in a metric; a client could flood info
            self._answer_now(self.answers.rejected(checked.code, checked.reason, checked.device_seq, checked.event_id))
            return
        slot = self._owe()
        event = checked.event
        assert event is not None
        self.pending_bytes += event.payload_size
        d = host.node.writer.submit(event)
        d.addCallbacks(self._committed, self._commit_failed, callbackArgs=(slot, event), errbackArgs=(slot, event))
        d.addErrback(host.failed)

    def _committed(self, outcome: Outcome, slot: _Slot, event: NewEvent) -> None:
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
            self.host.close(4003, "Account deleted")
            return
        else:
            code = "seq_conflict" if kind == "conflict" else "quota_exceeded"
            metrics.EVENTS_REJECTED.labels(reason=code).inc()
            reason = "event_id or device_seq already used" if kind == "conflict" else "stored bytes quota exceeded"
            slot.frame = self.answers.rejected(code, reason, event.device_seq, event.event_id)
        slot.done = True
        self._send_acks()
        self.host.pump()

    def _commit_failed(self, failure: Failure, slot: _Slot, event: NewEvent) -> None:
        self.pending_bytes -= event.payload_size
        self.host.failed(failure)

    def _owe(self) -> _Slot:
        """A new place at the end of the answer order."""
        slot = _Slot()
        if self.outcomes is None:
            self.outcomes = deque()
        self.outcomes.append(slot)
        return slot

    def _answer_now(self, frame: bytes) -> None:
        """An answer decided without storage, sent after the answers before it."""
        slot = self._owe()
        slot.frame = frame
        slot.done = True
        self._send_acks()

    def _send_acks(self) -> None:
        while self.outcomes and self.outcomes[0].done:
            slot = self.outcomes.popleft()
            if slot.frame is not None and not self.host.closed:
                self.host.conn.send(slot.frame)
        if not self.outcomes:
            self.outcomes = None
            if self.final_close is not None:
                self.host.close(self.final_close.code, self.final_close.reason)

    # ------------------------------------------------------------ ending

    def close_after_acks(self, error: ProtocolError) -> None:
        """Read nothing more; close with ``error`` once every event already read is answered."""
        if self.final_close is not None:
            return
        self.final_close = error
        self.inbox = None
        self.set_reading(False)
        if not self.outcomes:
            self.host.close(error.code, error.reason)

    def stop(self) -> None:
        """The socket is gone: release the token timer."""
        if self.wake is not None and self.wake.active():
            self.wake.cancel()
        self.wake = None
