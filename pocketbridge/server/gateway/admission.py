"""
Admission of a WebSocket client (PROTOCOL.md §4, §12): the per-IP limits
at the upgrade, the handshake-failure token, and what a valid ``client_auth``
leads to (the socket's slot claimed in presence under the socket limits,
revocation, the session, registration, ``session_established`` and the
notices).

Not to be confused with ``pocketbridge.server.accept`` (TCP accept and HTTP
deadlines, before any WebSocket exists). The gateway drives this module
through the ``Gate`` it passes in; nothing here touches a socket.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any, Optional, Protocol, Tuple

from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger

from pocketbridge.server import metrics

from pocketbridge.protocol import wire
from pocketbridge.protocol.wire import ProtocolError
from pocketbridge.server.cluster.presence import SOCKETS_PER_DEVICE, SOCKETS_PER_USER, Claim
from pocketbridge.server.gateway.handshake import AuthRequest
from pocketbridge.server.gateway.inbound import Conn
from pocketbridge.server.gateway.session import Session
from pocketbridge.server.storage import DeviceState

if TYPE_CHECKING:
    from pocketbridge.server.context import Node

log = Logger()


def peer_host(address: object) -> str:
    """
    The host of a peer address, or ``"local"`` for an address without one (a
    UNIX-socket peer): all such peers share one key and none is a trusted proxy.
    """
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else "local"


def client_ip(peer_host: str, forwarded_for: Optional[str], trusted: Tuple[str, ...]) -> str:
    """
    The client's address (PROTOCOL.md §12): the peer unless it is a trusted
    proxy; IPv6 by /64, except an IPv4-mapped address (a dual-stack
    listener), which is its IPv4 address (all of them share one /64).
    """
    ip = peer_host
    if forwarded_for and peer_host in trusted:
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        for hop in reversed(hops):
            if hop not in trusted:
                ip = hop
                break
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(str(addr) + "/64", strict=False))
    return ip


class FailureToken:
    """
    The handshake-failure budget of one connection (§12): one token is
    reserved at the upgrade, spent if the client fails the handshake and
    given back otherwise, so concurrent handshakes never overshoot the budget.
    """

    def __init__(self, limits: Any, ip: str, failures_per_minute: int) -> None:
        self.limits = limits
        self.ip = ip
        self.budget: Tuple[float, float] = (failures_per_minute / 60.0, float(failures_per_minute))
        self.held = False

    async def reserve(self) -> float:
        """Take a token; the seconds to wait when none is left (0 when one is held now)."""
        wait: float = await self.limits.take("hs_fail", self.ip, *self.budget)
        self.held = wait <= 0
        return wait

    def spend(self) -> None:
        """The client failed the handshake: the reserved token is spent (or one is charged)."""
        if self.held:
            self.held = False
            return
        self.limits.charge("hs_fail", self.ip, *self.budget).addErrback(
            lambda f: log.warn("could not count a handshake failure: {e}", e=f.getErrorMessage()))

    def give_back(self) -> None:
        """The handshake succeeded or ended without a client failure: refund the token, once."""
        if self.held:
            self.held = False
            self.limits.refund("hs_fail", self.ip, *self.budget).addErrback(
                lambda f: log.warn("could not refund a handshake token: {e}", e=f.getErrorMessage()))


async def check_upgrade(node: "Node", ip: str, token: FailureToken) -> float:
    """
    The per-IP limits, shared by all nodes; run before the upgrade is
    answered. Raises ``ConnectionDeny(429)`` past the connection rate;
    returns the seconds until a handshake-failure token is free (0: one is
    held), in which case the gateway closes 4029 right after the upgrade.
    """
    s = node.settings
    if await node.limits.take("conn_ip", ip, s.conn_per_ip_rate, s.conn_per_ip_burst) > 0:
        metrics.LIMIT_HITS.labels(limit="connections_per_ip").inc()
        raise ConnectionDeny(429, "Too many connections")
    return await token.reserve()


class Gate(Protocol):
    """What admission asks of the connection."""

    def ended(self) -> bool:
        """True once the connection is closing or gone: admission stops."""

    def fail(self, error: ProtocolError, result: str) -> None:
        """A handshake failure the client caused (charged to its budget)."""

    def close(self, error: ProtocolError) -> None:
        """Close without charging the failure budget (limits)."""

    def attached(self, session: Session) -> None:
        """The session takes over the frames (queued ones first)."""

    def established(self, session: Session, frame: bytes, age: float, expires_at: int) -> None:
        """Send ``session_established``; the session is live for ``age`` seconds."""


async def admit(node: "Node", gate: Gate, conn: Conn, auth: AuthRequest, session_id: str) -> None:
    """
    A valid ``client_auth`` arrived: claim the socket's slot (the socket
    limits, counted and reserved in one step before any other work, so
    handshakes running at the same time cannot all pass), subscribe the
    session, then register the device and read the head in ONE storage
    transaction, which also answers whether the device is revoked; attach
    the session to the connection and go live. Stops (without a word) as
    soon as the connection is ending; a session that is not attached in the
    end is detached from the hub again and its slot given back. Storage
    errors propagate (the gateway closes 1013).
    """
    s = node.settings
    claim: Optional[Claim]
    try:
        claim = await node.presence.claim(auth.user_id, auth.device_id, session_id, node.now_ms(),
                                          s.sockets_per_device, s.sockets_per_user)
    except Exception as e:  # presence store down: admit (limits are best effort)
        log.warn("presence unavailable, socket limits not checked: {error}", error=str(e))
        claim = None
    if claim is not None and claim.refused is not None:
        if not gate.ended():
            await _refuse(node, gate, auth, claim.refused)
        return
    session = Session(
        node, conn, auth.user_id, auth.device_id, session_id, auth.protocol_version,
        auth.device_name, auth.device_type,
    )
    # Subscribe first, then read the head (§7.3): whatever commits after the
    # head read reaches this session live (it holds live events until the
    # head is known). ``subscribed`` fires once the bus listens for the user.
    attached = False
    device: Optional[DeviceState] = None
    try:
        if gate.ended():
            return
        await node.hub.attach(session)
        if gate.ended():
            return
        now = node.now_ms()
        device, created, head, purged_below = await node.storage.register_and_read_head(
            auth.user_id, auth.device_id, auth.device_name, auth.device_type, now)
        if gate.ended():
            return
        if device.revoked_at is not None:
            gate.fail(ProtocolError(4003, "Device revoked"), "revoked")
            return
        gate.attached(session)
        attached = True
    finally:
        if not attached:
            session.lost()
            node.hub.detach(session)
            _release(node, auth, session_id, claim, device)
    await _join(node, gate, session, auth, device, created, head, purged_below, now,
                claim is not None and claim.online)


#: The close of a handshake refused by each socket limit (§12).
_REFUSALS = {
    SOCKETS_PER_DEVICE: ProtocolError(4029, "Too many sockets for this device; retry after 30 s"),
    SOCKETS_PER_USER: ProtocolError(4029, "Too many sockets for this user; retry after 30 s"),
}


async def _refuse(node: "Node", gate: Gate, auth: AuthRequest, limit: str) -> None:
    """
    A socket limit is reached. A revoked device is still told 4003, not 4029
    (§12): only this refused handshake pays a device read of its own.
    """
    device = await node.storage.get_device(auth.user_id, auth.device_id)
    if gate.ended():
        return
    if device is not None and device.revoked_at is not None:
        gate.fail(ProtocolError(4003, "Device revoked"), "revoked")
        return
    metrics.LIMIT_HITS.labels(limit=limit).inc()
    metrics.HANDSHAKES.labels(result="limited").inc()
    gate.close(_REFUSALS[limit])


def _release(node: "Node", auth: AuthRequest, session_id: str, claim: Optional[Claim],
             device: Optional[DeviceState]) -> None:
    """
    Admission ended without attaching: give the slot back. A handshake that
    was the device's only socket leaves no trace (no notice, no ``last_seen``
    write). With another socket of the device about, the claim's answer was
    given relative to it, so what it left unsaid is said here: this claim
    came online and the other one stays (its claim was told the device was
    online already) — online; this claim did not come online and the
    release leaves no socket (the one that did has closed, its close saw
    this slot) — offline, as ``depart`` would. A revoked device: nothing,
    the revocation tells the others. No claim (presence down): only the
    release.
    """
    d = node.presence.remove(auth.user_id, auth.device_id, session_id)
    if claim is not None and (device is None or device.revoked_at is None):
        d.addCallback(_released, node, auth, claim.online, device)
    d.addErrback(lambda f: log.warn("presence update failed: {e}", e=f.getErrorMessage()))


def _released(offline: bool, node: "Node", auth: AuthRequest, came_online: bool,
              device: Optional[DeviceState]) -> None:
    if came_online == offline:
        return
    # The stored name and type when registration answered, else this handshake's.
    name, dtype = (device.name, device.type) if device is not None else (auth.device_name, auth.device_type)
    if came_online:
        node.announce_presence(auth.user_id, auth.device_id, name, dtype, True, node.now_ms())
    else:
        _went_offline(node, auth.user_id, auth.device_id, name, dtype)


async def _join(node: "Node", gate: Gate, session: Session, auth: AuthRequest, device: DeviceState,
                created: bool, head: int, purged_below: int, now: int, online: bool) -> None:
    """
    The attached session: ``session_established``, notices (``online``: its
    claim made the device come online), then the catch-up.
    """
    # Name and type are those stored at registration (§4.4), not this handshake's.
    session.device_name, session.device_type = device.name, device.type
    if gate.ended():
        return
    node.hub.known_head(auth.user_id, head)
    age = node.settings.session_max_age * (1.0 - node.rng.uniform(0.0, 0.05))
    expires_at = now + int(age * 1000)
    gate.established(session, wire.encode("session_established", {
        "type": "session_established",
        "device_id": auth.device_id,
        "last_ack_device_seq": device.last_device_seq,
        "expires_at": expires_at,
        "session_id": session.session_id,
        "protocol_version": auth.protocol_version,
        "server_time": node.now_ms(),
    }), age, expires_at)
    log.debug("session {session_id} established (v{version}, new device: {created})",
              session_id=session.session_id, version=auth.protocol_version, created=created)
    if online:
        node.announce_presence(auth.user_id, auth.device_id, device.name, device.type, True, now)
    if created:
        node.notify(auth.user_id, "device_paired", {
            "type": "device_paired", "device_id": auth.device_id, "device_name": device.name,
            "device_type": device.type, "timestamp": now,
        }, exclude_device=auth.device_id)
    # The cursor this node has not written yet counts too: a socket that
    # reconnects within the flush interval starts where the last one ended.
    delivered = max(device.delivered_seq, node.cursors.pending(auth.user_id, auth.device_id))
    session.established(head, delivered, device.last_device_seq, auth.resume_from, purged_below)


def depart(node: "Node", session: Session, session_id: str) -> None:
    """
    The connection of an attached session is gone: its cursor goes to the
    cursor book, written with every other socket that ends within
    ``CursorBook.close_delay`` in one transaction; routing to it stops; when
    it was the device's last socket its ``last_seen`` joins that write and the
    other devices are told it went offline after it. No storage transaction
    of its own.
    """
    session.lost()
    node.hub.detach(session)
    node.cursors.closed()
    d = node.presence.remove(session.user_id, session.device_id, session_id)
    d.addCallback(_removed, node, session)
    d.addErrback(lambda f: log.warn("presence update failed: {e}", e=f.getErrorMessage()))


def _removed(offline: bool, node: "Node", session: Session) -> None:
    if offline:
        _went_offline(node, session.user_id, session.device_id, session.device_name, session.device_type)


def _went_offline(node: "Node", user_id: str, device_id: str, name: Optional[str], dtype: str) -> None:
    """The device's last socket closed."""
    now = node.now_ms()
    # last_seen is written first (in the batched write after the close), then
    # the other devices are told: a REST read after the notice sees it.
    d = node.cursors.went_offline(user_id, device_id, now)
    d.addCallback(lambda _: node.announce_presence(user_id, device_id, name, dtype, False, now))
