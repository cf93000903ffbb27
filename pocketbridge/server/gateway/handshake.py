"""
The server side of the handshake (PROTOCOL.md §4; §5 for v2), sans-IO.

``ServerHandshake`` takes decoded message fields and returns what to send or
raises ``ProtocolError``. It never touches a socket, a clock or storage; the
gateway does registration and limits after ``client_auth`` is verified.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from nacl.signing import SigningKey

from pocketbridge.protocol import crypto
from pocketbridge.protocol.wire import HEX64_RE, HEX128_RE, HEX130_RE, ProtocolError, int_in, is_hex, is_uuid

DEVICE_TYPES = frozenset({"desktop", "mobile", "tablet", "web", "cli"})


@dataclass(frozen=True)
class AuthRequest:
    """A verified ``client_auth``: ids lowercased, name and type normalised."""

    user_id: str
    device_id: str
    device_name: Optional[str]
    device_type: str
    protocol_version: int
    resume_from: Optional[int] = None


def normalise_name(value: Any) -> Optional[str]:
    """Trim and cut to 50 code points; not a string or empty → None (§4.3)."""
    if not isinstance(value, str):
        return None
    name = value.strip()
    if not name:
        return None
    return name[:50]


def normalise_type(value: Any) -> str:
    """A known device type, else ``unknown``."""
    return value if isinstance(value, str) and value in DEVICE_TYPES else "unknown"


class ServerHandshake:
    """One connection's handshake state: hello, then auth."""

    def __init__(
        self,
        identity: SigningKey,
        require_v2: bool = False,
        make_ephemeral: Callable[[], Any] = crypto.generate_ephemeral,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.identity = identity
        self.identity_pub = crypto.public_hex(identity)
        self.require_v2 = require_v2
        self._make_ephemeral = make_ephemeral
        self._random = random_bytes
        self.version = 0
        self._hello: Optional[Dict[str, str]] = None
        self._ephemeral: Any = None
        self.keys: Optional[tuple] = None  # v2 (k_c2s, k_s2c)
        self.transcript: Optional[bytes] = None

    @property
    def hello_done(self) -> bool:
        """True once ``server_hello`` was produced."""
        return self._hello is not None

    def client_hello(self, fields: Dict[str, Any]) -> Dict[str, Any]:
        """Check a ``client_hello`` and return the ``server_hello`` payload."""
        version = fields.get("protocol_version", 1)
        if version is None:
            version = 1
        if int_in(version, 1, 2) is None:
            raise ProtocolError(1008, "Unsupported protocol version")
        if version == 1 and self.require_v2:
            raise ProtocolError(1008, "Protocol version 2 required")
        eph = fields.get("client_ephemeral_pub")
        if not is_hex(eph, HEX130_RE):
            raise ProtocolError(1008, "Invalid client_ephemeral_pub")
        try:
            client_point = crypto.load_point(bytes.fromhex(eph))
        except crypto.CryptoError:
            raise ProtocolError(1008, "Invalid client_ephemeral_pub") from None
        nonce_c = fields.get("nonce_c")
        if not is_hex(nonce_c, HEX64_RE):
            raise ProtocolError(1008, "Invalid nonce_c")
        self.version = version
        self._ephemeral = self._make_ephemeral()
        server_eph = crypto.point_bytes(self._ephemeral).hex()
        nonce_s = self._random(32).hex()
        if version == 1:
            digest = crypto.v1_server_digest(self.identity_pub, server_eph, nonce_c, nonce_s)
            signature = self.identity.sign(digest).signature.hex()
        else:
            th = crypto.v2_transcript(
                bytes.fromhex(eph), bytes.fromhex(nonce_c), bytes.fromhex(server_eph), bytes.fromhex(nonce_s),
                bytes(self.identity.verify_key),
            )
            self.transcript = th
            signature = self.identity.sign(crypto.v2_server_message(th)).signature.hex()
            self.keys = crypto.v2_keys(th, crypto.ecdh(self._ephemeral, client_point))
        self._hello = {"nonce_c": nonce_c, "nonce_s": nonce_s, "server_ephemeral_pub": server_eph}
        return {
            "type": "server_hello",
            "server_ephemeral_pub": server_eph,
            "nonce_s": nonce_s,
            "server_identity_pub": self.identity_pub,
            "server_signature": signature,
            "protocol_version": version,
        }

    def client_auth(self, fields: Dict[str, Any]) -> AuthRequest:
        """Verify a ``client_auth`` (formats, then signature) and return who it is."""
        assert self._hello is not None
        user_id = fields.get("user_id")
        device_id = fields.get("device_id")
        sig = fields.get("client_signature")
        if not is_hex(user_id, HEX64_RE):
            raise ProtocolError(1008, "Invalid user_id")
        if not is_uuid(device_id):
            raise ProtocolError(1008, "Invalid device_id")
        if not is_hex(sig, HEX128_RE):
            raise ProtocolError(1008, "Invalid client_signature")
        resume_from = None
        if self.version == 1:
            if not is_hex(fields.get("nonce_c2"), HEX64_RE):
                raise ProtocolError(1008, "Invalid nonce_c2")
            message = crypto.v1_client_digest(
                user_id, device_id, self._hello["nonce_c"], self._hello["nonce_s"], self._hello["server_ephemeral_pub"]
            )
        else:
            if "resume_from" in fields and fields["resume_from"] is not None:
                resume_from = int_in(fields["resume_from"], 0, 2**63 - 1)
                if resume_from is None:
                    raise ProtocolError(1008, "Invalid resume_from")
            assert self.transcript is not None
            message = crypto.v2_client_message(self.transcript, bytes.fromhex(user_id), device_id.encode("ascii"))
        if not crypto.verify_ed25519(bytes.fromhex(user_id), message, bytes.fromhex(sig)):
            raise ProtocolError(1008, "Invalid client signature")
        return AuthRequest(
            user_id=user_id.lower(),
            device_id=device_id.lower(),
            device_name=normalise_name(fields.get("device_name")),
            device_type=normalise_type(fields.get("device_type")),
            protocol_version=self.version,
            resume_from=resume_from,
        )


