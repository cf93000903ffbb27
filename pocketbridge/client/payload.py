"""
End-to-end payload encryption for the SDK and the CLI (docs/pairing.md,
"Payload encryption").

Every device of a user holds the user's Ed25519 seed (PROTOCOL.md §3), so
all of them derive the same payload key from it and the server, which never
sees the seed, stores only ciphertext in ``encrypted_payload``:

- key = HKDF-SHA256(ikm = seed, salt = ``pocketbridge/payload``,
  info = ``pocketbridge payload v1``), 32 bytes;
- ``encrypted_payload`` = standard padded base64 of
  ``0x01 ‖ nonce(12) ‖ AES-256-GCM ciphertext ‖ tag(16)`` with
  associated data ``stream_id ‖ 0x00 ‖ type`` (UTF-8), so a ciphertext
  moved to another stream or type does not open.

Sans-IO and thread-safe (the key object is immutable).
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any, Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pocketbridge.client.keys import Identity
from pocketbridge.protocol.events import B64_RE

__all__ = ["PayloadError", "PayloadKey", "FORMAT_VERSION"]

FORMAT_VERSION = 1
SALT = b"pocketbridge/payload"
INFO = b"pocketbridge payload v1"
NONCE_BYTES = 12
TAG_BYTES = 16
_VERSION_BYTE = bytes([FORMAT_VERSION])


class PayloadError(ValueError):
    """An ``encrypted_payload`` that does not open: malformed, tampered with, or for another key, stream or type."""


def _aad(stream_id: str, type: str) -> bytes:
    s = stream_id.encode("utf-8")
    t = type.encode("utf-8")
    if b"\x00" in s or b"\x00" in t:
        # 0x00 separates the two; inside either it would make the AAD ambiguous.
        raise ValueError("stream_id and type must not contain NUL")
    return s + b"\x00" + t


class PayloadKey:
    """The user's 32-byte payload key; ``seal``/``open`` an event's ``encrypted_payload``."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a payload key is 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def from_seed(cls, seed: bytes) -> "PayloadKey":
        """The key of the user with this 32-byte Ed25519 seed."""
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        return cls(HKDF(algorithm=hashes.SHA256(), length=32, salt=SALT, info=INFO).derive(seed))

    @classmethod
    def from_identity(cls, identity: Identity) -> "PayloadKey":
        """The key of ``identity``'s user (the same on every device of the user)."""
        return cls.from_seed(bytes(identity.signing_key))

    def seal(self, plaintext: bytes, stream_id: str, type: str, nonce: Optional[bytes] = None) -> str:
        """
        ``encrypted_payload`` for ``plaintext`` in (``stream_id``, ``type``):
        standard padded base64 text. ``nonce`` is random unless given (tests
        only: a repeated nonce under one key breaks AES-GCM).
        """
        nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
        if len(nonce) != NONCE_BYTES:
            raise ValueError("the nonce is 12 bytes")
        sealed = self._aead.encrypt(nonce, bytes(plaintext), _aad(stream_id, type))
        return base64.b64encode(_VERSION_BYTE + nonce + sealed).decode("ascii")

    def open(self, encrypted_payload: Any, stream_id: str, type: str) -> bytes:
        """The plaintext of ``encrypted_payload``; PayloadError when it does not open."""
        # What the server accepts as encrypted_payload (PROTOCOL.md §6), plus length % 4 == 0.
        if not isinstance(encrypted_payload, str) or not B64_RE.match(encrypted_payload) \
                or len(encrypted_payload) % 4:
            raise PayloadError("encrypted_payload is not padded standard base64")
        try:
            raw = base64.b64decode(encrypted_payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise PayloadError("encrypted_payload is not padded standard base64") from e
        if len(raw) < 1 + NONCE_BYTES + TAG_BYTES:
            raise PayloadError("encrypted_payload is truncated")
        if raw[:1] != _VERSION_BYTE:
            raise PayloadError("unknown payload format {}".format(raw[0]))
        nonce, sealed = raw[1:1 + NONCE_BYTES], raw[1 + NONCE_BYTES:]
        try:
            return self._aead.decrypt(nonce, sealed, _aad(stream_id, type))
        except InvalidTag as e:
            raise PayloadError("encrypted_payload does not open (tampered, or another key, stream or type)") from e

    def __repr__(self) -> str:
        """Never shows the key."""
        return "PayloadKey(...)"
