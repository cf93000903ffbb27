"""
Pairing, v2 (API.md): a PAKE mailbox. The 6-digit code is the rendezvous and
the password of a SPAKE2 run between the two devices; the server relays the
opaque messages and the sealed identity bundle, and keeps nothing a guesser
could test offline: the code is stored only as an HMAC under a server secret,
B's token only as its SHA-256.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple


from twisted.internet.task import deferLater

from pocketbridge.protocol.wire import PAIRING_CODE_RE, TOKEN_RE
from pocketbridge.server import metrics
from pocketbridge.server.api.auth import Caller
from pocketbridge.server.api.http import Api, ApiError, body_object, query_arg, query_int
from pocketbridge.server.api.pairing_budget import budgets_for

if TYPE_CHECKING:
    from pocketbridge.server.context import Node

B64_TEXT_RE = re.compile(r"^[A-Za-z0-9+/=_-]+\Z")
MAX_MSG = 16 * 1024
POLL_SECONDS = 0.5  # long-polls re-check storage at least this often (and wake on notices)


def _text_field(body: Dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_MSG or not B64_TEXT_RE.match(value):
        raise ApiError(400, "VALIDATION_ERROR", "{} must be base64 text of at most 16 KiB".format(name), field=name)
    return value


class MailboxRoutes:
    """Handlers of the five mailbox routes."""

    def __init__(self, api: Api, node: Node) -> None:
        self.api = api
        self.node = node
        self.budgets = budgets_for(api, node)
        seed = bytes(node.server_key)
        self.code_secret = hmac.new(seed, b"pocketbridge pairing v2 code key", hashlib.sha256).digest()
        self.waiters: Dict[str, Any] = {}

    def code_key(self, code: str) -> str:
        """The stored form of a code: HMAC-SHA256 under the server secret."""
        return hmac.new(self.code_secret, code.encode("ascii"), hashlib.sha256).hexdigest()

    def _code(self, code: str) -> str:
        if not PAIRING_CODE_RE.match(code):
            raise ApiError(400, "VALIDATION_ERROR", "code must be 6 digits", field="code")
        return code

    async def _poll(self, request: Any, check: Any, result: Optional[Tuple[Any, ...]] = None) -> Tuple[Any, ...]:
        """Run ``check()`` (unless ``result`` is its first answer) until it is not ("wait",) or ``wait`` seconds pass."""
        wait = query_int(request, "wait", 0, 0, 30)
        deadline = self.node.clock.seconds() + wait
        while True:
            if result is None:
                result = await check()
            if result[0] != "wait" or self.node.clock.seconds() >= deadline:
                return result
            await deferLater(self.node.clock, POLL_SECONDS, lambda: None)
            result = None

    # 1. A opens the mailbox
    async def create(self, request: Any, caller: Caller) -> Tuple[int, Any]:
        body = body_object(request)
        code = body.get("code")
        if not isinstance(code, str) or not PAIRING_CODE_RE.match(code):
            raise ApiError(400, "VALIDATION_ERROR", "code must be 6 digits", field="code")
        msg_a = _text_field(body, "msg_a")
        slot = await self.budgets.reserve(self.api.client_ip(request), caller.user_id, service_wide=False)
        try:
            now = self.node.now_ms()
            expires_at = now + int(self.node.settings.pairing_v2_ttl * 1000)
            assert caller.user_id is not None and caller.device_id is not None
            result = await self.node.storage.mailbox_create(
                self.code_key(code), caller.user_id, caller.device_id, msg_a, now, expires_at)
            if result != "ok":
                if result == "taken_other":
                    slot.keep()
                metrics.PAIRING.labels(op="v2_create", result="conflict").inc()
                raise ApiError(409, "CONFLICT", "Pairing code is already active")
        finally:
            slot.refund()
        self.budgets.forget_live_count()
        metrics.PAIRING.labels(op="v2_create", result="ok").inc()
        return 201, {"expires_at": expires_at}

    # 2. B joins
    async def join(self, request: Any, caller: Caller, code: str) -> Tuple[int, Any]:
        slot = await self.budgets.reserve(self.api.client_ip(request), None)
        try:
            if not PAIRING_CODE_RE.match(code):
                slot.keep()
                raise ApiError(400, "VALIDATION_ERROR", "code must be 6 digits", field="code")
            msg_b = _text_field(body_object(request), "msg_b")
            token = os.urandom(32).hex()
            result = await self.node.storage.mailbox_join(
                self.code_key(code), msg_b, hashlib.sha256(token.encode()).hexdigest(), self.node.now_ms())
            if result[0] == "not_found":
                slot.keep()
                metrics.PAIRING.labels(op="v2_join", result="not_found").inc()
                raise ApiError(404, "NOT_FOUND", "Pairing code not found or expired")
            if result[0] == "burned":
                slot.keep()
                metrics.PAIRING.labels(op="v2_join", result="burned").inc()
                raise ApiError(410, "GONE", "Pairing code was used more than once and is burned")
        finally:
            slot.refund()
        metrics.PAIRING.labels(op="v2_join", result="ok").inc()
        return 200, {"msg_a": result[1], "b_token": token}

    # 3. A waits for B's message
    async def msg_b(self, request: Any, caller: Caller, code: str) -> Tuple[int, Any]:
        key = self.code_key(self._code(code))
        assert caller.user_id is not None
        user = caller.user_id
        result = await self._poll(request, lambda: self.node.storage.mailbox_msg_b(key, user, self.node.now_ms()))
        return self._answer(result, lambda r: (200, {"msg_b": r[1]}))

    # 4. A deposits the sealed bundle
    async def seal(self, request: Any, caller: Caller, code: str) -> Tuple[int, Any]:
        key = self.code_key(self._code(code))
        sealed = _text_field(body_object(request), "sealed")
        assert caller.user_id is not None
        result = await self.node.storage.mailbox_seal(key, caller.user_id, sealed, self.node.now_ms())
        if result == "conflict":
            raise ApiError(409, "CONFLICT", "Mailbox is not ready for the sealed bundle, or has it already")
        return self._answer((result,), lambda r: (204, None))

    # 5. B fetches it
    async def fetch(self, request: Any, caller: Caller, code: str) -> Tuple[int, Any]:
        slot = await self.budgets.reserve(self.api.client_ip(request), None)
        try:
            token = query_arg(request, "token") or ""
            if not PAIRING_CODE_RE.match(code) or not TOKEN_RE.match(token):
                slot.keep()
                raise ApiError(404, "NOT_FOUND", "Pairing code not found or expired")
            key = self.code_key(code)
            token_hash = hashlib.sha256(token.encode()).hexdigest()

            def token_ok(stored: str) -> bool:
                return hmac.compare_digest(stored, token_hash)

            def check() -> Any:
                return self.node.storage.mailbox_fetch(key, token_ok, self.node.now_ms())

            # The first check decides whether this was a failed guess; a caller
            # with the right code and token then waits without holding a slot.
            result = await check()
            if result[0] in ("not_found", "burned"):
                slot.keep()
        finally:
            slot.refund()
        result = await self._poll(request, check, result)
        if result[0] == "ok":
            self.budgets.forget_live_count()
            metrics.PAIRING.labels(op="v2_fetch", result="ok").inc()
            self.node.notify(result[2], "pairing_complete", {
                "type": "pairing_complete", "code": code, "timestamp": self.node.now_ms()})
        return self._answer(result, lambda r: (200, {"sealed": r[1]}))

    @staticmethod
    def _answer(result: Tuple[Any, ...], ok: Any) -> Tuple[int, Any]:
        kind = result[0]
        if kind == "ok":
            return ok(result)  # type: ignore[no-any-return]
        if kind == "wait":
            return 204, None
        if kind == "burned":
            raise ApiError(410, "GONE", "Pairing code was used more than once and is burned")
        raise ApiError(404, "NOT_FOUND", "Pairing code not found or expired")


def register(api: Api, node: Node) -> None:
    """Add the v2 pairing routes to ``api``."""
    r = MailboxRoutes(api, node)
    api.route("/api/pairing/v2", ["POST"], auth="signed")(r.create)
    api.route("/api/pairing/v2/<code>/join", ["POST"], auth="none", name="/api/pairing/v2/{code}/join")(r.join)
    api.route("/api/pairing/v2/<code>", ["GET"], auth="signed", name="/api/pairing/v2/{code}",
              rate_limited=True)(r.msg_b)
    api.route("/api/pairing/v2/<code>/sealed", ["PUT"], auth="signed", name="/api/pairing/v2/{code}/sealed")(r.seal)
    api.route("/api/pairing/v2/<code>/sealed", ["GET"], auth="none", name="/api/pairing/v2/{code}/sealed#get")(r.fetch)


