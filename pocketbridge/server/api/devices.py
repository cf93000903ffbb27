"""
The devices routes of API.md §3: list, read, rename and revoke a user's
devices, and the live connection and presence views.

Liveness comes from the presence store (PROTOCOL.md §10; in a cluster it is
shared by every node): a device is online while it has at least one
authenticated socket, and ``last_seen`` is then now, else the stored time its
last socket closed. Revocation commits
first, then goes to every node as a ``revoke`` control message, which sends
``device_revoked`` to the device's sockets and closes them 4003; each closing
socket's node then tells the user's other devices that it went offline.
"""

from __future__ import annotations

import unicodedata
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from twisted.logger import Logger

from pocketbridge.server.storage.devices import DeviceState
from pocketbridge.server.storage.devices import ALREADY, NAME_TAKEN, NOT_FOUND, REMOVED, RENAMED, REVOKED
from pocketbridge.protocol.wire import is_uuid
from pocketbridge.server.api.auth import Caller
from pocketbridge.server.api.http import Api, ApiError, body_object, query_arg

if TYPE_CHECKING:
    from pocketbridge.server.context import Node

log = Logger()

MAX_NAME = 50  # code points
# What ECMAScript's String.prototype.trim removes (v1 clients trim this way).
_TRIM = "\t\n\x0b\x0c\r \xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
        "\u2028\u2029\u202f\u205f\u3000\ufeff"
_TRUE = ("1", "true", "yes")
_FALSE = ("", "0", "false", "no")

Body = Tuple[int, Dict[str, Any]]


def valid_device_name(value: Any) -> str:
    """
    The trimmed name when ``value`` is a valid device name (API.md §3: 1–50
    code points, each a letter, a number, U+0020, ``-`` or ``_``); else
    ApiError 400 ``VALIDATION_ERROR`` with field ``device_name``.
    """
    def bad(message: str) -> ApiError:
        return ApiError(400, "VALIDATION_ERROR", message, field="device_name")

    if not isinstance(value, str):
        raise bad("device_name must be a string")
    name = value.strip(_TRIM)
    if not name:
        raise bad("device_name must not be empty")
    if len(name) > MAX_NAME:
        raise bad("device_name must be at most {} characters".format(MAX_NAME))
    for ch in name:
        if ch not in " -_" and unicodedata.category(ch)[0] not in "LN":
            raise bad("device_name may hold only letters, numbers, spaces, '-' and '_'")
    return name


def _device_id(raw: str) -> Optional[str]:
    """The lowercase device id of a path segment, or None when it cannot name a device."""
    return raw.lower() if is_uuid(raw) else None


def _flag(request: Any, name: str) -> bool:
    """A boolean query argument: 1/true/yes or 0/false/no (absent = false)."""
    raw = query_arg(request, name)
    value = (raw or "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ApiError(400, "VALIDATION_ERROR", "{} must be 1 or 0".format(name), field=name)


def _not_found() -> ApiError:
    return ApiError(404, "NOT_FOUND", "Device not found")


async def revoke(node: Node, user_id: str, device_id: str, reason: str = "revoked") -> str:
    """
    Revoke a device of a user (tombstone, then close its sockets on every node
    with ``device_revoked`` and 4003). Fires with ``revoked``, ``already`` or
    ``not_found``. Revoking again re-sends the close, so a socket that raced
    the first revocation is closed too. Shared with the admin routes.
    """
    now = node.now_ms()
    outcome: str = await node.storage.revoke_device(user_id, device_id, now)
    if outcome != NOT_FOUND:
        node.broadcast({"kind": "revoke", "user_id": user_id, "device_id": device_id, "reason": reason,
                        "timestamp": now})
    return outcome


class DeviceRoutes:
    """Handlers of the devices routes; ``node`` supplies storage, presence and the bus."""

    def __init__(self, node: Node) -> None:
        self.node = node

    # ---------------------------------------------------------------- views

    async def _live(self, user_id: str) -> Dict[str, Dict[str, int]]:
        """device_id → {socket: authentication time (ms)} of the user's live sockets, on every node."""
        try:
            live: Dict[str, Dict[str, int]] = await self.node.presence.user_sockets(user_id)
        except Exception as e:  # the presence store (Redis) is unreachable
            log.warn("presence unavailable: {error}", error=str(e))
            raise ApiError(503, "UNAVAILABLE", "Presence is unavailable, try again later") from None
        return live

    @staticmethod
    def _view(d: DeviceState, live: Dict[str, Dict[str, int]], current: Optional[str], now: int,
              with_revoked: bool) -> Dict[str, Any]:
        # A revoked device's sockets are being closed: it is not online any more.
        online = d.revoked_at is None and bool(live.get(d.device_id))
        view: Dict[str, Any] = {
            "device_id": d.device_id,
            "device_name": d.name,
            "device_type": d.type,
            "is_online": online,
            "is_current": d.device_id == current,
            # PROTOCOL.md §10: now while online, else when its last socket closed.
            "last_seen": now if online else d.last_seen,
            "registered_at": d.created_at,
            "created_at": d.created_at,
        }
        if with_revoked:
            view["revoked_at"] = d.revoked_at
        return view

    @staticmethod
    def _ordered(views: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Online first, then last_seen descending (device_id breaks ties, for a stable order)."""
        return sorted(views, key=lambda v: (not v["is_online"], -v["last_seen"], v["device_id"]))

    async def _own_device(self, user_id: str, device_id: Optional[str], include_revoked: bool = False) -> DeviceState:
        """The caller's device, or 404 (unknown, another user's, or revoked unless asked for)."""
        if device_id is None:
            raise _not_found()
        d: Optional[DeviceState] = await self.node.storage.get_device(user_id, device_id)
        if d is None or (d.revoked_at is not None and not include_revoked):
            raise _not_found()
        return d

    # ---------------------------------------------------------------- routes

    async def list_devices(self, request: Any, caller: Caller) -> Body:
        """GET /api/devices."""
        assert caller.user_id is not None
        with_revoked = _flag(request, "include_revoked")
        rows = await self.node.storage.list_devices(caller.user_id, with_revoked)
        live = await self._live(caller.user_id)
        now = self.node.now_ms()
        views = self._ordered([self._view(d, live, caller.device_id, now, with_revoked) for d in rows])
        return 200, {"devices": views, "count": len(views), "is_empty": not views, "user_id": caller.user_id}

    async def get_device(self, request: Any, caller: Caller, device_id: str) -> Body:
        """GET /api/devices/{device_id}."""
        assert caller.user_id is not None
        with_revoked = _flag(request, "include_revoked")
        d = await self._own_device(caller.user_id, _device_id(device_id), with_revoked)
        live = await self._live(caller.user_id)
        return 200, self._view(d, live, caller.device_id, self.node.now_ms(), with_revoked)

    async def rename(self, request: Any, caller: Caller, device_id: str) -> Body:
        """POST /api/devices/{device_id}/rename."""
        assert caller.user_id is not None
        body = body_object(request)
        name = valid_device_name(body.get("device_name"))
        target = _device_id(device_id)
        if target is None:
            raise _not_found()
        outcome = await self.node.storage.rename_device(caller.user_id, target, name)
        if outcome == NAME_TAKEN:
            raise ApiError(409, "CONFLICT", "Another device already has this name")
        if outcome != RENAMED:
            raise _not_found()
        return 200, {"success": True, "device_id": target, "device_name": name}

    async def delete(self, request: Any, caller: Caller, device_id: str) -> Body:
        """DELETE /api/devices/{device_id}: revoke (signed) or soft-remove (legacy X-User-ID)."""
        assert caller.user_id is not None
        target = _device_id(device_id)
        if target is None:
            raise _not_found()
        if caller.method == "legacy":
            return await self._soft_revoke(caller.user_id, target)
        outcome = await revoke(self.node, caller.user_id, target)
        if outcome == NOT_FOUND:
            raise _not_found()
        log.info("device revoked by the user (self: {own}, again: {again})",
                 own=target == caller.device_id, again=outcome == ALREADY)
        message = "Device revoked" if outcome == REVOKED else "Device was already revoked"
        return 200, {"success": True, "message": message}

    async def _soft_revoke(self, user_id: str, device_id: str) -> Body:
        """API.md §1.2: delete the row without a tombstone, close the device's sockets 4003."""
        node = self.node
        outcome = await node.storage.remove_device(user_id, device_id)
        if outcome == NOT_FOUND:
            raise _not_found()
        if outcome == REMOVED:
            node.broadcast({"kind": "revoke", "user_id": user_id, "device_id": device_id, "reason": "removed",
                            "timestamp": node.now_ms()})
            return 200, {"success": True, "message": "Device removed"}
        # A tombstoned device stays revoked: X-User-ID proves nothing, so it
        # must not be able to turn a revocation into a re-registrable device.
        return 200, {"success": True, "message": "Device was already revoked"}

    async def connection_status(self, request: Any, caller: Caller) -> Body:
        """GET /api/connection-status[?deviceId=…]."""
        assert caller.user_id is not None
        wanted = query_arg(request, "deviceId")
        if wanted:
            rows = [await self._own_device(caller.user_id, _device_id(wanted))]
        else:
            rows = await self.node.storage.list_devices(caller.user_id, False)
        live = await self._live(caller.user_id)
        devices = []
        for d in sorted(rows, key=lambda r: r.device_id):
            sockets = live.get(d.device_id) or {}
            devices.append({
                "device_id": d.device_id,
                "connected": bool(sockets),
                "sockets": len(sockets),
                "connected_since": min(sockets.values()) if sockets else None,
            })
        return 200, {"connected": any(x["connected"] for x in devices), "devices": devices}

    async def presence(self, request: Any, caller: Caller) -> Body:
        """GET /api/presence."""
        assert caller.user_id is not None
        rows = await self.node.storage.list_devices(caller.user_id, False)
        live = await self._live(caller.user_id)
        now = self.node.now_ms()
        views = self._ordered([self._view(d, live, caller.device_id, now, False) for d in rows])
        devices = [{k: v[k] for k in ("device_id", "device_name", "is_online", "last_seen")} for v in views]
        return 200, {
            "user_id": caller.user_id,
            "devices": devices,
            "online_count": sum(1 for v in devices if v["is_online"]),
            "total_count": len(devices),
        }


def register(api: Api, node: Node) -> None:
    """Add the devices routes to api."""
    r = DeviceRoutes(node)
    api.route("/api/devices", ["GET"], auth="signed_or_legacy")(r.list_devices)
    api.route("/api/devices/<device_id>", ["GET"], auth="signed", name="/api/devices/{id}")(r.get_device)
    api.route("/api/devices/<device_id>", ["DELETE"], auth="signed_or_legacy",
              name="/api/devices/{id} DELETE")(r.delete)
    api.route("/api/devices/<device_id>/rename", ["POST"], auth="signed_or_legacy",
              name="/api/devices/{id}/rename")(r.rename)
    api.route("/api/connection-status", ["GET"], auth="signed")(r.connection_status)
    api.route("/api/presence", ["GET"], auth="signed")(r.presence)
