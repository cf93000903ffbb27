"""
The client side of the handshakes (PROTOCOL.md §4 for v1, §5 for v2), sans-IO.

``V1Handshake`` builds ``client_hello``, checks ``server_hello`` (formats,
protocol version, the server's Ed25519 signature, optionally a pinned server
key) and answers with ``client_auth``; then it checks
``session_established``. ``V2Handshake`` has the same three steps over the
transcript hash TH, pins the server key (trust on first use), derives the
channel keys and hands out the frame codec that must be installed before
``client_auth`` goes out (it is the first encrypted frame). Neither touches a
socket, so the §13 vectors can be fed to them directly (the ephemeral key and
nonces are injectable).

Both share ``_Handshake``: its keyword arguments (``HelloOptions``: device
name and type, ``server_key``, the injectable ephemeral key and nonce), the
checks of ``server_hello`` up to the signature, the identity fields of
``client_auth`` and the check of ``session_established``; what differs
(digests, pinning, the channel keys) is in the two subclasses. ``Client`` only relies on
``client_hello``, ``on_server_hello``, ``codec`` and ``on_session_established``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Mapping, MutableMapping, Optional, Tuple, TypedDict

from cryptography.hazmat.primitives.asymmetric import ec

from pocketbridge.protocol import crypto
from pocketbridge.protocol.wire import HEX64_RE, HEX128_RE, HEX130_RE, is_hex
from pocketbridge.client._util import is_wire_int
from pocketbridge.client.connection import V2Codec
from pocketbridge.client.keys import Identity

if TYPE_CHECKING:
    from typing_extensions import Unpack

#: The hex fields of a ``server_hello`` and their formats (both versions).
_SERVER_HELLO_FIELDS = (
    ("server_ephemeral_pub", HEX130_RE),
    ("nonce_s", HEX64_RE),
    ("server_identity_pub", HEX64_RE),
    ("server_signature", HEX128_RE),
)


class HandshakeError(Exception):
    """The server's side of the handshake was malformed or failed verification."""


class ServerKeyChanged(HandshakeError):
    """
    v2: the server presented a (correctly signed) identity key that differs
    from the one pinned for its address. Either someone is in the middle, or
    the operator replaced the server key; only the user can tell, so the
    client stops. Pass ``server_key=<new key>`` to accept a deliberate change.
    """

    def __init__(self, address: str, pinned: str, presented: str) -> None:
        super().__init__(
            "server key for {} changed: pinned {}, server presented {}; if the server key was replaced"
            " on purpose, connect once with server_key={!r} to re-pin it".format(address, pinned, presented, presented)
        )
        self.address = address
        self.pinned = pinned
        self.presented = presented


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


def check_session_established(state: str, device_id: str, payload: Mapping[str, Any], version: int) -> Dict[str, Any]:
    """A ``session_established`` payload checked against the handshake (both versions); HandshakeError otherwise."""
    if state != "auth_sent":
        raise HandshakeError("unexpected session_established")
    if payload.get("device_id") != device_id.lower():
        raise HandshakeError("session_established for another device_id")
    last = payload.get("last_ack_device_seq")
    if not is_wire_int(last) or last < 0:
        raise HandshakeError("session_established without an integer last_ack_device_seq")
    got = payload.get("protocol_version", version)
    if not is_wire_int(got) or got != version:
        raise HandshakeError("session_established with protocol_version {!r}".format(got))
    return dict(payload)


class HelloOptions(TypedDict, total=False):
    """
    The keyword arguments both handshake classes take, with the defaults of
    ``_Handshake``: declared once, so that a subclass adds only its own
    keywords and passes these through (``**options``) still type-checked.
    """

    device_name: Optional[str]
    device_type: Optional[str]
    server_key: Optional[str]
    ephemeral: Optional[ec.EllipticCurvePrivateKey]
    nonce_c: Optional[str]


class _Handshake:
    """
    The steps both handshake versions share, for one connection. A
    subclass sets ``protocol_version`` and computes what is signed.
    ``server_key`` (hex64), when given, is the only server identity accepted;
    ``ephemeral`` and ``nonce_c`` are fresh unless given (the §13 vectors).
    """

    protocol_version = 0

    def __init__(
        self,
        identity: Identity,
        device_id: str,
        *,
        device_name: Optional[str] = None,
        device_type: Optional[str] = "cli",
        server_key: Optional[str] = None,
        ephemeral: Optional[ec.EllipticCurvePrivateKey] = None,
        nonce_c: Optional[str] = None,
    ) -> None:
        self.identity = identity
        self.device_id = device_id
        self.device_name = device_name
        self.device_type = device_type
        self.server_key = server_key.lower() if server_key else None
        self._ephemeral = ephemeral if ephemeral is not None else crypto.generate_ephemeral()
        self.client_ephemeral_pub = crypto.point_bytes(self._ephemeral).hex()
        self.nonce_c = nonce_c if nonce_c is not None else crypto.random_nonce_hex()
        self.server_identity_pub: Optional[str] = None
        self.server_ephemeral_pub: Optional[str] = None
        self.nonce_s: Optional[str] = None
        self.state = "start"

    def _hello_payload(self) -> Dict[str, Any]:
        """The ``client_hello`` fields both versions send; marks the hello as sent."""
        self.state = "hello_sent"
        return {"client_ephemeral_pub": self.client_ephemeral_pub, "nonce_c": self.nonce_c}

    def _check_server_hello(self, payload: Mapping[str, Any]) -> Tuple[Dict[str, str], ec.EllipticCurvePublicKey]:
        """
        The hex fields of a ``server_hello`` for this version and the
        server's ephemeral point, format-checked (the signature is not
        verified yet); HandshakeError otherwise.
        """
        if self.state != "hello_sent":
            raise HandshakeError("unexpected server_hello")
        version = payload.get("protocol_version")
        if not is_wire_int(version) or version != self.protocol_version:
            raise HandshakeError("server answered protocol_version {!r} to a v{} client_hello".format(
                version, self.protocol_version))
        fields: Dict[str, str] = {}
        for name, pattern in _SERVER_HELLO_FIELDS:
            value = payload.get(name)
            if not is_hex(value, pattern):
                raise HandshakeError("invalid " + name)
            fields[name] = value
        try:
            point = crypto.load_point(bytes.fromhex(fields["server_ephemeral_pub"]))
        except crypto.CryptoError as e:
            raise HandshakeError("invalid server_ephemeral_pub") from e
        return fields, point

    def _accept_server_hello(self, fields: Mapping[str, str]) -> None:
        """Remember a verified ``server_hello``; ``client_auth`` goes out next."""
        self.server_identity_pub = fields["server_identity_pub"]
        self.server_ephemeral_pub = fields["server_ephemeral_pub"]
        self.nonce_s = fields["nonce_s"]
        self.state = "auth_sent"

    def _auth_payload(self, signature: str, **extra: Any) -> Dict[str, Any]:
        """The ``client_auth`` fields: who signs, ``signature``, ``extra``, then the optional device fields."""
        payload: Dict[str, Any] = {
            "user_id": self.identity.user_id,
            "device_id": self.device_id,
            "client_signature": signature,
        }
        payload.update(extra)
        if self.device_name is not None:
            payload["device_name"] = self.device_name
        if self.device_type is not None:
            payload["device_type"] = self.device_type
        return payload

    def codec(self) -> Optional[V2Codec]:
        """The frame codec to install before ``client_auth``; None keeps the JSON codec."""
        return None

    def on_session_established(self, payload: Mapping[str, Any]) -> Dict[str, Any]:
        """Check a ``session_established`` payload and return it as a dict."""
        checked = check_session_established(self.state, self.device_id, payload, self.protocol_version)
        self.state = "established"
        return checked


class V1Handshake(_Handshake):
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
        flat: bool = False,
        nonce_c2: Optional[str] = None,
        announce_version: bool = False,
        **options: Unpack[HelloOptions],
    ) -> None:
        super().__init__(identity, device_id, **options)
        self.flat = flat
        self.announce_version = announce_version
        self.nonce_c2 = nonce_c2 if nonce_c2 is not None else crypto.random_nonce_hex()

    def client_hello(self) -> Dict[str, Any]:
        """The ``client_hello`` message to send first."""
        payload = self._hello_payload()
        if self.announce_version:
            payload["protocol_version"] = self.protocol_version
        return _message("client_hello", payload, self.flat)

    def on_server_hello(self, payload: Mapping[str, Any]) -> Dict[str, Any]:
        """
        Verify a ``server_hello`` payload and return the ``client_auth``
        message. HandshakeError on a bad format, version or signature.
        """
        fields, _point = self._check_server_hello(payload)
        identity_pub = fields["server_identity_pub"]
        if self.server_key is not None and identity_pub.lower() != self.server_key:
            raise HandshakeError("server identity key does not match the pinned key")
        digest = crypto.v1_server_digest(identity_pub, fields["server_ephemeral_pub"], self.nonce_c, fields["nonce_s"])
        if not crypto.verify_ed25519(bytes.fromhex(identity_pub), digest, bytes.fromhex(fields["server_signature"])):
            raise HandshakeError("invalid server signature")
        self._accept_server_hello(fields)
        return _message("client_auth", self.client_auth_payload(), self.flat)

    def client_digest(self) -> bytes:
        """The 32-byte digest the user key signs (§4.3); needs ``server_hello`` first."""
        assert self.nonce_s is not None and self.server_ephemeral_pub is not None
        return crypto.v1_client_digest(
            self.identity.user_id, self.device_id, self.nonce_c, self.nonce_s, self.server_ephemeral_pub
        )

    def client_auth_payload(self) -> Dict[str, Any]:
        """The ``client_auth`` payload, signed over the strings exactly as sent."""
        return self._auth_payload(self.identity.sign_hex(self.client_digest()), nonce_c2=self.nonce_c2)


class V2Handshake(_Handshake):
    """
    One v2 handshake attempt (PROTOCOL.md §5). Use each instance for one
    connection: ``client_hello()`` → ``on_server_hello(payload)`` (returns
    ``client_auth``) → install ``codec()`` on the connection → send
    ``client_auth`` through it → ``on_session_established(payload)``.

    Server key trust, checked after the signature verifies:

    - ``server_key`` (hex64) given: the server must present exactly this key;
      it is then (re-)pinned. This is how a caller accepts a replaced key.
    - else, when ``pins`` (a mutable mapping, e.g. ``DeviceKeys.server_pins``)
      holds a key for ``server_address``: it must match, or ``ServerKeyChanged``.
    - else: trust on first use; the key is stored in ``pins`` and
      ``pin_status`` is ``"new"`` (the caller saves the key file).

    ``resume_from`` (integer ≥ 0) goes into ``client_auth`` (§7.3).
    """

    protocol_version = 2

    def __init__(
        self,
        identity: Identity,
        device_id: str,
        *,
        pins: Optional[MutableMapping[str, str]] = None,
        server_address: str = "",
        resume_from: Optional[int] = None,
        **options: Unpack[HelloOptions],
    ) -> None:
        if resume_from is not None and (not is_wire_int(resume_from) or resume_from < 0):
            raise ValueError("resume_from must be an integer >= 0")
        super().__init__(identity, device_id, **options)
        self.pins = pins
        self.server_address = server_address
        self.resume_from = resume_from
        self.transcript: Optional[bytes] = None
        self.k_c2s: Optional[bytes] = None
        self.k_s2c: Optional[bytes] = None
        #: How the server key was trusted: "new" (first use, now pinned),
        #: "pinned" (matched the pin), "given" (matched ``server_key``).
        self.pin_status: Optional[str] = None

    def client_hello(self) -> Dict[str, Any]:
        """The ``client_hello`` message (a text frame), announcing protocol_version 2."""
        payload = self._hello_payload()
        payload["protocol_version"] = self.protocol_version
        return {"type": "client_hello", "payload": payload}

    def on_server_hello(self, payload: Mapping[str, Any]) -> Dict[str, Any]:
        """
        Verify a ``server_hello`` payload, derive the channel keys and return
        the ``client_auth`` message, to be sent through ``codec()``.
        HandshakeError on anything but protocol_version 2, a bad format or
        signature; ``ServerKeyChanged`` when the pinned key does not match.
        """
        fields, server_point = self._check_server_hello(payload)
        identity_pub = fields["server_identity_pub"]
        th = crypto.v2_transcript(
            bytes.fromhex(self.client_ephemeral_pub),
            bytes.fromhex(self.nonce_c),
            bytes.fromhex(fields["server_ephemeral_pub"]),
            bytes.fromhex(fields["nonce_s"]),
            bytes.fromhex(identity_pub),
        )
        if not crypto.verify_ed25519(
            bytes.fromhex(identity_pub), crypto.v2_server_message(th), bytes.fromhex(fields["server_signature"])
        ):
            raise HandshakeError("invalid server signature")
        self._trust(identity_pub.lower())
        self.transcript = th
        self.k_c2s, self.k_s2c = crypto.v2_keys(th, crypto.ecdh(self._ephemeral, server_point))
        self._accept_server_hello(fields)
        return {"type": "client_auth", "payload": self.client_auth_payload()}

    def _trust(self, presented: str) -> None:
        """Apply the pinning rules of the class docstring to a verified key."""
        if self.server_key is not None:
            if presented != self.server_key:
                raise HandshakeError("server identity key does not match the given server_key")
            self.pin_status = "given"
        else:
            pinned = self.pins.get(self.server_address) if self.pins is not None else None
            if pinned is not None and pinned.lower() != presented:
                raise ServerKeyChanged(self.server_address, pinned.lower(), presented)
            self.pin_status = "pinned" if pinned is not None else "new"
        if self.pins is not None and self.pins.get(self.server_address) != presented:
            self.pins[self.server_address] = presented

    def client_message(self) -> bytes:
        """The bytes the user key signs: label ‖ TH ‖ user_id(32) ‖ device_id(36 ASCII)."""
        assert self.transcript is not None
        return crypto.v2_client_message(
            self.transcript, bytes.fromhex(self.identity.user_id), self.device_id.encode("ascii")
        )

    def client_auth_payload(self) -> Dict[str, Any]:
        """The v2 ``client_auth`` payload (no ``nonce_c2``; ``resume_from`` when set)."""
        payload = self._auth_payload(self.identity.sign_hex(self.client_message()))
        if self.resume_from is not None:
            payload["resume_from"] = self.resume_from
        return payload

    def codec(self) -> V2Codec:
        """The frame codec for this connection (after ``on_server_hello``): seal with k_c2s, open with k_s2c."""
        if self.k_c2s is None or self.k_s2c is None:
            raise HandshakeError("no channel keys before server_hello")
        return V2Codec(self.k_c2s, self.k_s2c)
