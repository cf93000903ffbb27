"""
The client side of the v1 handshake (PROTOCOL.md §4), sans-IO.

``V1Handshake`` builds ``client_hello``, checks ``server_hello`` (formats,
protocol version, the server's Ed25519 signature, optionally a pinned server
key) and answers with ``client_auth``; then it checks
``session_established``. It never touches a socket, so the §13 vectors can be
fed to it directly (the ephemeral key and nonces are injectable).

A v2 handshake will have the same three steps plus a frame codec to install
after ``server_hello``; ``Client`` only relies on the methods below.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional

from cryptography.hazmat.primitives.asymmetric import ec

from pocketbridge import crypto
from pocketbridge.client._util import is_wire_int
from pocketbridge.client.keys import Identity

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_HEX128 = re.compile(r"^[0-9a-fA-F]{128}$")
_HEX130 = re.compile(r"^[0-9a-fA-F]{130}$")


class HandshakeError(Exception):
    """The server's side of the handshake was malformed or failed verification."""


def envelope_payload(message: Any, expected_type: str) -> Dict[str, Any]:
    """
    The payload of a server message of ``expected_type``.

    Server messages must use the ``{"type", "payload"}`` envelope (§2);
    anything else is a HandshakeError.
    """
    if not isinstance(message, dict) or message.get("type") != expected_type:
        raise HandshakeError("expected {}".format(expected_type))
    payload = message.get("payload")
    if not isinstance(payload, dict):
        raise HandshakeError("{} without a payload object".format(expected_type))
    return payload


def _message(msg_type: str, payload: Dict[str, Any], flat: bool) -> Dict[str, Any]:
    """A client message, enveloped or flat."""
    if flat:
        out: Dict[str, Any] = {"type": msg_type}
        out.update(payload)
        return out
    return {"type": msg_type, "payload": payload}


class V1Handshake:
    """
    One v1 handshake attempt. Use each instance for one connection:
    ``client_hello()`` → ``on_server_hello(payload)`` → ``on_session_established(payload)``.

    ``server_key`` (hex64) pins the server identity; without it any
    correctly signed ``server_hello`` is accepted (v1 has no pinning rule).
    ``flat`` sends ``client_hello``/``client_auth`` with top-level fields, as
    some v1 clients do (§2). Like deployed v1 clients, ``client_hello`` omits
    ``protocol_version`` (absent means 1) unless ``announce_version``.
    """

    protocol_version = 1

    def __init__(
        self,
        identity: Identity,
        device_id: str,
        *,
        device_name: Optional[str] = None,
        device_type: Optional[str] = "cli",
        flat: bool = False,
        server_key: Optional[str] = None,
        ephemeral: Optional[ec.EllipticCurvePrivateKey] = None,
        nonce_c: Optional[str] = None,
        nonce_c2: Optional[str] = None,
        announce_version: bool = False,
    ) -> None:
        self.identity = identity
        self.device_id = device_id
        self.device_name = device_name
        self.device_type = device_type
        self.flat = flat
        self.announce_version = announce_version
        self.server_key = server_key.lower() if server_key else None
        self._ephemeral = ephemeral if ephemeral is not None else crypto.generate_ephemeral()
        self.client_ephemeral_pub = crypto.point_bytes(self._ephemeral).hex()
        self.nonce_c = nonce_c if nonce_c is not None else crypto.random_nonce_hex()
        self.nonce_c2 = nonce_c2 if nonce_c2 is not None else crypto.random_nonce_hex()
        self.server_identity_pub: Optional[str] = None
        self.server_ephemeral_pub: Optional[str] = None
        self.nonce_s: Optional[str] = None
        self.state = "start"

    def client_hello(self) -> Dict[str, Any]:
        """The ``client_hello`` message to send first."""
        self.state = "hello_sent"
        payload: Dict[str, Any] = {"client_ephemeral_pub": self.client_ephemeral_pub, "nonce_c": self.nonce_c}
        if self.announce_version:
            payload["protocol_version"] = 1
        return _message("client_hello", payload, self.flat)

    def on_server_hello(self, payload: Mapping[str, Any]) -> Dict[str, Any]:
        """
        Verify a ``server_hello`` payload and return the ``client_auth``
        message. HandshakeError on a bad format, version or signature.
        """
        if self.state != "hello_sent":
            raise HandshakeError("unexpected server_hello")
        version = payload.get("protocol_version")
        if not is_wire_int(version) or version != 1:
            raise HandshakeError("server answered protocol_version {!r}, expected 1".format(version))
        server_eph = payload.get("server_ephemeral_pub")
        nonce_s = payload.get("nonce_s")
        identity_pub = payload.get("server_identity_pub")
        signature = payload.get("server_signature")
        for name, value, pattern in (
            ("server_ephemeral_pub", server_eph, _HEX130),
            ("nonce_s", nonce_s, _HEX64),
            ("server_identity_pub", identity_pub, _HEX64),
            ("server_signature", signature, _HEX128),
        ):
            if not isinstance(value, str) or not pattern.match(value):
                raise HandshakeError("invalid " + name)
        assert isinstance(server_eph, str) and isinstance(nonce_s, str)
        assert isinstance(identity_pub, str) and isinstance(signature, str)
        try:
            crypto.load_point(bytes.fromhex(server_eph))
        except crypto.CryptoError as e:
            raise HandshakeError("invalid server_ephemeral_pub") from e
        if self.server_key is not None and identity_pub.lower() != self.server_key:
            raise HandshakeError("server identity key does not match the pinned key")
        digest = crypto.v1_server_digest(identity_pub, server_eph, self.nonce_c, nonce_s)
        if not crypto.verify_ed25519(bytes.fromhex(identity_pub), digest, bytes.fromhex(signature)):
            raise HandshakeError("invalid server signature")
        self.server_identity_pub = identity_pub
        self.server_ephemeral_pub = server_eph
        self.nonce_s = nonce_s
        self.state = "auth_sent"
        return _message("client_auth", self.client_auth_payload(), self.flat)

    def client_digest(self) -> bytes:
        """The 32-byte digest the user key signs (§4.3); needs ``server_hello`` first."""
        assert self.nonce_s is not None and self.server_ephemeral_pub is not None
        return crypto.v1_client_digest(
            self.identity.user_id, self.device_id, self.nonce_c, self.nonce_s, self.server_ephemeral_pub
        )

    def client_auth_payload(self) -> Dict[str, Any]:
        """The ``client_auth`` payload, signed over the strings exactly as sent."""
        payload: Dict[str, Any] = {
            "user_id": self.identity.user_id,
            "device_id": self.device_id,
            "client_signature": self.identity.sign_hex(self.client_digest()),
            "nonce_c2": self.nonce_c2,
        }
        if self.device_name is not None:
            payload["device_name"] = self.device_name
        if self.device_type is not None:
            payload["device_type"] = self.device_type
        return payload

    def on_session_established(self, payload: Mapping[str, Any]) -> Dict[str, Any]:
        """Check a ``session_established`` payload and return it as a dict."""
        if self.state != "auth_sent":
            raise HandshakeError("unexpected session_established")
        if payload.get("device_id") != self.device_id.lower():
            raise HandshakeError("session_established for another device_id")
        last = payload.get("last_ack_device_seq")
        if not is_wire_int(last) or last < 0:
            raise HandshakeError("session_established without an integer last_ack_device_seq")
        version = payload.get("protocol_version", 1)
        if not is_wire_int(version) or version != 1:
            raise HandshakeError("session_established with protocol_version {!r}".format(version))
        self.state = "established"
        return dict(payload)
