"""
Handshake cryptography for protocol v1 and v2 (PROTOCOL.md §4, §5) and the
bytes a PB-Ed25519 REST signature covers (API.md §1.1).

Pure functions over bytes and hex strings: no I/O, no clock. The server and
the client SDK both use them, so one implementation is checked against the
§13 vectors. The SDK imports this module, so it must not import anything that
only the server installs (see the ``server`` extra in setup.cfg).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import Tuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

V2_LABEL = b"pocketbridge/2"


class CryptoError(Exception):
    """A key, point or signature failed a check."""


# ---------------------------------------------------------------- Ed25519


def signing_key_from_seed(seed: bytes) -> SigningKey:
    """An Ed25519 signing key from its 32-byte seed."""
    return SigningKey(seed)


def public_hex(key: SigningKey) -> str:
    """The lowercase hex64 public key of ``key``."""
    return bytes(key.verify_key).hex()


def verify_ed25519(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message``."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    try:
        VerifyKey(public_key).verify(message, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    except Exception:  # nacl raises its own error types for malformed keys
        return False
    return True


# ---------------------------------------------------------------- REST


REST_SIG_PREFIX = b"pocketbridge/2 rest"


def signed_message(method: str, path: str, ts: str, user: str, device: str, body: bytes) -> bytes:
    """The bytes a PB-Ed25519 signature covers (API.md §1.1)."""
    return b"\x00".join([
        REST_SIG_PREFIX, method.upper().encode("ascii"), path.encode("latin-1"), ts.encode("ascii"),
        user.encode("ascii"), device.encode("ascii"), hashlib.sha256(body).hexdigest().encode("ascii"),
    ])


# ---------------------------------------------------------------- P-256


def generate_ephemeral() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key for one connection."""
    return ec.generate_private_key(ec.SECP256R1())


def ephemeral_from_scalar(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    """A P-256 key from a fixed private scalar (test vectors only)."""
    return ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())


def point_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The 65-byte uncompressed SEC1 encoding of ``key``'s public point."""
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def load_point(raw: bytes) -> ec.EllipticCurvePublicKey:
    """Parse an uncompressed SEC1 P-256 point; raise CryptoError if off the curve."""
    if len(raw) != 65 or raw[0] != 4:
        raise CryptoError("not an uncompressed point")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError as e:
        raise CryptoError("point not on curve") from e


def ecdh(private: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    """The 32-byte P-256 shared secret (x coordinate)."""
    return private.exchange(ec.ECDH(), peer)


# ---------------------------------------------------------------- v1


def v1_server_digest(server_identity_pub: str, server_ephemeral_pub: str, nonce_c: str, nonce_s: str) -> bytes:
    """SHA-256 over the hex strings exactly as transmitted (PROTOCOL.md §4.2)."""
    text = server_identity_pub + server_ephemeral_pub + nonce_c + nonce_s
    return hashlib.sha256(text.encode("utf-8")).digest()


def v1_client_digest(user_id: str, device_id: str, nonce_c: str, nonce_s: str, server_ephemeral_pub: str) -> bytes:
    """SHA-256 over the strings exactly as the client sent them (PROTOCOL.md §4.3)."""
    text = user_id + device_id + nonce_c + nonce_s + server_ephemeral_pub
    return hashlib.sha256(text.encode("utf-8")).digest()


# ---------------------------------------------------------------- v2


def v2_transcript(client_eph: bytes, nonce_c: bytes, server_eph: bytes, nonce_s: bytes, server_identity: bytes) -> bytes:
    """The transcript hash TH of PROTOCOL.md §5."""
    return hashlib.sha256(
        V2_LABEL + b"\x00" + client_eph + nonce_c + server_eph + nonce_s + server_identity
    ).digest()


def v2_server_message(th: bytes) -> bytes:
    """The bytes the server signs in a v2 ``server_hello``."""
    return b"pocketbridge/2 server_hello" + th


def v2_client_message(th: bytes, user_id: bytes, device_id_ascii: bytes) -> bytes:
    """The bytes the client signs in a v2 ``client_auth``."""
    return b"pocketbridge/2 client_auth" + th + user_id + device_id_ascii


def _hkdf_expand(prk: bytes, info: bytes, length: int = 32) -> bytes:
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def v2_keys(th: bytes, ecdh_x: bytes) -> Tuple[bytes, bytes]:
    """(k_c2s, k_s2c) from the transcript hash and the ECDH secret."""
    prk = hmac.new(th, ecdh_x, hashlib.sha256).digest()
    return (_hkdf_expand(prk, b"pocketbridge/2 c2s"), _hkdf_expand(prk, b"pocketbridge/2 s2c"))


MAX_FRAME_COUNTER = 2**32


class FrameCipher:
    """
    AES-256-GCM for one direction of a v2 channel, with its frame counter.

    It keeps the 32-byte key and builds the cipher per frame: a built
    ``AESGCM`` holds ~2.5 KiB of OpenSSL memory, i.e. ~5 KiB per idle v2
    socket for its two directions, while building one costs ~1.6 µs per frame
    (docs/benchmarks.md, "Memory per idle connection").
    """

    __slots__ = ("_key", "counter")

    def __init__(self, key: bytes) -> None:
        AESGCM(key)  # a wrong key length fails here, not at the first frame
        self._key = key
        self.counter = 0

    def _nonce(self) -> bytes:
        if self.counter >= MAX_FRAME_COUNTER:
            raise CryptoError("frame counter exhausted")
        return b"\x00\x00\x00\x00" + struct.pack(">Q", self.counter)

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt the next frame."""
        nonce = self._nonce()
        self.counter += 1
        return AESGCM(self._key).encrypt(nonce, plaintext, None)

    def open(self, ciphertext: bytes) -> bytes:
        """Decrypt the next frame; CryptoError on any failure."""
        nonce = self._nonce()
        try:
            plain = AESGCM(self._key).decrypt(nonce, ciphertext, None)
        except (InvalidTag, ValueError) as e:
            raise CryptoError("decrypt failed") from e
        self.counter += 1
        return plain


def random_nonce_hex() -> str:
    """32 random bytes as hex64."""
    return os.urandom(32).hex()
