"""
An authenticated connection (PROTOCOL.md §6–§9, §12), for either protocol
version: one inbound path (``inbound.Inbound``), one outbound strategy
(``outbound_v1.V1Outbound`` or ``outbound_v2.V2Outbound``) and the answers
of its version, picked from ``PROFILES`` by the negotiated version.

The session is independent of Autobahn: it talks to its socket through a
small ``Conn`` interface (send, close, pause/resume reading) so tests can drive
it with fakes. What the adapter, admission, the hub and the drain call is
here; the work is in the parts it composes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Optional, Protocol, Tuple

from twisted.logger import Logger
from twisted.python.failure import Failure

from pocketbridge.protocol.events import StoredEvent
from pocketbridge.protocol.wire import ProtocolError
from pocketbridge.server.gateway.inbound import Answers, Conn, Delivery, Host, Inbound, V1Answers, V2Answers
from pocketbridge.server.gateway.outbound_v1 import V1Outbound
from pocketbridge.server.gateway.outbound_v2 import V2Outbound
from pocketbridge.server.storage import StorageUnavailable

if TYPE_CHECKING:
    from pocketbridge.server.context import Node

log = Logger()


class OutboundStrategy(Delivery, Protocol):
    """What a session sends and how acks move its cursor: one per protocol version."""

    def start(self, head: int, delivered_seq: int, last_device_seq: int,
              resume_from: Optional[int], purged_below: int) -> None:
        """H was read: begin the catch-up."""

    def deliver_live(self, event: StoredEvent, frame: bytes) -> None:
        """The hub routes a committed event of the user."""

    def resumed(self) -> None:
        """The socket's send buffer drained after a pause."""

    def lost(self) -> None:
        """The socket is gone."""


@dataclass(frozen=True)
class Profile:
    """What differs between protocol versions, as parts rather than subclasses."""

    version: int
    answers: Answers
    outbound: Callable[[Host], OutboundStrategy]
    #: Whether the gateway sends ``session_expiring_soon`` 5 minutes before expiry (PROTOCOL.md §9).
    warns_before_expiry: bool


#: The profile of each protocol version (PROTOCOL.md §4.1).
PROFILES: Dict[int, Profile] = {
    1: Profile(1, V1Answers(), V1Outbound, warns_before_expiry=False),
    2: Profile(2, V2Answers(), V2Outbound, warns_before_expiry=True),
}


class Session:
    """One authenticated socket of a device."""

    # One per authenticated socket: attributes in slots, no __dict__ each.
    __slots__ = ("node", "conn", "user_id", "device_id", "session_id", "version", "device_name", "device_type",
                 "profile", "joined", "out_paused", "stopped", "closed", "outbound", "inbound")

    def __init__(
        self, node: "Node", conn: Conn, user_id: str, device_id: str, session_id: str, version: int,
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
        self.profile = PROFILES[version]
        self.joined = False  # the head was read (``established``)
        self.out_paused = False
        self.stopped = False  # no more frames are read (expiry, close)
        self.closed = False
        self.outbound = self.profile.outbound(self)
        self.inbound = Inbound(self, self.profile.answers, self.outbound)

    @property
    def warns_before_expiry(self) -> bool:
        return self.profile.warns_before_expiry

    @property
    def inbox(self) -> Deque[Tuple[str, Dict[str, Any]]]:
        """Frames read and not yet handled."""
        return self.inbound.inbox if self.inbound.inbox is not None else deque()

    @property
    def reading_paused(self) -> bool:
        """The session has paused reading its socket (the gateway holds the transport)."""
        return self.inbound.reading_paused

    # ------------------------------------------------------------ start

    def established(self, head: int, delivered_seq: int, last_device_seq: int,
                    resume_from: Optional[int] = None, purged_below: int = 0) -> None:
        """
        H was read: start the catch-up and handle the frames queued meanwhile.
        ``resume_from`` and ``purged_below`` matter to v2 only (v1 pages on request).
        """
        self.joined = True
        self.outbound.start(head, delivered_seq, last_device_seq, resume_from, purged_below)
        self.pump()

    # ------------------------------------------------------------ inbound

    def on_frame(self, msg_type: str, fields: Dict[str, Any]) -> None:
        """A parsed client frame arrived; queue it in arrival order."""
        self.inbound.push(msg_type, fields)

    def pump(self) -> None:
        """Handle queued frames until one must wait; pause the socket while they wait."""
        self.inbound.pump()

    def request(self, msg_type: str, fields: Dict[str, Any]) -> None:
        """The server's own request, handled before the client's queued frames."""
        self.inbound.push_first(msg_type, fields)

    # ------------------------------------------------------------ outbound

    def deliver_live(self, event: StoredEvent, frame: bytes) -> None:
        """The hub routes a committed event of this user (in seq order, no gaps)."""
        self.outbound.deliver_live(event, frame)

    def send_notice(self, frame: bytes) -> None:
        """A presence or pairing notice for this device."""
        if not self.closed and self.joined:
            self.conn.send(frame)

    def outbound_paused(self) -> None:
        """The socket's send buffer passed its limit: stop sending and reading."""
        self.out_paused = True
        self.inbound.set_reading(False)

    def outbound_resumed(self) -> None:
        """The send buffer drained: the outbound side goes on, then the frames read."""
        if not self.out_paused or self.closed:
            return
        self.out_paused = False
        self.outbound.resumed()

    # ------------------------------------------------------------ ending

    def expire(self) -> None:
        """Session age reached: stop reading, send pending acks, then close 1001."""
        self.close_after_acks(1001, "Session key rotation required")

    def close_after_acks(self, code: int, reason: str) -> None:
        """Stop reading now; close once every event already read is committed and answered (§9, drain)."""
        if self.closed:
            return
        self.stopped = True
        self.inbound.close_after_acks(ProtocolError(code, reason))

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
        self.inbound.stop()
        self.outbound.lost()

    def failed(self, failure: Failure) -> None:
        """A storage call failed: 1013 while storage is down; anything else is a bug (1011)."""
        if failure.check(StorageUnavailable):
            self.close(1013, "Storage unavailable")
            return
        log.failure("session bug", failure)
        self.close(1011, "Internal error")
