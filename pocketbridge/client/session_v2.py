"""
The protocol v2 half of ``Client`` (PROTOCOL.md §5–§9), as a mixin.

After ``session_established`` a v2 server pushes the catch-up itself
(``replay_response`` pages under its flow-control window, then one
``caught_up``), sends live events in strictly increasing ``seq``, answers
every event with an ``ack`` or a typed ``error`` in arrival order, and
expects cumulative ``{"seq": S}`` acks. This mixin turns that into:

- received events deduplicated by ``event_id`` and handed to ``on_event``,
  then acked, then queued for ``next_event`` (an app that stores events in
  ``on_event`` has stored them before the server's cursor moves);
- one cumulative ack after each page and after each live event (or one per
  ``ack_interval`` seconds);
- ``wait_caught_up``/``catch_up``/``replay_request(resume_from=S)``;
- ``last_received_seq`` kept in the ``DeviceKeys`` (if any) for the next
  connection's ``resume_from``.

Everything runs in the reactor thread; the state lives on ``Client``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from pocketbridge.client._util import WaitQueue, is_wire_int
from pocketbridge.client.connection import ConnectionClosed, DecryptFailed, MalformedMessage, RawConnection
from pocketbridge.client.keys import DeviceKeys
from pocketbridge.client.v2 import CatchUp, SeenEvents, V2Outcomes

log = Logger()


class V2ClientMixin:
    """v2 message handling for ``Client``; see the module docstring."""

    if TYPE_CHECKING:  # provided by Client
        reactor: Any
        raw: Optional[RawConnection]
        close_info: Any
        keep_history: bool
        auto_ack: bool
        on_event: Optional[Callable[[Dict[str, Any]], None]]
        on_resync: Optional[Callable[[Dict[str, Any]], None]]
        events_received: List[Dict[str, Any]]
        last_seq: int
        keys: Optional[DeviceKeys]
        keys_path: Optional[str]
        ack_interval: float
        save_interval: float
        errors: List[Dict[str, Any]]
        resync: Optional[Dict[str, Any]]
        expiring: Optional[Dict[str, Any]]
        _seen: SeenEvents
        _catchup: CatchUp
        _acks: V2Outcomes
        _events: WaitQueue[Dict[str, Any]]
        _conn_highest: int
        _conn_acked: int
        _ack_call: Any
        _last_save: float
        _last_acked_own: int

        def _connected(self) -> RawConnection: ...

        def _record_event(self, event: Dict[str, Any]) -> None: ...

    @property
    def last_received_seq(self) -> int:
        """The highest event ``seq`` received, over all connections (v2 ``resume_from``)."""
        return self.last_seq

    # ------------------------------------------------------------ receiving

    def _v2_handle(self, msg_type: Optional[str], payload: Dict[str, Any]) -> None:
        """One decrypted server message after ``session_established``."""
        if msg_type == "event":
            self._v2_receive([payload], page=False)
        elif msg_type == "replay_response":
            events = payload.get("events")
            self._v2_receive([e for e in events if isinstance(e, dict)] if isinstance(events, list) else [], page=True)
        elif msg_type == "caught_up":
            self._v2_caught_up(payload)
        elif msg_type == "ack":
            if not self._acks.match(payload):
                log.warn("Unmatched ack for device_seq {device_seq!r}", device_seq=payload.get("device_seq"))
            elif is_wire_int(payload.get("device_seq")) and not payload.get("dropped"):
                self._last_acked_own = max(self._last_acked_own, payload["device_seq"])
        elif msg_type == "error":
            self.errors.append(payload)
            if not (payload.get("in_reply_to") == "event" and self._acks.match_error(payload)):
                log.warn("Server error {code!r} in reply to {in_reply_to!r}: {message!r}", code=payload.get("code"),
                         in_reply_to=payload.get("in_reply_to"), message=payload.get("message"))
        elif msg_type == "resync_required":
            self.resync = payload
            log.warn("Server asks for a full resync ({reason!r}); events below seq {oldest!r} are gone",
                     reason=payload.get("reason"), oldest=payload.get("oldest_seq"))
            if self.on_resync is not None:
                try:
                    self.on_resync(payload)
                except Exception:
                    log.failure("on_resync callback failed")
        elif msg_type == "session_expiring_soon":
            self.expiring = payload

    def _v2_receive(self, events: List[Dict[str, Any]], page: bool) -> None:
        """Events of a page or one live event: dedupe, hand to ``on_event``, ack, then queue."""
        new: List[Dict[str, Any]] = []
        for event in events:
            seq = event.get("seq")
            if is_wire_int(seq):
                self._conn_highest = max(self._conn_highest, seq)
                self.last_seq = max(self.last_seq, seq)
            if not self._seen.add(event):
                continue  # at-least-once delivery: already handed out
            new.append(event)
            if page:
                self._catchup.events.append(event)
            self._record_event(event)
        if self.auto_ack:
            if page or self.ack_interval <= 0:
                self._v2_flush_ack()
            elif self._ack_call is None:
                self._ack_call = self.reactor.callLater(self.ack_interval, self._v2_flush_ack)
        self._v2_persist()
        if self.keep_history:
            for event in new:
                self._events.put(event)

    def _v2_caught_up(self, payload: Dict[str, Any]) -> None:
        """The end of a catch-up: ack, save, wake waiters, send the next queued replay_request."""
        head = payload.get("seq")
        if not is_wire_int(head):
            log.warn("caught_up without an integer seq")
            head = self._conn_highest
        if self.auto_ack:
            self._v2_flush_ack()
        self._v2_persist(force=True)
        resume_from = self._catchup.caught_up(head)
        if resume_from is not None:
            self._v2_send_replay(resume_from)

    def _v2_malformed(self, exc: MalformedMessage) -> None:
        """A server frame that does not decrypt (or is not JSON) desynchronises the channel: close."""
        reason = "Decrypt failed" if isinstance(exc, DecryptFailed) else "Invalid message format"
        log.warn("Closing: server frame rejected ({reason})", reason=reason)
        if self.raw is not None:
            self.raw.close(1008, reason)

    def _v2_closed(self, exc: ConnectionClosed) -> None:
        """The connection closed: fail catch-up waiters, save ``last_received_seq``."""
        if self._ack_call is not None and self._ack_call.active():
            self._ack_call.cancel()
        self._ack_call = None
        self._catchup.fail_all(exc)
        self._v2_persist(force=True)

    # ------------------------------------------------------------ acks

    def ack_seq(self, seq: int) -> None:
        """Send a cumulative v2 ack: every event up to ``seq`` was received (§7.2)."""
        self._connected().send_json({"type": "ack", "payload": {"seq": seq}})
        if is_wire_int(seq):
            self._conn_acked = max(self._conn_acked, seq)

    def _v2_flush_ack(self) -> None:
        """Ack the highest seq received on this connection, if not acked yet."""
        if self._ack_call is not None and self._ack_call.active():
            self._ack_call.cancel()
        self._ack_call = None
        if self._conn_highest > self._conn_acked:
            try:
                self.ack_seq(self._conn_highest)
            except ConnectionClosed:
                pass  # the next connection resumes from last_received_seq

    # ------------------------------------------------------------ catch-up

    def wait_caught_up(self, timeout: Optional[float] = None) -> "Deferred[int]":
        """
        Fires with the head ``H`` of the ``caught_up`` that ends the running
        catch-up (and any queued ``replay_request``), at once when already
        caught up. Fails with ``ConnectionClosed`` or ``defer.TimeoutError``.
        """
        if self.raw is None or self.raw.close_info is not None:
            info = self.raw.close_info if self.raw is not None else None
            return fail(ConnectionClosed(*(info or (1006, "not connected"))))
        d = self._catchup.wait_idle()
        if timeout is not None:
            d.addTimeout(timeout, self.reactor)
        return d

    def _v2_catch_up(self, timeout: Optional[float]) -> "Deferred[List[Dict[str, Any]]]":
        """``catch_up`` for v2: wait for ``caught_up``, return the page events since the last call."""
        catchup = self._catchup
        d = self.wait_caught_up(timeout)
        return d.addCallback(lambda _: catchup.take_events())

    def _v2_replay_request(self, resume_from: int, timeout: Optional[float]) -> "Deferred[int]":
        """Queue or send ``replay_request {resume_from}``; fires with its ``caught_up`` head."""
        if not is_wire_int(resume_from) or resume_from < 0:
            raise ValueError("resume_from must be an integer >= 0")
        try:
            self._connected()
        except ConnectionClosed as e:
            return fail(e)
        d, send_now = self._catchup.request(resume_from)
        if send_now:
            self._v2_send_replay(resume_from)
        if timeout is not None:
            d.addTimeout(timeout, self.reactor)
        return d

    def _v2_send_replay(self, resume_from: int) -> None:
        """Send the request; the events above ``resume_from`` will be handed out again."""
        self._seen.forget_above(resume_from)
        # The restarted catch-up re-sends events this connection already acked;
        # ack them again as they come, so the server's window reopens.
        self._conn_highest = min(self._conn_highest, resume_from)
        self._conn_acked = min(self._conn_acked, resume_from)
        try:
            self._connected().send_json({"type": "replay_request", "payload": {"resume_from": resume_from}})
        except ConnectionClosed:
            pass  # the close fails the request's Deferred

    # ------------------------------------------------------------ persistence

    def _v2_persist(self, force: bool = False) -> None:
        """
        Copy ``last_received_seq`` into ``keys`` and save the file when
        ``keys_path`` is set: at once with ``force``, else at most every
        ``save_interval`` s (the save is blocking file I/O with fsync).
        """
        keys = self.keys
        if keys is None:
            return
        keys.last_received_seq = max(keys.last_received_seq, self.last_seq)
        if self.keys_path is None:
            return
        now = self.reactor.seconds()
        if not force and now - self._last_save < self.save_interval:
            return
        try:
            keys.save(self.keys_path)
            self._last_save = now
        except OSError as e:
            log.warn("Could not save the device key file: {error}", error=e.strerror or str(e))
