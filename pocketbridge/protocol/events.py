"""
Validation of events uploaded by a device (PROTOCOL.md §6 steps 1, 2 and 4).

``check_event`` is pure: it takes the decoded fields, the session's identity
and the limits, and says what the session must do with the event.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

from pocketbridge.protocol.wire import HEX64_RE, is_uuid

STREAM_RE = re.compile(r"^[A-Za-z0-9:_-]{1,256}\Z")
TYPE_RE = re.compile(r"^[A-Za-z0-9:_-]{1,64}\Z")
B64_RE = re.compile(r"^[A-Za-z0-9+/]+={0,2}\Z")
MAX_DEVICE_SEQ = 2**53 - 1
TTL_GRACE_MS = 300_000
MAX_STORED_INT = 2**63 - 1  # BIGINT / SQLite INTEGER


class Verdict(enum.Enum):
    """What happens to an uploaded event before storage."""

    ACCEPT = "accept"
    NOT_OWNER = "not_owner"  # ignored without an ack
    NO_SEQ = "no_device_seq"  # ignored without an ack (cannot be acked)
    INVALID = "invalid_event"  # v1: acked and dropped


@dataclass(frozen=True)
class NewEvent:
    """A validated event on its way to the writer. Ids are lowercase."""

    user_id: str
    device_id: str
    event_id: str
    device_seq: int
    stream_id: str
    type: str
    encrypted_payload: str
    ttl: Optional[int]

    @property
    def payload_size(self) -> int:
        """Length of the payload text in characters (= bytes: base64 is ASCII)."""
        return len(self.encrypted_payload)


@dataclass(frozen=True)
class Checked:
    """The result of ``check_event``."""

    verdict: Verdict
    reason: str = ""
    event: Optional[NewEvent] = None
    device_seq: Optional[int] = None
    event_id: Optional[str] = None
    payload_size: int = 0
    code: str = "invalid_event"  # the v2 error code of a rejection


def check_event(
    fields: Dict[str, Any],
    session_user: str,
    session_device: str,
    max_payload_bytes: int,
    now_ms: int,
) -> Checked:
    """
    Apply §6 steps 1, 2 and the freshness part of 4 to one event.

    ``session_user``/``session_device`` are lowercase. The quota part of step 4
    needs storage and is done by the writer.
    """
    payload = fields.get("encrypted_payload")
    size = len(payload) if isinstance(payload, str) else 0
    raw_dseq = fields.get("device_seq")
    echo_dseq = raw_dseq if type(raw_dseq) is int and 1 <= raw_dseq <= MAX_DEVICE_SEQ else None
    raw_event_id = fields.get("event_id")
    event_id = raw_event_id.lower() if isinstance(raw_event_id, str) else None

    # 1. ownership
    user = fields.get("user_id")
    if user is not None and user != "":
        if not isinstance(user, str) or user.lower() != session_user:
            return Checked(Verdict.NOT_OWNER, "user_id is not the session user", payload_size=size, event_id=event_id,
                           device_seq=echo_dseq)
    device = fields.get("device_id")
    if not isinstance(device, str) or device.lower() != session_device:
        return Checked(Verdict.NOT_OWNER, "device_id is not the session device", payload_size=size, event_id=event_id,
                       device_seq=echo_dseq)

    # 2. syntax; device_seq first, since without it nothing can be acked
    dseq = fields.get("device_seq")
    if type(dseq) is not int or not 1 <= dseq <= MAX_DEVICE_SEQ:
        return Checked(Verdict.NO_SEQ, "device_seq must be an integer 1..2^53-1", payload_size=size, event_id=event_id)

    def invalid(reason: str, code: str = "invalid_event") -> Checked:
        return Checked(Verdict.INVALID, reason, device_seq=dseq, event_id=event_id, payload_size=size, code=code)

    if not is_uuid(raw_event_id):
        return invalid("event_id must be a UUID")
    if user is not None and user != "" and not (isinstance(user, str) and HEX64_RE.match(user)):
        return invalid("user_id must be hex64")
    if not is_uuid(device):
        return invalid("device_id must be a UUID")
    stream = fields.get("stream_id")
    if not isinstance(stream, str) or not STREAM_RE.match(stream):
        return invalid("stream_id is malformed")
    etype = fields.get("type")
    if not isinstance(etype, str) or not TYPE_RE.match(etype):
        return invalid("type is malformed")
    if not isinstance(payload, str) or not payload:
        return invalid("encrypted_payload missing")
    if len(payload) > max_payload_bytes:
        return invalid("encrypted_payload over max_payload_bytes", "payload_too_large")
    if len(payload) % 4 != 0 or not B64_RE.match(payload):
        return invalid("encrypted_payload is not padded base64")
    ttl = fields.get("ttl")
    if ttl is not None:
        if type(ttl) is not int or not -MAX_STORED_INT <= ttl <= MAX_STORED_INT:
            return invalid("ttl must be an integer")
        # 4. freshness
        if ttl < now_ms - TTL_GRACE_MS:
            return invalid("ttl is in the past")
    assert isinstance(raw_event_id, str)
    return Checked(
        Verdict.ACCEPT,
        device_seq=dseq,
        event_id=raw_event_id.lower(),
        payload_size=size,
        event=NewEvent(
            user_id=session_user,
            device_id=session_device,
            event_id=raw_event_id.lower(),
            device_seq=dseq,
            stream_id=stream,
            type=etype,
            encrypted_payload=payload,
            ttl=ttl,
        ),
    )


def relay_payload(row: "StoredEvent") -> Dict[str, Any]:
    """The E' of PROTOCOL.md §7.1 for a stored event."""
    out: Dict[str, Any] = {
        "event_id": row.event_id,
        "user_id": row.user_id,
        "device_id": row.device_id,
        "device_seq": row.device_seq,
        "stream_id": row.stream_id,
        "stream_seq": row.stream_seq,
        "type": row.type,
        "encrypted_payload": row.encrypted_payload,
        "created_at": row.created_at,
        "seq": row.seq,
    }
    if row.ttl is not None:
        out["ttl"] = row.ttl
    return out


@dataclass(frozen=True)
class StoredEvent:
    """An event as stored: a row of ``events``."""

    user_id: str
    seq: int
    event_id: str
    device_id: str
    device_seq: int
    stream_id: str
    stream_seq: int
    type: str
    encrypted_payload: str
    ttl: Optional[int]
    created_at: int

    def expired(self, now_ms: int) -> bool:
        """True when the event must not be delivered any more (§7.1)."""
        return self.ttl is not None and self.ttl <= now_ms
