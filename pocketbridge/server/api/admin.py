"""
The admin routes of API.md §3 (bearer ``ADMIN_API_KEY``, §1.3): node
statistics, revoking and un-revoking a device, and draining this node.

Admin paths have no ``/api`` prefix. Without a configured key every route
here answers 404 (the Authenticator decides that).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, Tuple

from twisted.logger import Logger

from pocketbridge.server.cluster.drain import start_drain
from pocketbridge.server.storage.devices import NOT_FOUND
from pocketbridge.protocol.wire import HEX64_RE, is_uuid
from pocketbridge.server.api.devices import revoke as revoke_device
from pocketbridge.server.api.http import Api, ApiError

if TYPE_CHECKING:
    from pocketbridge.server.context import Node

log = Logger()

DEVICE_PATH = "/admin/users/<user_id>/devices/<device_id>"
DEVICE_NAME = "/admin/users/{user_id}/devices/{device_id}"  # the metrics route label


def _ids(user_id: str, device_id: str) -> Tuple[str, str]:
    """The path's ids, lowercased; 400 VALIDATION_ERROR naming the bad one."""
    if not HEX64_RE.match(user_id):
        raise ApiError(400, "VALIDATION_ERROR", "user_id must be 64 hex characters", field="user_id")
    if not is_uuid(device_id):
        raise ApiError(400, "VALIDATION_ERROR", "device_id must be a UUID", field="device_id")
    return user_id.lower(), device_id.lower()


def node_stats(node: Node) -> Dict[str, Any]:
    """This node's line of ``/admin/stats``: open sockets (authenticated or not), devices online here."""
    _, devices_online = node.presence.node_summary()
    return {"node_id": node.node_id, "connections": len(node.connections), "devices_online": devices_online}


def register(api: Api, node: Node) -> None:
    """Add the admin routes to api."""

    @api.route("/admin/stats", ["GET"], auth="admin")
    async def stats(request: Any, caller: Any) -> Tuple[int, Any]:
        events = await node.storage.count_events()
        here = node_stats(node)
        try:
            others = [n for n in await node.presence.node_stats() if n.get("node_id") != node.node_id]
        except Exception as e:  # the shared store is down: this node's line is still true
            log.warn("other nodes' stats unavailable: {error}", error=str(e))
            others = []
        return 200, {"nodes": [here] + sorted(others, key=lambda n: str(n.get("node_id"))), "events_stored": events}

    @api.route(DEVICE_PATH + "/revoke", ["POST"], auth="admin", name=DEVICE_NAME + "/revoke")
    async def revoke(request: Any, caller: Any, user_id: str, device_id: str) -> Tuple[int, Any]:
        user, device = _ids(user_id, device_id)
        # Tombstone first, then close the device's sockets 4003 on every node.
        if await revoke_device(node, user, device, reason="admin") == NOT_FOUND:
            raise ApiError(404, "NOT_FOUND", "No such device")
        log.info("admin revoked a device")
        return 200, {"success": True}

    @api.route(DEVICE_PATH + "/unrevoke", ["POST"], auth="admin", name=DEVICE_NAME + "/unrevoke")
    async def unrevoke(request: Any, caller: Any, user_id: str, device_id: str) -> Tuple[int, Any]:
        user, device = _ids(user_id, device_id)
        if await node.storage.unrevoke_device(user, device) == NOT_FOUND:
            raise ApiError(404, "NOT_FOUND", "No such device")
        log.info("admin un-revoked a device")
        return 200, {"success": True}

    @api.route("/admin/drain", ["POST"], auth="admin")
    async def drain(request: Any, caller: Any) -> Tuple[int, Any]:
        window = node.settings.drain_window
        d = start_drain(node, window)
        d.addErrback(lambda f: log.failure("drain failed", f))
        return 202, {"draining": True, "window_s": int(math.ceil(window))}
