"""
``Client``: the high-level client (PROTOCOL.md §4–§9), protocol v1 or v2.

It runs the handshake over a ``RawConnection`` (``establish.run_handshake``),
then dispatches every server message: acks resolve the Deferred of the event
they belong to (``outbox.Outbox``), events from other devices are recorded
(``inbox.Inbox``: history, ``next_event``, ``wait_for``, ``on_event``) and
(with ``auto_ack``) acknowledged, catch-up pages are collected (§7.3). The
attributes callers read of those parts are forwarded by ``views.ClientViews``.

What differs between the versions is one strategy object chosen at
construction from ``PROTOCOLS`` (see ``strategy.py``):

- v1 (``protocol_v1.ProtocolV1``; ``protocol_version=1``, the default of the
  constructor, for compatibility): acks carry the sender's ``device_seq``;
  pages answer ``replay_request``s.
- v2 (``protocol_v2.ProtocolV2``; ``Client.v2(...)``, ``Client.for_device(...)``
  or ``protocol_version=2``): an encrypted channel with a pinned server key,
  typed errors (``EventRejected``), cumulative ``{seq}`` acks, server-pushed
  catch-up ending in ``caught_up``, and ``resume_from`` on reconnect.

A ``Client`` can ``connect`` again after its connection closed; it keeps its
``device_seq`` counter, history and (v2) received-event ids across connections.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional

from twisted.internet.defer import Deferred, fail, succeed

from pocketbridge.client._util import is_wire_int
from pocketbridge.client.connection import CloseInfo, ConnectionClosed, RawConnection
from pocketbridge.client.establish import run_handshake
from pocketbridge.client.inbox import EventCallback, Inbox
from pocketbridge.client.keys import DeviceKeys, Identity
from pocketbridge.client.options import AUTO, OMIT, ClientOptions, Connector, default_connector
from pocketbridge.client.outbox import Outbox
from pocketbridge.client.protocol_v1 import ProtocolV1
from pocketbridge.client.protocol_v2 import ProtocolV2
from pocketbridge.client.strategy import Host, ProtocolStrategy, ServerReports
from pocketbridge.client.views import ClientViews

__all__ = ["AUTO", "DEFAULT_PROTOCOL_VERSION", "OMIT", "PROTOCOLS", "Client", "ClientOptions"]

#: The protocol version ``Client.for_device`` speaks unless told otherwise.
DEFAULT_PROTOCOL_VERSION = 2

#: The strategy of each protocol version a ``Client`` speaks.
PROTOCOLS: Dict[int, Callable[[Host, ClientOptions], ProtocolStrategy]] = {1: ProtocolV1, 2: ProtocolV2}


class Client(ClientViews):
    """
    A PocketBridge client for one device of ``identity``.

    ``device_id`` defaults to a new uuid4. ``next_device_seq`` seeds the
    counter; after ``connect`` it is at least ``last_ack_device_seq + 1``.
    With ``keep_history=False`` received events are not stored in
    ``events_received``/``messages`` nor queued for ``next_event`` (long-running
    watchers use ``on_event`` instead). Reactor thread only.

    ``protocol_version`` is 1 by default here (existing callers); new code
    uses ``Client.v2`` or ``Client.for_device`` (v2 by default). v2 options:

    - ``keys``/``keys_path``: a ``DeviceKeys`` whose ``server_pins`` and
      ``last_received_seq`` the client reads and updates (and saves to
      ``keys_path`` when given: after a new pin, at each ``caught_up``, at most
      every ``save_interval`` s otherwise, and on close). Without ``keys``
      the pins live in ``server_pins`` for the client's lifetime.
    - ``server_key``: accept exactly this server key (and re-pin it).
    - ``last_received_seq``: the highest event ``seq`` received so far;
      ``resume`` sends it as ``resume_from`` when reconnecting.
    - ``ack_interval`` (s): 0 acks after each page and each live event;
      more coalesces live acks to one per interval.
    - ``on_resync(payload)``: called on ``resync_required`` (§7.3).

    The tuning arguments (``headers`` … ``on_resync``) are kept together in
    ``options`` (a frozen ``ClientOptions``).
    """

    def __init__(
        self,
        reactor: Any,
        url: str,
        identity: Identity,
        device_id: Optional[str] = None,
        device_name: Optional[str] = None,
        device_type: Optional[str] = "cli",
        auto_ack: bool = True,
        flat_hello: bool = False,
        *,
        headers: Optional[Mapping[str, str]] = None,
        server_key: Optional[str] = None,
        next_device_seq: int = 1,
        keep_history: bool = True,
        on_event: Optional[EventCallback] = None,
        handshake_timeout: float = 30.0,
        connector: Optional[Connector] = None,
        handshake_factory: Optional[Callable[["Client"], Any]] = None,
        protocol_version: int = 1,
        keys: Optional[DeviceKeys] = None,
        keys_path: Optional[str] = None,
        last_received_seq: Optional[int] = None,
        resume: bool = True,
        ack_interval: float = 0.0,
        save_interval: float = 2.0,
        on_resync: Optional[Callable[[Dict[str, Any]], None]] = None,
    ) -> None:
        make_protocol = PROTOCOLS.get(protocol_version) if is_wire_int(protocol_version) else None
        if make_protocol is None:
            raise ValueError("protocol_version must be one of {}".format(sorted(PROTOCOLS)))
        self.options = ClientOptions(
            headers=headers, server_key=server_key, flat_hello=flat_hello, handshake_timeout=handshake_timeout,
            connector=connector or default_connector, handshake_factory=handshake_factory, resume=resume,
            ack_interval=ack_interval, save_interval=save_interval, on_resync=on_resync,
        )
        self.reactor = reactor
        self.url = url
        self.identity = identity
        self.device_id = device_id if device_id is not None else str(uuid.uuid4())
        self.device_name = device_name
        self.device_type = device_type
        self.auto_ack = auto_ack
        #: What was received: history, the ``next_event`` queue, ``wait_for``, ``on_event``.
        self.inbox = Inbox(reactor, keep_history, on_event)
        self.keys = keys
        self.keys_path = keys_path
        self.server_pins: Dict[str, str] = keys.server_pins if keys is not None else {}
        if last_received_seq is None:
            last_received_seq = keys.last_received_seq if keys is not None else 0
        #: The highest event ``seq`` received, over all connections.
        self.last_seq = last_received_seq
        self.raw: Optional[RawConnection] = None
        self.session: Optional[Dict[str, Any]] = None
        self.close_info: Optional[CloseInfo] = None
        self.reports = ServerReports()
        #: What was sent: the ``device_seq`` counter and the acks still awaited.
        self.outbox = Outbox(self, next_device_seq)
        self._protocol: ProtocolStrategy = make_protocol(self, self.options)
        self._reset_connection_state()

    @classmethod
    def v2(cls, reactor: Any, url: str, identity: Identity, *args: Any, **kwargs: Any) -> "Client":
        """The same arguments as the constructor, speaking protocol v2."""
        kwargs["protocol_version"] = 2
        return cls(reactor, url, identity, *args, **kwargs)

    @classmethod
    def for_device(
        cls, reactor: Any, url: str, keys: DeviceKeys, *, keys_path: Optional[str] = None,
        protocol_version: int = DEFAULT_PROTOCOL_VERSION, **kwargs: Any,
    ) -> "Client":
        """
        A client for the device in ``keys`` (v2 unless ``protocol_version=1``):
        its identity, device_id, name, type and counters; pins and
        ``last_received_seq`` are kept in ``keys`` and saved to ``keys_path``.
        """
        kwargs.setdefault("next_device_seq", keys.next_device_seq)
        return cls(
            reactor, url, keys.identity, device_id=keys.device_id, device_name=keys.device_name,
            device_type=keys.device_type, keys=keys, keys_path=keys_path, protocol_version=protocol_version,
            **kwargs,
        )

    def _reset_connection_state(self, last_ack_device_seq: int = 0) -> None:
        """Fresh per-connection bookkeeping: ack matching in the outbox, the rest in the strategy."""
        self.outbox.reset(last_ack_device_seq)
        self._protocol.reset(last_ack_device_seq)

    # ------------------------------------------------------------ what the strategy reads

    @property
    def protocol_version(self) -> int:
        """1 or 2, fixed at construction."""
        return self._protocol.version

    # ------------------------------------------------------------ handshake

    def connect(self, resume_from: Any = AUTO) -> "Deferred[Dict[str, Any]]":
        """
        Open the socket and run the handshake; fires with the
        ``session_established`` payload. Fails with ``ConnectionClosed``
        (the server closed, e.g. 1008 or 4029), ``HandshakeError`` (bad
        server_hello, or v2 ``ServerKeyChanged``; the socket is then closed
        1000) or the connect error.

        v2: ``resume_from`` goes into ``client_auth``: ``AUTO`` sends
        ``last_received_seq`` when ``resume`` is on and it is > 0, None sends
        nothing (the server's cursor decides), an integer sends that.
        """
        return Deferred.fromCoroutine(self._connect(self._protocol.resume_point(resume_from)))

    async def _connect(self, resume_from: Optional[int]) -> Dict[str, Any]:
        """Open the socket, run the handshake, start dispatching."""
        if self.raw is not None and self.raw.close_info is None:
            raise RuntimeError("already connected")
        raw = await self.options.connector(self.reactor, self.url, self.options.headers)
        self.raw = raw
        self.session = None
        self.close_info = None
        self._reset_connection_state()
        self.inbox.opened()
        factory = self.options.handshake_factory
        handshake = factory(self) if factory is not None else self._protocol.handshake(resume_from)
        est = await run_handshake(raw, handshake, self.options.handshake_timeout)
        self.session = est
        self.outbox.established(est["last_ack_device_seq"])
        self._protocol.reset(est["last_ack_device_seq"])
        self._protocol.established(handshake)
        raw.set_receiver(self._dispatch, self._protocol.malformed)
        raw.closed.addCallback(self._connection_closed)
        return est

    # ------------------------------------------------------------ receiving

    def _dispatch(self, message: Any) -> None:
        """Handle one server message after authentication: acks here, the rest by the strategy."""
        self.inbox.record_message(message)
        msg_type = message.get("type") if isinstance(message, dict) else None
        payload = message.get("payload") if isinstance(message, dict) else None
        if not isinstance(payload, dict):
            payload = {}
        if msg_type == "ack":
            self.outbox.match_ack(payload)
        else:
            self._protocol.receive(msg_type, payload)
        self.inbox.notify(msg_type, message)

    def record_event(self, event: Dict[str, Any]) -> None:
        """Keep a received event in the history and give it to ``on_event`` (for the strategies)."""
        self.inbox.record_event(event)

    def queue_event(self, event: Dict[str, Any]) -> None:
        """Queue a received event for ``next_event`` when history is kept (for the strategies)."""
        self.inbox.queue_event(event)

    def _connection_closed(self, info: CloseInfo) -> CloseInfo:
        """Fail everything waiting on this connection."""
        self.close_info = info
        exc = ConnectionClosed(*info)
        self._protocol.closed(exc)
        self.outbox.fail_all(exc)
        self.inbox.closed(exc)
        return info

    def next_event(self, timeout: Optional[float] = 5.0) -> "Deferred[Dict[str, Any]]":
        """
        The next received event payload (live or replayed, in receive order).
        Fails with ``defer.TimeoutError`` or, once closed and drained, ``ConnectionClosed``.
        """
        return self.inbox.next_event(timeout)

    def wait_for(self, msg_type: str, timeout: Optional[float] = 5.0, since: Optional[int] = 0) -> "Deferred[Any]":
        """
        The first message of ``msg_type`` in ``messages[since:]``, or the next
        one to arrive. Take ``since=len(c.messages)`` before an action to see
        only what it caused; ``since=None`` only waits for new messages.
        """
        return self.inbox.wait_for(msg_type, timeout, since)

    # ------------------------------------------------------------ sending

    @property
    def next_device_seq(self) -> int:
        """The ``device_seq`` the next ``send_event`` will use."""
        return self.outbox.next_device_seq

    def established_connection(self) -> RawConnection:
        """The open RawConnection once ``session_established`` came, or ConnectionClosed."""
        if self.raw is None or self.session is None:
            raise ConnectionClosed(1006, "not connected")
        if self.raw.close_info is not None:
            raise ConnectionClosed(*self.raw.close_info)
        return self.raw

    def send_raw(self, obj: Any) -> None:
        """Send any JSON value as one message; no ack tracking."""
        if self.raw is None:
            raise ConnectionClosed(1006, "not connected")
        self.raw.send_json(obj)

    def send_event_nowait(
        self,
        stream_id: str,
        type: str,
        encrypted_payload: str,
        ttl: Optional[int] = None,
        event_id: Optional[str] = None,
        device_seq: Optional[int] = None,
        user_id: Optional[str] = None,
        *,
        extra: Optional[Mapping[str, Any]] = None,
        timeout: Optional[float] = None,
    ) -> "Deferred[Dict[str, Any]]":
        """
        Send one event; the Deferred fires with its ack payload (``seq``,
        ``stream_seq``, or v1 ``dropped``) or, v2, fails with
        ``EventRejected(code, message)`` for the typed error that answers it.
        ``extra`` overrides or, with ``OMIT``, removes fields. ``timeout``
        (s) fails it with ``defer.TimeoutError``; a close fails it with
        ``ConnectionClosed``.
        """
        return self.outbox.send(stream_id, type, encrypted_payload, ttl, event_id, device_seq, user_id, extra, timeout)

    #: ``await c.send_event(...)`` reads better; it is the same method.
    send_event = send_event_nowait

    def ack(self, device_seq: int) -> None:
        """
        v1: ack a received event with the SENDER's ``device_seq`` (§7.2).
        v2: the argument is a ``seq``; same as ``ack_seq``.
        """
        self._protocol.ack(device_seq)

    def ack_seq(self, seq: int) -> None:
        """v2: send a cumulative ack: every event up to ``seq`` was received (§7.2). TypeError on v1."""
        self._protocol.ack_seq(seq)

    def replay_request(
        self,
        limit: Optional[int] = 100,
        last_ack_device_seq: Optional[int] = None,
        continuation_token: Optional[str] = None,
        *,
        resume_from: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> "Deferred[Any]":
        """
        v1: send a ``replay_request``; fires with the page that answers it
        (pages answer requests in order; an unsolicited first page is kept in
        ``unsolicited_pages`` and does not count as an answer).

        v2: ``replay_request(resume_from=S)`` asks for everything after ``S``
        again (§7.3); fires with the head ``H`` of the ``caught_up`` that ends
        the restarted catch-up. The ids above ``S`` are forgotten, so those
        events reach ``next_event``/``on_event`` again. Sent once any running
        catch-up has ended (see ``v2.CatchUp``).
        """
        return self._protocol.replay_request(limit, last_ack_device_seq, continuation_token, resume_from, timeout)

    def catch_up(self, limit: int = 100, timeout: Optional[float] = None) -> "Deferred[List[Dict[str, Any]]]":
        """
        Fires with the events replayed on this connection since the last
        ``catch_up`` once the backlog is done; live events are not in the list.
        v1: requests pages (``limit`` each) until one has ``has_more: false``
        (the unsolicited first page included). v2: waits for ``caught_up``
        (the server pushes the pages; ``limit`` is unused).
        """
        return self._protocol.catch_up(limit, timeout)

    def wait_caught_up(self, timeout: Optional[float] = None) -> "Deferred[int]":
        """
        v2: fires with the head ``H`` of the ``caught_up`` that ends the
        running catch-up (and any queued ``replay_request``), at once when
        already caught up. Fails with ``ConnectionClosed`` or
        ``defer.TimeoutError``. TypeError on v1 (it has no ``caught_up``).
        """
        return self._protocol.wait_caught_up(timeout)

    # ------------------------------------------------------------ closing

    def close(self, code: int = 1000, reason: Optional[str] = None) -> "Deferred[CloseInfo]":
        """Close the socket; fires with ``(code, reason)`` once closed."""
        self._protocol.before_close()
        if self.raw is None:
            return succeed((1000, "never connected"))
        return self.raw.close(code, reason)

    @property
    def closed(self) -> "Deferred[CloseInfo]":
        """A new Deferred firing with ``(code, reason)`` when the current connection closes."""
        if self.raw is None:
            return fail(ConnectionClosed(1006, "not connected"))
        return self.raw.closed
