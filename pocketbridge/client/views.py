"""
``ClientViews``: what a caller reads of a ``Client``, forwarded from the part
that owns it.

A Client is composed of parts (``Inbox``: what was received; ``Outbox``:
what was sent and awaits its ack; ``ServerReports``: what the server said
besides; its protocol strategy). Callers and the strategies read them
through the Client's long-standing attribute names; those forwarding
properties are here, so that ``client.py`` holds what a Client does.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from pocketbridge.client.inbox import EventCallback, Inbox
from pocketbridge.client.outbox import Outbox
from pocketbridge.client.strategy import ServerReports
from pocketbridge.client.v2 import V2Outcomes

__all__ = ["ClientViews"]


class ClientViews:
    """The read side of ``Client`` (its base class); the Client sets the parts in its constructor."""

    inbox: Inbox
    outbox: Outbox
    reports: ServerReports
    #: The highest event ``seq`` received, over all connections.
    last_seq: int

    @property
    def keep_history(self) -> bool:
        """Whether received messages and events are stored and queued (may be changed at any time)."""
        return self.inbox.keep_history

    @keep_history.setter
    def keep_history(self, value: bool) -> None:
        self.inbox.keep_history = value

    @property
    def on_event(self) -> Optional[EventCallback]:
        """Called with each received event payload, history or not (may be changed at any time)."""
        return self.inbox.on_event

    @on_event.setter
    def on_event(self, value: Optional[EventCallback]) -> None:
        self.inbox.on_event = value

    @property
    def messages(self) -> List[Any]:
        """Every message received after authentication, over all connections (when history is kept)."""
        return self.inbox.messages

    @property
    def events_received(self) -> List[Dict[str, Any]]:
        """Every event payload received, live or replayed (when history is kept)."""
        return self.inbox.events_received

    @property
    def outcomes(self) -> V2Outcomes:
        """The sends of this connection still waiting for their ack (or v2 error)."""
        return self.outbox.outcomes

    @property
    def last_acked_own(self) -> int:
        """The highest own ``device_seq`` acked on this connection (at first the server's watermark)."""
        return self.outbox.last_acked_own

    @property
    def last_received_seq(self) -> int:
        """The highest event ``seq`` received, over all connections (v2 ``resume_from``)."""
        return self.last_seq

    @property
    def errors(self) -> List[Dict[str, Any]]:
        """v2: every typed ``error`` the server sent (v1: always empty)."""
        return self.reports.errors

    @property
    def resync(self) -> Optional[Dict[str, Any]]:
        """v2: the last ``resync_required`` payload, if any."""
        return self.reports.resync

    @property
    def expiring(self) -> Optional[Dict[str, Any]]:
        """v2: the last ``session_expiring_soon`` payload, if any."""
        return self.reports.expiring

    @property
    def pin_status(self) -> Optional[str]:
        """v2: how the last handshake trusted the server key ("new", "pinned", "given")."""
        return self.reports.pin_status

    @property
    def unsolicited_pages(self) -> List[Dict[str, Any]]:
        """v1: replay pages that answered no request (the pushed first page)."""
        return self.reports.unsolicited_pages
