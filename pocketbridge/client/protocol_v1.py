"""
Protocol v1 for ``Client`` (PROTOCOL.md §4, §6, §7): a ``ProtocolStrategy``.

After ``session_established`` a v1 server relays events, acks the client's
own events with their ``device_seq``, and answers ``replay_request``s with
pages in order (one page may come unasked first, see ``replay.ReplayPages``).
This strategy acks each received event with the sender's ``device_seq``,
collects pages for ``catch_up`` and ignores undecodable frames (a v1 channel
has no state a bad frame could desynchronise).

v1 has no typed errors, no ``resync_required`` and no server pins: of the
host's ``reports`` it fills only ``unsolicited_pages``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from pocketbridge.client._util import is_wire_int
from pocketbridge.client.connection import ConnectionClosed, MalformedMessage
from pocketbridge.client.handshake import V1Handshake
from pocketbridge.client.options import ClientOptions
from pocketbridge.client.replay import ReplayPages
from pocketbridge.client.strategy import Host

log = Logger()


class ProtocolV1:
    """The v1 half of one ``Client``; see the module docstring."""

    version = 1

    def __init__(self, host: Host, options: ClientOptions) -> None:
        self._host = host
        self._flat = options.flat_hello
        self._server_key = options.server_key
        self._replay = ReplayPages(0)

    # ------------------------------------------------------------ connection

    def resume_point(self, resume_from: Any) -> Optional[int]:
        """v1 has no ``resume_from``: the server's ``device_seq`` watermark decides."""
        return None

    def handshake(self, resume_from: Optional[int]) -> V1Handshake:
        """A v1 handshake for the host's device."""
        host = self._host
        return V1Handshake(host.identity, host.device_id, device_name=host.device_name,
                           device_type=host.device_type, flat=self._flat, server_key=self._server_key)

    def reset(self, last_ack_device_seq: int) -> None:
        """New replay bookkeeping: the watermark decides whether a first page may come unasked."""
        self._replay = ReplayPages(last_ack_device_seq)

    def established(self, handshake: Any) -> None:
        """Nothing to keep from a v1 handshake."""

    def closed(self, exc: ConnectionClosed) -> None:
        """Fail the ``replay_request``s still waiting for their page."""
        self._replay.fail_all(exc)

    def before_close(self) -> None:
        """v1 acks each event as it arrives: nothing is due."""

    # ------------------------------------------------------------ receiving

    def receive(self, msg_type: Optional[str], payload: Dict[str, Any]) -> None:
        """A relayed event or a replay page; anything else stays in the history only."""
        if msg_type == "event":
            self._receive_event(payload)
        elif msg_type == "replay_response":
            if not self._replay.receive(payload, self._receive_event):
                self._host.reports.unsolicited_pages.append(payload)

    def _receive_event(self, event: Dict[str, Any]) -> None:
        """A relayed or replayed event: ack, record, notify."""
        host = self._host
        # Ack first: handing the event to a waiter resumes its coroutine at
        # once, and it may close the socket before an ack sent after that.
        if host.auto_ack and is_wire_int(event.get("device_seq")):
            try:
                self.ack(event["device_seq"])
            except ConnectionClosed:
                pass  # unacked events are sent again on the next connection
        seq = event.get("seq")
        if is_wire_int(seq) and seq > host.last_seq:
            host.last_seq = seq
        host.record_event(event)
        host.queue_event(event)

    def malformed(self, exc: MalformedMessage) -> None:
        """Log and go on: each v1 frame stands alone."""
        log.warn("Ignoring a malformed server frame after authentication")

    # ------------------------------------------------------------ acks and catch-up

    def ack(self, number: int) -> None:
        """Ack a received event with the SENDER's ``device_seq`` (§7.2)."""
        self._host.established_connection().send_json({"type": "ack", "payload": {"device_seq": number}})

    def ack_seq(self, seq: int) -> None:
        """Cumulative ``seq`` acks are v2."""
        raise TypeError("ack_seq is protocol v2; a v1 client acks with ack(device_seq)")

    def wait_caught_up(self, timeout: Optional[float]) -> "Deferred[int]":
        """v1 has no ``caught_up``."""
        raise TypeError("wait_caught_up is protocol v2; a v1 client uses catch_up()")

    def replay_request(self, limit: Optional[int], last_ack_device_seq: Optional[int],
                       continuation_token: Optional[str], resume_from: Optional[int],
                       timeout: Optional[float]) -> "Deferred[Any]":
        """
        Send a ``replay_request``; fires with the page that answers it (pages
        answer requests in order; an unsolicited first page is kept in
        ``unsolicited_pages`` and does not count as an answer).
        ``last_ack_device_seq`` defaults to the highest own event acked.
        """
        host = self._host
        try:
            raw = host.established_connection()
        except ConnectionClosed as e:
            return fail(e)
        payload: Dict[str, Any] = {
            "last_ack_device_seq": host.last_acked_own if last_ack_device_seq is None else last_ack_device_seq
        }
        if limit is not None:
            payload["limit"] = limit
        if continuation_token is not None:
            payload["continuation_token"] = continuation_token
        d = self._replay.expect()
        raw.send_json({"type": "replay_request", "payload": payload})
        if timeout is not None:
            d.addTimeout(timeout, host.reactor)
        return d

    def catch_up(self, limit: int, timeout: Optional[float]) -> "Deferred[List[Dict[str, Any]]]":
        """Request pages (``limit`` each) until one has ``has_more: false``."""
        return Deferred.fromCoroutine(self._catch_up(limit, timeout))

    async def _catch_up(self, limit: int, timeout: Optional[float]) -> List[Dict[str, Any]]:
        """Request pages until ``has_more`` is false; the events replayed since the last call."""
        replay = self._replay
        while True:
            page = await self.replay_request(limit, None, replay.continuation_token, None, timeout)
            if not page.get("has_more"):
                break
        return replay.take_replayed(keep=self._host.keep_history)
