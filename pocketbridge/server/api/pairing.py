"""
The v1 pairing routes of API.md §3: ``POST /api/pairing/store`` and
``GET /api/pairing/lookup/{code}``.

A v1 record carries whatever the client put in ``data`` (v1 clients put
their identity key pair there), so it is sealed at rest with AES-256-GCM
under a key derived from the server's secret, bound to its code and owner,
never logged, and deleted by its first redemption or by expiry. The code
itself is stored only as a keyed hash (``CodeHasher``). Failed lookups spend
the budgets of ``limits`` (API.md §2), reserved before the storage lookup.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import TYPE_CHECKING, Any, Optional, Tuple

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from twisted.logger import Logger

from pocketbridge.protocol.wire import PAIRING_CODE_RE
from pocketbridge.server import metrics
from pocketbridge.server.api.auth import Caller
from pocketbridge.server.api.http import Api, ApiError, body_object
from pocketbridge.server.api.jsstringify import to_iso_string
from pocketbridge.server.api.pairing_budget import budgets_for

if TYPE_CHECKING:
    from pocketbridge.server.context import Node

log = Logger()

MAX_DATA_BYTES = 16 * 1024
KIND_V1 = "v1"
SEAL_VERSION = b"\x01"
NONCE_BYTES = 12
NOT_FOUND_MESSAGE = "Pairing code not found or expired"


def is_code(value: Any) -> bool:
    """True for a string of exactly six ASCII digits."""
    return isinstance(value, str) and PAIRING_CODE_RE.match(value) is not None


class RecordSealer:
    """
    AES-256-GCM for pairing records at rest. The key is HKDF-SHA256 of the
    server identity seed with a label of its own, so it is useless for
    anything but this; the code and the owner are the associated data, so a
    record cannot be moved to another code or user. A sealed record is
    ``0x01 ‖ nonce(12) ‖ ciphertext‖tag``.
    """

    def __init__(self, server_seed: bytes, label: bytes = b"pocketbridge/2 pairing record seal v1",
                 random_bytes: Any = os.urandom) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(server_seed)
        self._aead = AESGCM(key)
        self._random = random_bytes

    @staticmethod
    def _aad(code: str, user_id: str) -> bytes:
        return b"pocketbridge pairing\x00" + code.encode("ascii") + b"\x00" + user_id.encode("ascii")

    def seal(self, code: str, user_id: str, plaintext: bytes) -> bytes:
        """The sealed form of ``plaintext`` for (code, user_id)."""
        nonce = self._random(NONCE_BYTES)
        return SEAL_VERSION + nonce + self._aead.encrypt(nonce, plaintext, self._aad(code, user_id))

    def open(self, code: str, user_id: str, sealed: bytes) -> Optional[bytes]:
        """The plaintext, or None when the record was not sealed by this key for (code, user_id)."""
        if len(sealed) < 1 + NONCE_BYTES + 16 or sealed[:1] != SEAL_VERSION:
            return None
        nonce = sealed[1:1 + NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, sealed[1 + NONCE_BYTES:], self._aad(code, user_id))
        except InvalidTag:
            return None


class CodeHasher:
    """
    The stored form of a v1 code: HMAC-SHA256 under a key derived from the
    server secret (its own label, as v2 has), so reading the database does
    not reveal which codes are live; a guesser must still ask the server.
    """

    def __init__(self, server_seed: bytes) -> None:
        self._key = hmac.new(server_seed, b"pocketbridge pairing v1 code key", hashlib.sha256).digest()

    def __call__(self, code: str) -> str:
        return hmac.new(self._key, code.encode("ascii"), hashlib.sha256).hexdigest()


def register(api: Api, node: Node) -> None:
    """Add the v1 pairing routes to api."""
    sealer = RecordSealer(bytes(node.server_key))
    code_key = CodeHasher(bytes(node.server_key))
    budgets = budgets_for(api, node)
    storage = node.storage

    @api.route("/api/pairing/store", ["POST"], auth="signed_or_legacy")
    async def store(request: Any, caller: Caller) -> Tuple[int, Any]:
        body = body_object(request)
        code = body.get("code")
        if not isinstance(code, str) or not is_code(code):
            raise ApiError(400, "VALIDATION_ERROR", "code must be exactly 6 digits", field="code")
        data = body.get("data")
        if not isinstance(data, dict):
            raise ApiError(400, "VALIDATION_ERROR", "data must be a JSON object", field="data")
        plaintext = orjson.dumps(data)
        if len(plaintext) > MAX_DATA_BYTES:
            raise ApiError(400, "VALIDATION_ERROR", "data must be at most 16 KiB", field="data")
        user_id = caller.user_id
        assert user_id is not None
        if "userId" in data:
            claimed = data["userId"]
            if not isinstance(claimed, str) or claimed.lower() != user_id:
                raise ApiError(403, "FORBIDDEN", "data.userId is not the caller")
        ip = api.client_ip(request)
        slot = await budgets.reserve(ip, user_id, service_wide=False)
        try:
            now = node.now_ms()
            ttl_ms = int(round(node.settings.pairing_ttl * 1000))
            result = await storage.store_pairing(code_key(code), user_id, KIND_V1,
                                                 sealer.seal(code, user_id, plaintext), now, now + ttl_ms)
            if result.outcome != "stored":
                if result.holder != user_id:
                    # Learning that someone else's code is live is as good as a lookup.
                    slot.keep()
                metrics.PAIRING.labels(op="store", result="conflict").inc()
                raise ApiError(409, "CONFLICT", "Pairing code already in use")
        finally:
            slot.refund()
        budgets.forget_live_count()
        metrics.PAIRING.labels(op="store", result="stored").inc()
        return 200, {
            "success": True,
            "message": "Pairing code stored",
            "expiresAt": to_iso_string(now + ttl_ms),
            "expiresIn": ttl_ms,
        }

    @api.route("/api/pairing/lookup/<code>", ["GET"], auth="none", name="/api/pairing/lookup")
    async def lookup(request: Any, caller: Caller, code: str) -> Tuple[int, Any]:
        ip = api.client_ip(request)
        slot = await budgets.reserve(ip, None)
        try:
            if not is_code(code):
                slot.keep()
                metrics.PAIRING.labels(op="lookup", result="malformed").inc()
                raise ApiError(400, "VALIDATION_ERROR", "code must be exactly 6 digits", field="code")
            now = node.now_ms()
            record = await storage.redeem_pairing(code_key(code), KIND_V1, now)
            if record is None:
                slot.keep()
                metrics.PAIRING.labels(op="lookup", result="not_found").inc()
                raise ApiError(404, "NOT_FOUND", NOT_FOUND_MESSAGE)
        finally:
            slot.refund()
        budgets.forget_live_count()
        owner, sealed = record
        plaintext = sealer.open(code, owner, sealed)
        if plaintext is None:
            # Sealed under another server key (the key was replaced): the record is gone either way.
            log.warn("a pairing record could not be unsealed (was the server key replaced?)")
            metrics.PAIRING.labels(op="lookup", result="unsealable").inc()
            raise ApiError(404, "NOT_FOUND", NOT_FOUND_MESSAGE)
        metrics.PAIRING.labels(op="lookup", result="redeemed").inc()
        node.notify(owner, "pairing_complete", {"type": "pairing_complete", "code": code, "timestamp": now})
        return 200, {"success": True, "data": orjson.loads(plaintext)}
