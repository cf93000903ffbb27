"""
REST authentication (API.md §1): PB-Ed25519 signed requests, the legacy
``X-User-ID`` header of old web clients, and the admin bearer key.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from pocketbridge.protocol import crypto

from pocketbridge.server import metrics
from pocketbridge.protocol.crypto import signed_message
from pocketbridge.server.storage.replay import StorageReplayCache
from pocketbridge.protocol.wire import HEX64_RE, HEX128_RE, is_uuid
from pocketbridge.server.api.http import ApiError

if TYPE_CHECKING:
    from pocketbridge.server.context import Node

PARAM_RE = re.compile(r"^\s*([a-z]+)=([^,\s]*)\s*\Z")
TS_RE = re.compile(r"^[0-9]{1,16}\Z")


@dataclass(frozen=True)
class Caller:
    """Who made a request: ``method`` is ``signed``, ``legacy``, ``admin`` or ``none``."""

    method: str
    user_id: Optional[str] = None
    device_id: Optional[str] = None


ANONYMOUS = Caller("none")
ADMIN = Caller("admin")


def parse_authorization(value: str) -> Optional[Dict[str, str]]:
    """The parameters of a ``PB-Ed25519`` header, or None when it is not well formed."""
    if not value.startswith("PB-Ed25519 "):
        return None
    params: Dict[str, str] = {}
    for part in value[len("PB-Ed25519 "):].split(","):
        m = PARAM_RE.match(part)
        if not m or m.group(1) in params:
            return None
        params[m.group(1)] = m.group(2)
    if set(params) != {"user", "device", "ts", "sig"}:
        return None
    if not HEX64_RE.match(params["user"]) or not is_uuid(params["device"]):
        return None
    if not TS_RE.match(params["ts"]) or not HEX128_RE.match(params["sig"]):
        return None
    return params


class Authenticator:
    """Decides who a request is from, by the route's auth mode."""

    def __init__(self, node: Node) -> None:
        self.node = node
        # The replay cache: in Redis when there is one (shared by all nodes of a
        # cluster), else in storage, so that a restart does not forget it.
        self.replay = node.limits if node.settings.redis else StorageReplayCache(node.storage)

    async def authenticate(self, request: Any, mode: str) -> Caller:
        """The caller, or ApiError 401/403/404 by API.md §1."""
        if mode == "none":
            return ANONYMOUS
        if mode == "admin":
            return self._admin(request)
        header = request.getHeader(b"authorization")
        if header is not None and header.startswith(b"PB-Ed25519"):
            return await self._signed(request, header.decode("latin-1"))
        if mode == "signed_or_legacy" and self.node.settings.legacy_clients:
            legacy = request.getHeader(b"x-user-id")
            if legacy is not None:
                user = legacy.decode("latin-1").strip()
                if not HEX64_RE.match(user):
                    raise ApiError(401, "AUTH_REQUIRED", "X-User-ID must be a hex64 user id")
                dev = request.getHeader(b"x-device-id")
                dev_s = dev.decode("latin-1").strip().lower() if dev else None
                return Caller("legacy", user.lower(), dev_s if is_uuid(dev_s) else None)
        raise ApiError(401, "AUTH_REQUIRED", "Authentication required")

    def _admin(self, request: Any) -> Caller:
        key = self.node.settings.admin_api_key
        if not key:
            raise ApiError(404, "NOT_FOUND", "Not found")
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer":
            given = b""
        if not hmac.compare_digest(given, key.encode("utf-8")):
            raise ApiError(401, "ADMIN_AUTH_REQUIRED", "Admin key missing or wrong")
        return ADMIN

    async def _signed(self, request: Any, header: str) -> Caller:
        def invalid(why: str) -> ApiError:
            metrics.REST_AUTH_FAILURES.labels(reason=why).inc()
            return ApiError(401, "AUTH_INVALID", "Invalid request signature")

        params = parse_authorization(header)
        if params is None:
            raise invalid("parse")
        now = self.node.now_ms()
        ts = int(params["ts"])
        window_ms = int(self.node.settings.auth_window * 1000)
        if abs(now - ts) > window_ms:
            raise invalid("window")
        request.content.seek(0)
        body = request.content.read()
        message = signed_message(request.method.decode("ascii"), request.uri.decode("latin-1"), params["ts"],
                                 params["user"], params["device"], body)
        if not crypto.verify_ed25519(bytes.fromhex(params["user"]), message, bytes.fromhex(params["sig"])):
            raise invalid("signature")
        user, device = params["user"].lower(), params["device"].lower()
        row = await self.node.storage.get_device(user, device)
        if row is None:
            raise invalid("device")
        if row.revoked_at is not None:
            raise ApiError(403, "DEVICE_REVOKED", "This device has been revoked")
        if not await self.replay.insert_if_absent("sig:" + params["sig"].lower(), ts + window_ms, now):
            raise invalid("replay")
        return Caller("signed", user, device)


def caller_device_pair(caller: Caller) -> Tuple[str, Optional[str]]:
    """(user_id, device_id) of an authenticated caller."""
    assert caller.user_id is not None
    return caller.user_id, caller.device_id
