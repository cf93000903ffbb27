"""
``Outbox``: the sending half of a ``Client``, the same in both protocol
versions (PROTOCOL.md §6, §7.1).

It numbers the device's events (``device_seq``, kept across connections and
in the key file), builds each ``event`` message, and pairs every ack that
comes back with the send it answers (``V2Outcomes``; a v2 typed error is
paired there by the strategy). Apart from the Client, so that the Client is
about the connection and this bookkeeping can be read on its own.

Reactor thread only, like the Client.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Protocol

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from pocketbridge.client._util import is_wire_int, uuid7
from pocketbridge.client.connection import ConnectionClosed, RawConnection
from pocketbridge.client.keys import DeviceKeys, Identity
from pocketbridge.client.options import OMIT
from pocketbridge.client.v2 import V2Outcomes

__all__ = ["Outbox", "Sender"]

log = Logger()


class Sender(Protocol):
    """What an ``Outbox`` reads of its Client, at each send (a caller may change these)."""

    reactor: Any
    identity: Identity
    device_id: str
    keys: Optional[DeviceKeys]

    def established_connection(self) -> RawConnection:
        """The connection once ``session_established`` came; ConnectionClosed otherwise."""


class Outbox:
    """
    The ``device_seq`` counter (seeded with ``next_device_seq``) and, per
    connection, the sends still waiting for their ack (``outcomes``) and the
    highest own ``device_seq`` acked (``last_acked_own``).
    """

    def __init__(self, sender: Sender, next_device_seq: int = 1) -> None:
        self._sender = sender
        #: The ``device_seq`` the next send uses unless told otherwise.
        self.next_device_seq = next_device_seq
        self.outcomes = V2Outcomes()
        self.last_acked_own = 0

    def reset(self, last_ack_device_seq: int = 0) -> None:
        """Fresh per-connection state; ``last_ack_device_seq`` is the server's watermark (0 before it is known)."""
        self.outcomes = V2Outcomes()
        self.last_acked_own = last_ack_device_seq

    def established(self, last_ack_device_seq: int) -> None:
        """``session_established`` came: start from the server's watermark, never reuse a seq it has."""
        self.reset(last_ack_device_seq)
        self.next_device_seq = max(self.next_device_seq, last_ack_device_seq + 1)

    def match_ack(self, payload: Dict[str, Any]) -> None:
        """An ack of one of our events (both versions): fire its send, advance ``last_acked_own``."""
        if not self.outcomes.match(payload):
            log.warn("Unmatched ack for device_seq {device_seq!r}", device_seq=payload.get("device_seq"))
        elif is_wire_int(payload.get("device_seq")) and not payload.get("dropped"):
            self.last_acked_own = max(self.last_acked_own, payload["device_seq"])

    def fail_all(self, exc: BaseException) -> None:
        """The connection closed: every send still waiting fails with ``exc``."""
        self.outcomes.fail_all(exc)

    def send(
        self,
        stream_id: str,
        type: str,
        encrypted_payload: str,
        ttl: Optional[int],
        event_id: Optional[str],
        device_seq: Optional[int],
        user_id: Optional[str],
        extra: Optional[Mapping[str, Any]],
        timeout: Optional[float],
    ) -> "Deferred[Dict[str, Any]]":
        """``Client.send_event``: see there."""
        sender = self._sender
        try:
            raw = sender.established_connection()
        except ConnectionClosed as e:
            return fail(e)
        if event_id is None:
            event_id = uuid7(sender.reactor)
        if device_seq is None:
            device_seq = self.next_device_seq
        if is_wire_int(device_seq):
            self.next_device_seq = max(self.next_device_seq, device_seq + 1)
        payload: Dict[str, Any] = {
            "event_id": event_id,
            "user_id": user_id if user_id is not None else sender.identity.user_id,
            "device_id": sender.device_id,
            "device_seq": device_seq,
            "stream_id": stream_id,
            "stream_seq": 0,
            "type": type,
            "encrypted_payload": encrypted_payload,
        }
        if ttl is not None:
            payload["ttl"] = ttl
        for key, value in (extra or {}).items():
            if value is OMIT:
                payload.pop(key, None)
            else:
                payload[key] = value
        keys = sender.keys
        if keys is not None and is_wire_int(device_seq):
            keys.next_device_seq = max(keys.next_device_seq, device_seq + 1)
        try:
            raw.send_json({"type": "event", "payload": payload})
        except ConnectionClosed as e:  # closing under us: fail this send, register nothing
            return fail(e)
        # Registered after the write: an ack cannot arrive before the reactor runs again.
        d = self.outcomes.expect(payload.get("event_id"), payload.get("device_seq"))
        if timeout is not None:
            d.addTimeout(timeout, sender.reactor)
        return d
