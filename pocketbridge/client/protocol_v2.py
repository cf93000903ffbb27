"""
Protocol v2 for ``Client`` (PROTOCOL.md §5–§9): a ``ProtocolStrategy``.

After ``session_established`` a v2 server pushes the catch-up itself
(``replay_response`` pages under its flow-control window, then one
``caught_up``), sends live events in strictly increasing ``seq``, answers
every event with an ``ack`` or a typed ``error`` in arrival order, and
expects cumulative ``{"seq": S}`` acks. This strategy turns that into:

- received events deduplicated by ``event_id`` and handed to ``on_event``,
  then acked, then queued for ``next_event`` (an app that stores events in
  ``on_event`` has stored them before the server's cursor moves);
- one cumulative ack after each page and after each live event (or one per
  ``ack_interval`` seconds);
- ``wait_caught_up``/``catch_up``/``replay_request(resume_from=S)``;
- ``last_received_seq`` kept in the ``DeviceKeys`` (if any) for the next
  connection's ``resume_from``, and the server pin saved with it.

Everything runs in the reactor thread; the state lives here, the device's
(``last_seq``, ``keys``, pins) on the host ``Client``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from pocketbridge.client._util import is_wire_int
from pocketbridge.client.connection import ConnectionClosed, DecryptFailed, MalformedMessage
from pocketbridge.client.handshake import V2Handshake
from pocketbridge.client.keys import server_address
from pocketbridge.client.options import AUTO, ClientOptions
from pocketbridge.client.strategy import Host
from pocketbridge.client.v2 import CatchUp, SeenEvents

log = Logger()


class ProtocolV2:
    """The v2 half of one ``Client``; see the module docstring."""

    version = 2

    def __init__(self, host: Host, options: ClientOptions) -> None:
        self._host = host
        self._options = options
        self._seen = SeenEvents()  # across connections: a resumed catch-up may repeat events
        self._last_save = 0.0
        self._catchup = CatchUp()
        self._conn_highest = 0  # the highest seq received on this connection
        self._conn_acked = 0  # the highest seq acked on this connection
        self._ack_call: Any = None  # the pending coalesced ack (ack_interval > 0)
        self._reports = host.reports

    # ------------------------------------------------------------ connection

    def resume_point(self, resume_from: Any) -> Optional[int]:
        """``AUTO``: ``last_received_seq`` when ``resume`` is on and it is > 0; else as given."""
        if resume_from is AUTO:
            last = self._host.last_seq
            return last if self._options.resume and last > 0 else None
        given: Optional[int] = resume_from  # None (the server's cursor decides) or the caller's integer
        return given

    def handshake(self, resume_from: Optional[int]) -> V2Handshake:
        """A v2 handshake that checks and updates the host's pins."""
        host = self._host
        return V2Handshake(
            host.identity,
            host.device_id,
            device_name=host.device_name,
            device_type=host.device_type,
            server_key=self._options.server_key,
            pins=host.server_pins,
            server_address=server_address(host.url),
            resume_from=resume_from,
        )

    def reset(self, last_ack_device_seq: int) -> None:
        """A connection starts: a catch-up runs, nothing received or acked on it yet."""
        self._catchup = CatchUp()
        self._conn_highest = 0
        self._conn_acked = 0
        self._cancel_ack_call()

    def established(self, handshake: Any) -> None:
        """Keep how the server key was trusted; a new or given pin is saved at once."""
        status = self._reports.pin_status = getattr(handshake, "pin_status", None)
        if status in ("new", "given"):
            self._persist(force=True)

    def closed(self, exc: ConnectionClosed) -> None:
        """Fail catch-up waiters, save ``last_received_seq``."""
        self._cancel_ack_call()
        self._catchup.fail_all(exc)
        self._persist(force=True)

    def before_close(self) -> None:
        """A coalesced ack still due goes out before the close frame."""
        host = self._host
        if host.auto_ack and host.raw is not None and host.raw.close_info is None:
            self._flush_ack()

    # ------------------------------------------------------------ receiving

    def receive(self, msg_type: Optional[str], payload: Dict[str, Any]) -> None:
        """One decrypted server message after ``session_established``."""
        if msg_type == "event":
            self._receive([payload], page=False)
        elif msg_type == "replay_response":
            events = payload.get("events")
            self._receive([e for e in events if isinstance(e, dict)] if isinstance(events, list) else [], page=True)
        elif msg_type == "caught_up":
            self._caught_up(payload)
        elif msg_type == "error":
            self._reports.errors.append(payload)
            if not (payload.get("in_reply_to") == "event" and self._host.outcomes.match_error(payload)):
                log.warn("Server error {code!r} in reply to {in_reply_to!r}: {message!r}", code=payload.get("code"),
                         in_reply_to=payload.get("in_reply_to"), message=payload.get("message"))
        elif msg_type == "resync_required":
            self._resync_required(payload)
        elif msg_type == "session_expiring_soon":
            self._reports.expiring = payload

    def _receive(self, events: List[Dict[str, Any]], page: bool) -> None:
        """Events of a page or one live event: dedupe, hand to ``on_event``, ack, then queue."""
        host = self._host
        new: List[Dict[str, Any]] = []
        for event in events:
            seq = event.get("seq")
            if is_wire_int(seq):
                self._conn_highest = max(self._conn_highest, seq)
                host.last_seq = max(host.last_seq, seq)
            if not self._seen.add(event):
                continue  # at-least-once delivery: already handed out
            new.append(event)
            if page:
                self._catchup.events.append(event)
            host.record_event(event)
        if host.auto_ack:
            if page or self._options.ack_interval <= 0:
                self._flush_ack()
            elif self._ack_call is None:
                self._ack_call = host.reactor.callLater(self._options.ack_interval, self._flush_ack)
        self._persist()
        for event in new:
            host.queue_event(event)

    def _caught_up(self, payload: Dict[str, Any]) -> None:
        """The end of a catch-up: ack, save, wake waiters, send the next queued replay_request."""
        head = payload.get("seq")
        if not is_wire_int(head):
            log.warn("caught_up without an integer seq")
            head = self._conn_highest
        if self._host.auto_ack:
            self._flush_ack()
        self._persist(force=True)
        resume_from = self._catchup.caught_up(head)
        if resume_from is not None:
            self._send_replay(resume_from)

    def _resync_required(self, payload: Dict[str, Any]) -> None:
        """The server no longer has events this device missed (§7.3): report it."""
        self._reports.resync = payload
        log.warn("Server asks for a full resync ({reason!r}); events below seq {oldest!r} are gone",
                 reason=payload.get("reason"), oldest=payload.get("oldest_seq"))
        on_resync = self._options.on_resync
        if on_resync is not None:
            try:
                on_resync(payload)
            except Exception:
                log.failure("on_resync callback failed")

    def malformed(self, exc: MalformedMessage) -> None:
        """A server frame that does not decrypt (or is not JSON) desynchronises the channel: close."""
        reason = "Decrypt failed" if isinstance(exc, DecryptFailed) else "Invalid message format"
        log.warn("Closing: server frame rejected ({reason})", reason=reason)
        raw = self._host.raw
        if raw is not None:
            raw.close(1008, reason)

    # ------------------------------------------------------------ acks

    def ack(self, number: int) -> None:
        """``Client.ack`` on v2 takes a ``seq``: the same as ``ack_seq``."""
        self.ack_seq(number)

    def ack_seq(self, seq: int) -> None:
        """Send a cumulative v2 ack: every event up to ``seq`` was received (§7.2)."""
        self._host.established_connection().send_json({"type": "ack", "payload": {"seq": seq}})
        if is_wire_int(seq):
            self._conn_acked = max(self._conn_acked, seq)

    def _flush_ack(self) -> None:
        """Ack the highest seq received on this connection, if not acked yet."""
        self._cancel_ack_call()
        if self._conn_highest > self._conn_acked:
            try:
                self.ack_seq(self._conn_highest)
            except ConnectionClosed:
                pass  # the next connection resumes from last_received_seq

    def _cancel_ack_call(self) -> None:
        """Drop the pending coalesced ack, if any."""
        if self._ack_call is not None and self._ack_call.active():
            self._ack_call.cancel()
        self._ack_call = None

    # ------------------------------------------------------------ catch-up

    def wait_caught_up(self, timeout: Optional[float]) -> "Deferred[int]":
        """
        Fires with the head ``H`` of the ``caught_up`` that ends the running
        catch-up (and any queued ``replay_request``), at once when already
        caught up. Fails with ``ConnectionClosed`` or ``defer.TimeoutError``.
        """
        raw = self._host.raw
        if raw is None or raw.close_info is not None:
            info = raw.close_info if raw is not None else None
            return fail(ConnectionClosed(*(info or (1006, "not connected"))))
        d = self._catchup.wait_idle()
        if timeout is not None:
            d.addTimeout(timeout, self._host.reactor)
        return d

    def catch_up(self, limit: int, timeout: Optional[float]) -> "Deferred[List[Dict[str, Any]]]":
        """Wait for ``caught_up``; the page events since the last call (the server pushes; ``limit`` is unused)."""
        catchup = self._catchup
        d = self.wait_caught_up(timeout)
        return d.addCallback(lambda _: catchup.take_events())

    def replay_request(self, limit: Optional[int], last_ack_device_seq: Optional[int],
                       continuation_token: Optional[str], resume_from: Optional[int],
                       timeout: Optional[float]) -> "Deferred[Any]":
        """Queue or send ``replay_request {resume_from}``; fires with its ``caught_up`` head."""
        if resume_from is None:
            raise TypeError("a v2 replay_request needs resume_from")
        if not is_wire_int(resume_from) or resume_from < 0:
            raise ValueError("resume_from must be an integer >= 0")
        try:
            self._host.established_connection()
        except ConnectionClosed as e:
            return fail(e)
        d, send_now = self._catchup.request(resume_from)
        if send_now:
            self._send_replay(resume_from)
        if timeout is not None:
            d.addTimeout(timeout, self._host.reactor)
        return d

    def _send_replay(self, resume_from: int) -> None:
        """Send the request; the events above ``resume_from`` will be handed out again."""
        self._seen.forget_above(resume_from)
        # The restarted catch-up re-sends events this connection already acked;
        # ack them again as they come, so the server's window reopens.
        self._conn_highest = min(self._conn_highest, resume_from)
        self._conn_acked = min(self._conn_acked, resume_from)
        try:
            self._host.established_connection().send_json(
                {"type": "replay_request", "payload": {"resume_from": resume_from}})
        except ConnectionClosed:
            pass  # the close fails the request's Deferred

    # ------------------------------------------------------------ persistence

    def _persist(self, force: bool = False) -> None:
        """
        Copy ``last_received_seq`` into ``keys`` and save the file when
        ``keys_path`` is set: at once with ``force``, else at most every
        ``save_interval`` s (the save is blocking file I/O with fsync).
        """
        host = self._host
        keys = host.keys
        if keys is None:
            return
        keys.last_received_seq = max(keys.last_received_seq, host.last_seq)
        if host.keys_path is None:
            return
        now = host.reactor.seconds()
        if not force and now - self._last_save < self._options.save_interval:
            return
        try:
            keys.save(host.keys_path)
            self._last_save = now
        except OSError as e:
            log.warn("Could not save the device key file: {error}", error=e.strerror or str(e))
