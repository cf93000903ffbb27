"""
The seam between ``Client`` and its protocol version.

A ``Client`` runs what both versions share: the socket, the handshake loop
(``establish``), sending events and matching their acks (``outbox``), the
received-message history, the ``next_event`` queue and ``wait_for``
(``inbox``). Everything that differs between v1
and v2 is one ``ProtocolStrategy`` object, chosen once at construction
(``client.PROTOCOLS``) and kept for the client's life: which handshake, how
received events are acked, how catch-up works, what a malformed frame means.

A strategy sees its client only through ``Host``, so that its unit tests can
drive it with a small fake instead of a socket (tests/test_client_strategies.py).
Reactor thread only, like the Client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol

from twisted.internet.defer import Deferred

from pocketbridge.client.connection import ConnectionClosed, MalformedMessage, RawConnection
from pocketbridge.client.keys import DeviceKeys, Identity
from pocketbridge.client.v2 import V2Outcomes


@dataclass
class ServerReports:
    """
    What the server told a client beyond events and acks, kept for callers
    to read (``Client.errors``, ``.resync`` …). The Client owns it across
    connections; its strategy fills what its version has: v1 only
    ``unsolicited_pages``, v2 the rest.
    """

    #: v2: every typed ``error``, oldest first.
    errors: List[Dict[str, Any]] = field(default_factory=list)
    #: v2: the last ``resync_required`` payload.
    resync: Optional[Dict[str, Any]] = None
    #: v2: the last ``session_expiring_soon`` payload.
    expiring: Optional[Dict[str, Any]] = None
    #: v2: how the last handshake trusted the server key: "new", "pinned" or "given".
    pin_status: Optional[str] = None
    #: v1: replay pages that answered no ``replay_request`` (the pushed first page, or strays).
    unsolicited_pages: List[Dict[str, Any]] = field(default_factory=list)


class Host(Protocol):
    """
    What a strategy may use of its ``Client``: the device, the settings a
    caller may change on a live client, the state both versions share
    across connections (``last_seq``, ``keys``, pins) and four operations.
    """

    reactor: Any
    url: str
    identity: Identity
    device_id: str
    device_name: Optional[str]
    device_type: Optional[str]
    auto_ack: bool
    keep_history: bool
    keys: Optional[DeviceKeys]
    keys_path: Optional[str]
    server_pins: Dict[str, str]
    #: The highest event ``seq`` received, over all connections.
    last_seq: int
    raw: Optional[RawConnection]
    reports: ServerReports

    @property
    def outcomes(self) -> V2Outcomes:
        """The sends of this connection still waiting for their ack or error."""

    @property
    def last_acked_own(self) -> int:
        """The highest own ``device_seq`` the server acked on this connection (or its watermark)."""

    def established_connection(self) -> RawConnection:
        """The connection once ``session_established`` came; ConnectionClosed otherwise."""

    def record_event(self, event: Dict[str, Any]) -> None:
        """Keep a received event in the history and hand it to ``on_event``."""

    def queue_event(self, event: Dict[str, Any]) -> None:
        """Make a received event the next one ``next_event`` returns (when history is kept)."""


class ProtocolStrategy(Protocol):
    """
    One protocol version's half of a ``Client``. The Client calls ``reset``
    at the start of every connection and again with the server's watermark
    once it is established; the strategy owns its per-connection and
    cross-connection state, and writes what callers may read into
    ``host.reports``.
    """

    version: int

    def resume_point(self, resume_from: Any) -> Optional[int]:
        """What ``connect(resume_from=...)`` (``AUTO``, None or an int) sends, resolved now."""

    def handshake(self, resume_from: Optional[int]) -> Any:
        """A new handshake object for one connection (see ``handshake.py``)."""

    def reset(self, last_ack_device_seq: int) -> None:
        """Fresh per-connection state."""

    def established(self, handshake: Any) -> None:
        """The handshake succeeded; the Client dispatches to ``receive`` from now on."""

    def receive(self, msg_type: Optional[str], payload: Dict[str, Any]) -> None:
        """One server message after authentication (acks are matched by the Client before this)."""

    def malformed(self, exc: MalformedMessage) -> None:
        """A server frame after authentication that the codec could not decode."""

    def closed(self, exc: ConnectionClosed) -> None:
        """The connection closed: fail what waits on this version's state."""

    def before_close(self) -> None:
        """The caller closes the connection: send what is still due."""

    def ack(self, number: int) -> None:
        """``Client.ack``: acknowledge a received event (v1 by ``device_seq``, v2 by ``seq``)."""

    def ack_seq(self, seq: int) -> None:
        """``Client.ack_seq``: a cumulative ``seq`` ack (v2 only)."""

    def replay_request(self, limit: Optional[int], last_ack_device_seq: Optional[int],
                       continuation_token: Optional[str], resume_from: Optional[int],
                       timeout: Optional[float]) -> "Deferred[Any]":
        """``Client.replay_request``: ask for events again; see there."""

    def catch_up(self, limit: int, timeout: Optional[float]) -> "Deferred[List[Dict[str, Any]]]":
        """``Client.catch_up``: the events replayed since the last call, once the backlog is done."""

    def wait_caught_up(self, timeout: Optional[float]) -> "Deferred[int]":
        """``Client.wait_caught_up`` (v2 only)."""
