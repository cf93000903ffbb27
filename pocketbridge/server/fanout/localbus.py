"""
The in-process bus of the embedded shape (one node, no Redis): publishing
calls the node's own hub directly, in the same reactor turn.
"""

from __future__ import annotations

import time

from twisted.internet.defer import Deferred, succeed

from pocketbridge.protocol.events import StoredEvent
from pocketbridge.server.fanout.bus import BusReceiver, Control


class LocalBus:
    """A ``Bus`` whose only node is this one."""

    def __init__(self, receiver: BusReceiver) -> None:
        self.receiver = receiver

    def publish_control(self, message: Control) -> None:
        """Apply a control message on every node (here: this one)."""
        self.receiver.on_control(message)

    def publish_event(self, event: StoredEvent) -> None:
        """Announce a committed event to every node (here: this one)."""
        self.receiver.on_event(event.user_id, event.seq, event, time.monotonic())

    def subscribe(self, user_id: str) -> "Deferred[bool]":
        """Nothing to do in-process: listening at once."""
        return succeed(True)

    def unsubscribe(self, user_id: str) -> None:
        """Nothing to do in-process."""

    def healthy(self) -> bool:
        """The in-process bus is always up."""
        return True
