"""
What the delivery hub and a bus need of each other (ARCHITECTURE.md, the
event path steps 3 and 4).

The hub subscribes through a bus while it holds a socket of a user, and the
bus hands the hub what other nodes (or this one) committed and the cluster's
control messages. Two buses implement ``Bus``: ``LocalBus`` (one process) and
``RedisBus`` (a cluster); ``DeliveryHub`` is the one ``BusReceiver``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Protocol

from twisted.internet.defer import Deferred

from pocketbridge.protocol.events import StoredEvent

#: A control message: a JSON object with a ``kind`` ("revoke", "delete_user",
#: "notice", "resync") that every node applies to its own sockets.
Control = Dict[str, Any]


class Bus(Protocol):
    """Carries committed events and control messages to every node."""

    def publish_event(self, event: StoredEvent) -> None:
        """Announce a committed event (after its commit) to every node, this one included."""

    def publish_control(self, message: Control) -> None:
        """Apply a control message on this node at once and send it to the others."""

    def subscribe(self, user_id: str) -> "Deferred[bool]":
        """Listen for the user's events; fires once nothing published from now on can be missed
        (True), or at once with False while the bus is down (it catches the user up when back)."""

    def unsubscribe(self, user_id: str) -> None:
        """Stop listening for the user's events."""

    def healthy(self) -> bool:
        """Whether the bus carries messages now (``/health``)."""


class BusReceiver(Protocol):
    """What a bus delivers into: the node's delivery hub."""

    def on_event(self, user_id: str, seq: int, event: Optional[StoredEvent], committed_at: float = 0.0) -> None:
        """Event ``seq`` of the user was committed (``event`` None: read it from storage)."""

    def resync_user(self, user_id: str) -> None:
        """Messages for the user may have been missed: read what is new from storage."""

    def on_control(self, message: Control) -> None:
        """Apply a control message on this node."""
