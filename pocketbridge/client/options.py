"""
What a ``Client`` is told once and never changes: its tuning options, and
the markers callers pass to ``connect`` and ``send_event``.

``ClientOptions`` is frozen so that the protocol strategies
(``protocol_v1``, ``protocol_v2``) can be handed one object at construction
and read it without the Client re-declaring each setting for them. What a
caller may change on a live client (``auto_ack``, ``keep_history``,
``on_event``) stays settable on the ``Client`` (the last two are kept by its
``Inbox``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional

from twisted.internet.defer import Deferred

from pocketbridge.client.connection import RawConnection

if TYPE_CHECKING:
    from pocketbridge.client.client import Client

#: Opens the WebSocket: ``(reactor, url, headers)`` → a Deferred RawConnection.
Connector = Callable[[Any, str, Optional[Mapping[str, str]]], "Deferred[RawConnection]"]


def default_connector(reactor: Any, url: str, headers: Optional[Mapping[str, str]]) -> "Deferred[RawConnection]":
    """Open a real WebSocket (the default ``connector``)."""
    return RawConnection.open(reactor, url, headers)


class _Omit:
    """Marker for ``send_event(extra=...)``: remove this field from the event."""

    def __repr__(self) -> str:
        """``OMIT``."""
        return "OMIT"


#: ``send_event(extra={"user_id": OMIT})`` sends the event without ``user_id``.
OMIT = _Omit()


class _Auto:
    """Marker for ``connect(resume_from=AUTO)``."""

    def __repr__(self) -> str:
        """``AUTO``."""
        return "AUTO"


#: ``connect(resume_from=AUTO)``: v2 resumes from ``last_received_seq`` when it is known (> 0).
AUTO = _Auto()


@dataclass(frozen=True)
class ClientOptions:
    """
    The tuning of one ``Client`` (the constructor's keyword arguments of the
    same names; see ``Client``). Times are in seconds.

    - ``headers``: extra HTTP headers of the WebSocket upgrade.
    - ``server_key``: accept exactly this server identity key (hex64); v2 re-pins it.
    - ``flat_hello``: v1 sends ``client_hello``/``client_auth`` without the envelope.
    - ``handshake_timeout``: the longest wait for each handshake message.
    - ``connector``: opens the socket (tests pass an in-memory one).
    - ``handshake_factory(client)``: builds the handshake object instead of the strategy.
    - ``resume``: v2 sends ``last_received_seq`` as ``resume_from`` on ``connect()``.
    - ``ack_interval``: v2; 0 acks after each page and live event, more coalesces live acks.
    - ``save_interval``: v2; the shortest time between two saves of the key file.
    - ``on_resync(payload)``: v2; called on ``resync_required``.
    """

    headers: Optional[Mapping[str, str]] = None
    server_key: Optional[str] = None
    flat_hello: bool = False
    handshake_timeout: float = 30.0
    connector: Connector = default_connector
    handshake_factory: Optional[Callable[["Client"], Any]] = None
    resume: bool = True
    ack_interval: float = 0.0
    save_interval: float = 2.0
    on_resync: Optional[Callable[[Dict[str, Any]], None]] = None
