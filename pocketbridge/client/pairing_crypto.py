"""
Pairing, v2, the sans-IO half (API.md "Pairing, v2"; docs/pairing.md): the
six-digit codes, the SPAKE2 exchange (``Pake``), the keys derived from its
shared secret (the sealing key and the verification string), the sealed
identity bundle, and the errors pairing reports.

Apart from ``pairing.py``, which talks to the server's mailbox with these, so
that the cryptography can be read and tested without a reactor or HTTP.
``pairing.py`` re-exports every public name here, so callers import from it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B
from spake2.spake2 import SPAKEError

from pocketbridge.client.keys import DeviceKeys, Identity
from pocketbridge.protocol.wire import HEX64_RE, PAIRING_CODE_RE, is_hex

__all__ = [
    "BUNDLE_AAD",
    "NONCE_BYTES",
    "PAKE_ID_A",
    "PAKE_ID_B",
    "SEAL_INFO",
    "TAG_BYTES",
    "VERIFY_INFO",
    "PairingBurned",
    "PairingCodeInUse",
    "PairingExpired",
    "PairingFailed",
    "PairingKeys",
    "PairingTimedOut",
    "Pake",
    "RateLimited",
    "derive_keys",
    "identity_bundle",
    "keys_from_bundle",
    "new_code",
    "normalize_code",
    "open_bundle",
    "seal_bundle",
]

#: SPAKE2 identities of the two sides (fixed: the code is the only secret).
PAKE_ID_A = b"pocketbridge A"
PAKE_ID_B = b"pocketbridge B"
#: HKDF-SHA256 ``info`` of the sealing key and of the verification string.
SEAL_INFO = b"pocketbridge pair seal"
VERIFY_INFO = b"pocketbridge pair verify"
#: AES-256-GCM associated data of the sealed identity bundle.
BUNDLE_AAD = b"pocketbridge pair bundle"
NONCE_BYTES = 12
TAG_BYTES = 16


# ---------------------------------------------------------------------------
# Errors


class PairingFailed(Exception):
    """Pairing did not complete; the message says why in words a user can read."""


class PairingCodeInUse(PairingFailed):
    """HTTP 409: the code is already live (pick another one)."""


class PairingExpired(PairingFailed):
    """HTTP 404: no live mailbox under this code (mistyped, expired or already completed)."""


class PairingBurned(PairingFailed):
    """HTTP 410: someone else joined this code too, so the server burned it. Start again."""


class PairingTimedOut(PairingFailed):
    """The other device did not take its step within the caller's ``timeout``."""


class RateLimited(PairingFailed):
    """HTTP 429: too many failed pairing attempts (or requests); ``retry_after`` in whole seconds."""

    def __init__(self, retry_after: int, message: str = "Too many failed pairing attempts") -> None:
        super().__init__("{}; retry in {} s".format(message, retry_after))
        self.retry_after = retry_after


# ---------------------------------------------------------------------------
# Codes, PAKE and keys (sans-IO)


def new_code() -> str:
    """Six random decimal digits from ``secrets`` (leading zeros kept)."""
    return "{:06d}".format(secrets.randbelow(1_000_000))


def normalize_code(code: str) -> str:
    """
    ``code`` without the spaces and hyphens people type (``"123 456"``);
    PairingFailed unless six ASCII digits remain.
    """
    if not isinstance(code, str):
        raise PairingFailed("a pairing code is six digits")
    cleaned = re.sub(r"[\s-]", "", code)
    if not PAIRING_CODE_RE.match(cleaned):
        raise PairingFailed("a pairing code is six digits")
    return cleaned


@dataclass(frozen=True)
class PairingKeys:
    """What both sides derive from the SPAKE2 key: the bundle sealing key and the verification string."""

    seal_key: bytes = field(repr=False)
    verification: str


def _hkdf(ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


def derive_keys(shared_key: bytes) -> PairingKeys:
    """
    The sealing key (32 bytes, HKDF-SHA256 info ``pocketbridge pair seal``)
    and the verification string of the SPAKE2 key: the first 50 bits of
    HKDF-SHA256 info ``pocketbridge pair verify`` as ten Crockford base32
    characters in two groups (``7QX2M-K9D4A``). 50 bits, because a malicious
    relay that learned the code can grind its own PAKE messages until both
    devices would show the same string: 20 bits (six digits) take it seconds.
    """
    seal = _hkdf(shared_key, SEAL_INFO, 32)
    bits = int.from_bytes(_hkdf(shared_key, VERIFY_INFO, 8), "big") >> 14
    chars = "".join(_CROCKFORD[(bits >> (5 * i)) & 31] for i in reversed(range(10)))
    return PairingKeys(seal, chars[:5] + "-" + chars[5:])


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise PairingFailed("the server sent an invalid {}".format(what))
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise PairingFailed("the server sent an invalid {}".format(what)) from e


class Pake:
    """
    One side (``"A"`` or ``"B"``) of a SPAKE2 run with the code as password.

    ``message`` is this side's message as base64 text (what the mailbox
    relays); ``finish`` takes the other side's and returns the derived
    ``PairingKeys``. A single use: ``finish`` may be called once.
    """

    def __init__(self, side: str, code: str, entropy: Callable[[int], bytes] = os.urandom) -> None:
        password = normalize_code(code).encode("ascii")
        if side == "A":
            self._spake: Any = SPAKE2_A(password, idA=PAKE_ID_A, idB=PAKE_ID_B, entropy_f=entropy)
        elif side == "B":
            self._spake = SPAKE2_B(password, idA=PAKE_ID_A, idB=PAKE_ID_B, entropy_f=entropy)
        else:
            raise ValueError("side must be 'A' or 'B'")
        self.side = side
        self.message = _b64(self._spake.start())

    def finish(self, other_message: str) -> PairingKeys:
        """The keys, given the other side's base64 message; PairingFailed when it is not one."""
        raw = _unb64(other_message, "PAKE message")
        try:
            shared = self._spake.finish(raw)
        except (SPAKEError, ValueError, AssertionError) as e:
            raise PairingFailed("the other device sent an invalid PAKE message") from e
        return derive_keys(shared)


# ---------------------------------------------------------------------------
# The identity bundle (sans-IO)


def identity_bundle(keys: DeviceKeys) -> Dict[str, Any]:
    """What A hands to B: the user's seed and id, and A's server pins."""
    return {
        "user_seed": keys.identity.seed_hex,
        "user_id": keys.identity.user_id,
        "server_pins": dict(sorted(keys.server_pins.items())),
    }


def seal_bundle(seal_key: bytes, bundle: Mapping[str, Any], nonce: Optional[bytes] = None) -> str:
    """
    base64(nonce(12) ‖ AES-256-GCM(seal_key, nonce, JSON(bundle),
    aad = ``pocketbridge pair bundle``) ‖ tag). ``nonce`` is random unless given (tests).
    """
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    if len(nonce) != NONCE_BYTES:
        raise ValueError("the nonce is 12 bytes")
    return _b64(nonce + AESGCM(seal_key).encrypt(nonce, orjson.dumps(dict(bundle)), BUNDLE_AAD))


def open_bundle(seal_key: bytes, sealed: str) -> Dict[str, Any]:
    """
    The bundle sealed by ``seal_bundle``. A different key, which is what a
    different code gives, fails authentication: PairingFailed("codes do not match").
    """
    raw = _unb64(sealed, "sealed bundle")
    if len(raw) < NONCE_BYTES + TAG_BYTES:
        raise PairingFailed("the sealed bundle is truncated")
    try:
        plain = AESGCM(seal_key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], BUNDLE_AAD)
    except InvalidTag as e:
        raise PairingFailed("codes do not match") from e
    try:
        doc = orjson.loads(plain)
    except orjson.JSONDecodeError as e:
        raise PairingFailed("the identity bundle is not JSON") from e
    if not isinstance(doc, dict):
        raise PairingFailed("the identity bundle is not an object")
    return doc


def keys_from_bundle(bundle: Mapping[str, Any], device_name: Optional[str] = None,
                     device_type: str = "cli") -> DeviceKeys:
    """
    A new device of the bundle's user: its identity, a fresh uuid4
    ``device_id``, fresh counters and A's server pins. PairingFailed when the
    bundle is malformed or its ``user_id`` is not the seed's public key.
    """
    try:
        identity = Identity.from_seed_hex(bundle.get("user_seed"))  # type: ignore[arg-type]
    except ValueError as e:
        raise PairingFailed("the identity bundle has no valid user_seed") from e
    user_id = bundle.get("user_id")
    if not isinstance(user_id, str) or user_id.lower() != identity.user_id:
        raise PairingFailed("the identity bundle's user_id does not match its seed")
    pins = bundle.get("server_pins", {})
    if not isinstance(pins, dict) or not all(
        isinstance(k, str) and k and is_hex(v, HEX64_RE) for k, v in pins.items()
    ):
        raise PairingFailed("the identity bundle has invalid server_pins")
    return DeviceKeys(identity, str(uuid.uuid4()), device_name=device_name, device_type=device_type,
                      server_pins=pins)
