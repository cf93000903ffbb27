"""
The account routes of API.md §3: the user profile (``/api/user/profile``,
``/api/user/profile/onboarding-complete``), account deletion
(``DELETE /api/user``) and events over HTTP (``GET /api/events``).

Under legacy ``X-User-ID`` auth the two profile POSTs must carry the v1 body
signature (``signature``, ``timestamp``); under PB-Ed25519 those fields are
ignored.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

import orjson

from pocketbridge.protocol import crypto
from pocketbridge.protocol.events import relay_payload
from pocketbridge.protocol.wire import HEX128_RE
from pocketbridge.server.api.auth import Caller
from pocketbridge.server.api.http import Api, ApiError, parse_body, query_int
from pocketbridge.server.api.jsstringify import stringify, to_iso_string

if TYPE_CHECKING:
    from pocketbridge.server.context import Node

MAX_DISPLAY_NAME = 100  # code points
MAX_EMAIL = 254
EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
MAX_PREFERENCES_BYTES = 4 * 1024
BODY_SIG_PAST_MS = 5 * 60 * 1000
BODY_SIG_FUTURE_MS = 30 * 1000
ONBOARDING_SUBJECT = "onboarding_complete"
EVENTS_PAGE_PAYLOAD = 8 * 1024 * 1024
EVENTS_LIMIT_DEFAULT = 100
EVENTS_LIMIT_MAX = 1000


def body_signature_message(user_id: str, timestamp: int, subject: str) -> bytes:
    """What a v1 body signature signs: the lowercase hex of SHA-256(user_id + timestamp + subject), as UTF-8."""
    text = user_id + str(timestamp) + subject
    return hashlib.sha256(text.encode("utf-8")).hexdigest().encode("ascii")


def profile_subject(body: Dict[str, Any]) -> str:
    """The X of a profile update: JSON.stringify of the body without ``signature`` and ``timestamp``."""
    return stringify({k: v for k, v in body.items() if k not in ("signature", "timestamp")})


def profile_json(p: Any) -> Dict[str, Any]:
    """The ``profile`` object of a response."""
    return {
        "user_id": p.user_id,
        "display_name": p.display_name,
        "email": p.email,
        "avatar_url": p.avatar_url,
        "preferences": orjson.loads(p.preferences),
        "onboarding_completed": p.onboarding_completed,
        "created_at": to_iso_string(p.created_at),
        "updated_at": to_iso_string(p.updated_at),
    }


def profile_changes(body: Dict[str, Any]) -> Dict[str, Any]:
    """The column changes a profile update asks for; 400 VALIDATION_ERROR on a bad value. Other members are ignored."""
    changes: Dict[str, Any] = {}
    if "display_name" in body:
        name = body["display_name"]
        if name is not None and (not isinstance(name, str) or len(name) > MAX_DISPLAY_NAME):
            raise ApiError(400, "VALIDATION_ERROR", "display_name must be a string of at most 100 characters or null",
                           field="display_name")
        changes["display_name"] = name
    if "email" in body:
        email = body["email"]
        if email == "":
            email = None
        if email is not None and (not isinstance(email, str) or len(email) > MAX_EMAIL or not EMAIL_RE.fullmatch(email)):
            raise ApiError(400, "VALIDATION_ERROR", "email must be an email address of at most 254 characters, "
                           "\"\" or null", field="email")
        changes["email"] = email
    if "preferences" in body:
        prefs = body["preferences"]
        if not isinstance(prefs, dict):
            raise ApiError(400, "VALIDATION_ERROR", "preferences must be a JSON object", field="preferences")
        encoded = orjson.dumps(prefs)
        if len(encoded) > MAX_PREFERENCES_BYTES:
            raise ApiError(400, "VALIDATION_ERROR", "preferences must be at most 4 KiB", field="preferences")
        changes["preferences"] = encoded.decode("utf-8")
    return changes


def optional_object(request: Any) -> Dict[str, Any]:
    """The body as a JSON object; an empty body is ``{}`` (400 when it is JSON but not an object)."""
    value = parse_body(request, required=False)
    if not isinstance(value, dict):
        raise ApiError(400, "VALIDATION_ERROR", "Body must be a JSON object", field="body")
    return value


def register(api: Api, node: Node) -> None:
    """Add the account routes to api."""
    storage = node.storage

    async def check_body_signature(request: Any, caller: Caller, body: Dict[str, Any], subject: str) -> None:
        """Under X-User-ID, require a valid, fresh, unused v1 body signature (401 otherwise)."""
        if caller.method != "legacy":
            return
        signature = body.get("signature")
        timestamp = body.get("timestamp")
        if signature is None or timestamp is None:
            raise ApiError(401, "AUTH_REQUIRED", "signature and timestamp are required with X-User-ID")
        if not isinstance(signature, str) or not HEX128_RE.match(signature):
            raise ApiError(400, "VALIDATION_ERROR", "signature must be 128 hex characters", field="signature")
        if type(timestamp) is not int:
            raise ApiError(400, "VALIDATION_ERROR", "timestamp must be an integer (ms)", field="timestamp")
        now = node.now_ms()
        if not now - BODY_SIG_PAST_MS <= timestamp <= now + BODY_SIG_FUTURE_MS:
            raise ApiError(401, "AUTH_INVALID", "timestamp is too old or in the future")
        assert caller.user_id is not None
        # The client signed its user_id as it sent it; the header may differ in case.
        header = request.getHeader(b"x-user-id")
        spellings = {caller.user_id}
        if header is not None:
            spellings.add(header.decode("latin-1").strip())
        public = bytes.fromhex(caller.user_id)
        sig = bytes.fromhex(signature)
        if not any(crypto.verify_ed25519(public, body_signature_message(u, timestamp, subject), sig)
                   for u in sorted(spellings)):
            raise ApiError(401, "AUTH_INVALID", "Invalid body signature")
        if not await api.auth.replay.insert_if_absent("body:" + signature.lower(), timestamp + BODY_SIG_PAST_MS, now):
            raise ApiError(401, "AUTH_INVALID", "Body signature already used")

    async def write_profile(caller: Caller, changes: Dict[str, Any]) -> Any:
        assert caller.user_id is not None
        # A signed caller's account must still exist (it may be deleted concurrently).
        profile = await storage.update_profile(caller.user_id, changes, node.now_ms(), caller.method == "signed")
        if profile is None:
            raise ApiError(401, "AUTH_INVALID", "Unknown account")
        return profile

    @api.route("/api/user/profile", ["GET"], auth="signed_or_legacy")
    async def get_profile(request: Any, caller: Caller) -> Tuple[int, Any]:
        assert caller.user_id is not None
        profile = await storage.get_profile(caller.user_id)
        if profile is None:
            raise ApiError(404, "NOT_FOUND", "No profile")
        return 200, {"profile": profile_json(profile)}

    # Api.route names Klein endpoints by route name, so a second method on one path needs its own name.
    @api.route("/api/user/profile", ["POST"], auth="signed_or_legacy", name="/api/user/profile POST")
    async def post_profile(request: Any, caller: Caller) -> Tuple[int, Any]:
        body = optional_object(request)
        await check_body_signature(request, caller, body, profile_subject(body))
        profile = await write_profile(caller, profile_changes(body))
        return 200, {"success": True, "profile": profile_json(profile)}

    @api.route("/api/user/profile/onboarding-complete", ["POST"], auth="signed_or_legacy")
    async def onboarding_complete(request: Any, caller: Caller) -> Tuple[int, Any]:
        body = optional_object(request)
        await check_body_signature(request, caller, body, ONBOARDING_SUBJECT)
        await write_profile(caller, {"onboarding_completed": 1})
        return 200, {"success": True}

    @api.route("/api/user", ["DELETE"], auth="signed")
    async def delete_user(request: Any, caller: Caller) -> Tuple[int, Any]:
        assert caller.user_id is not None
        deleted = await storage.delete_account(caller.user_id)
        if deleted is None:
            raise ApiError(404, "NOT_FOUND", "No such account")
        # Sockets on every node close 4003; events still in a writer queue meet no_user and close 4003 too.
        node.broadcast({"kind": "delete_user", "user_id": caller.user_id})
        return 200, {"success": True, "deleted": {"devices": deleted.devices, "events": deleted.events}}

    @api.route("/api/events", ["GET"], auth="signed")
    async def events(request: Any, caller: Caller) -> Tuple[int, Any]:
        assert caller.user_id is not None
        after = query_int(request, "after_seq", 0, 0, clamp=False)
        limit = query_int(request, "limit", EVENTS_LIMIT_DEFAULT, 1, EVENTS_LIMIT_MAX)
        rows, more = await storage.events_page(caller.user_id, after, limit, EVENTS_PAGE_PAYLOAD, node.now_ms())
        page: List[Dict[str, Any]] = [relay_payload(r) for r in rows]
        return 200, {"events": page, "next_after_seq": rows[-1].seq if rows else after, "has_more": more}
