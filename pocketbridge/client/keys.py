"""
Client key material: the user's Ed25519 identity and the device key file.

v1 has no key exchange between devices: every device of a user holds the
same Ed25519 key (PROTOCOL.md §3), so "pairing" a second device means copying
the identity into a new device file with a fresh ``device_id``
(``DeviceKeys.for_new_device``).

The device file is JSON, written atomically with mode 0600. It holds the
user seed, so nothing in this module logs or ``repr``s it. It also holds the
v2 server pins (trust on first use, PROTOCOL.md §5): for each server address
``host:port``, the ``server_identity_pub`` seen on the first v2 handshake.
"""

from __future__ import annotations

import os
import stat
import uuid
from typing import Any, Dict, Optional
from urllib.parse import urlsplit

import orjson
from nacl.signing import SigningKey
from twisted.logger import Logger

from pocketbridge.protocol import crypto
from pocketbridge.protocol.wire import HEX64_RE, is_hex, is_uuid
from pocketbridge.client._util import MAX_DEVICE_SEQ, is_wire_int

log = Logger()

KEY_FILE_FORMAT = "pocketbridge-device-keys/1"
DEVICE_TYPES = ("desktop", "mobile", "tablet", "web", "cli")


class KeyFileError(Exception):
    """A device key file is missing, unreadable or malformed."""


def server_address(url: str) -> str:
    """
    The pin key of a server URL: ``host:port`` in lowercase, with the scheme's
    default port filled in (``ws://h/ws`` → ``h:80``; ``wss://h/ws`` → ``h:443``)
    and IPv6 hosts in brackets. The path does not matter: one server per port.
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = 443 if parts.scheme in ("wss", "https") else 80
    if ":" in host:
        host = "[{}]".format(host)
    return "{}:{}".format(host, port)


def default_keys_path() -> str:
    """``$XDG_CONFIG_HOME/pocketbridge/device.json`` (``~/.config`` by default)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "pocketbridge", "device.json")


class Identity:
    """
    A user's Ed25519 key pair. ``user_id`` is the lowercase hex64 public key.

    Immutable; safe to share between clients of the same user.
    """

    __slots__ = ("_key",)

    def __init__(self, signing_key: SigningKey) -> None:
        self._key = signing_key

    @classmethod
    def generate(cls) -> "Identity":
        """A new random identity."""
        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> "Identity":
        """The identity with this 32-byte Ed25519 seed."""
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        return cls(crypto.signing_key_from_seed(seed))

    @classmethod
    def from_seed_hex(cls, seed_hex: str) -> "Identity":
        """The identity with this hex64 seed."""
        if not is_hex(seed_hex, HEX64_RE):
            raise ValueError("an Ed25519 seed is 64 hex characters")
        return cls.from_seed(bytes.fromhex(seed_hex))

    @property
    def signing_key(self) -> SigningKey:
        """The PyNaCl signing key."""
        return self._key

    @property
    def user_id(self) -> str:
        """The public key as lowercase hex64: the protocol's ``user_id``."""
        return crypto.public_hex(self._key)

    @property
    def seed_hex(self) -> str:
        """The secret seed as hex64. Never log or print it."""
        return bytes(self._key).hex()

    def sign_hex(self, message: bytes) -> str:
        """The hex128 Ed25519 signature of ``message`` (for v1: a 32-byte digest)."""
        return self._key.sign(message).signature.hex()

    def __eq__(self, other: object) -> bool:
        """Identities are equal when their keys are."""
        return isinstance(other, Identity) and bytes(other._key) == bytes(self._key)

    def __hash__(self) -> int:
        """Hash of the public key."""
        return hash(self.user_id)

    def __repr__(self) -> str:
        """Shows the public key only."""
        return "Identity(user_id={})".format(self.user_id)


class DeviceKeys:
    """
    One device's key file: the user identity, ``device_id``, name and type,
    the next ``device_seq`` to use and the highest event ``seq`` received.

    ``next_device_seq`` only grows; callers reserve a value (and save) before
    sending an event with it, so a crash never reuses a seq with another
    event_id (the server would drop that as a conflict, PROTOCOL.md §6).

    ``server_pins`` maps a server address (``server_address(url)``) to the
    hex64 ``server_identity_pub`` pinned for it by a v2 handshake.
    """

    def __init__(
        self,
        identity: Identity,
        device_id: str,
        device_name: Optional[str] = None,
        device_type: str = "cli",
        next_device_seq: int = 1,
        last_received_seq: int = 0,
        server_pins: Optional[Dict[str, str]] = None,
    ) -> None:
        self.identity = identity
        self.device_id = device_id.lower()
        self.device_name = device_name
        self.device_type = device_type
        self.next_device_seq = next_device_seq
        self.last_received_seq = last_received_seq
        self.server_pins: Dict[str, str] = {k: v.lower() for k, v in (server_pins or {}).items()}

    @classmethod
    def generate(
        cls,
        device_name: Optional[str] = None,
        device_type: str = "cli",
        identity: Optional[Identity] = None,
    ) -> "DeviceKeys":
        """A new device (uuid4 ``device_id``) of ``identity`` or of a new user."""
        return cls(
            identity if identity is not None else Identity.generate(),
            str(uuid.uuid4()),
            device_name=device_name,
            device_type=device_type,
        )

    def for_new_device(self, device_name: Optional[str] = None, device_type: str = "cli") -> "DeviceKeys":
        """Another device of the same user: same identity, new ``device_id``, fresh counters, no pins."""
        return DeviceKeys.generate(device_name=device_name, device_type=device_type, identity=self.identity)

    @property
    def user_id(self) -> str:
        """The user's hex64 public key."""
        return self.identity.user_id

    def pinned_server_key(self, url: str) -> Optional[str]:
        """The server key pinned for ``url``'s address, or None (not yet seen)."""
        return self.server_pins.get(server_address(url))

    def pin_server_key(self, url: str, server_identity_pub: str) -> None:
        """Pin (or, deliberately, re-pin) the server key for ``url``'s address. Call ``save`` after."""
        self.server_pins[server_address(url)] = server_identity_pub.lower()

    def to_dict(self) -> Dict[str, Any]:
        """The JSON document stored on disk (contains the secret seed)."""
        return {
            "format": KEY_FILE_FORMAT,
            "user_id": self.identity.user_id,
            "user_seed": self.identity.seed_hex,
            "device_id": self.device_id,
            "device_name": self.device_name,
            "device_type": self.device_type,
            "next_device_seq": self.next_device_seq,
            "last_received_seq": self.last_received_seq,
            "server_pins": dict(sorted(self.server_pins.items())),
        }

    @classmethod
    def from_dict(cls, doc: Any) -> "DeviceKeys":
        """Parse and check a stored document; KeyFileError when it is malformed."""
        if not isinstance(doc, dict) or doc.get("format") != KEY_FILE_FORMAT:
            raise KeyFileError("not a PocketBridge device key file")
        try:
            identity = Identity.from_seed_hex(doc["user_seed"])
        except (KeyError, ValueError) as e:
            raise KeyFileError("invalid user_seed") from e
        stored_user = doc.get("user_id", identity.user_id)
        if not isinstance(stored_user, str) or stored_user.lower() != identity.user_id:
            raise KeyFileError("user_id does not match user_seed")
        device_id = doc.get("device_id")
        if not is_uuid(device_id):
            raise KeyFileError("invalid device_id")
        name = doc.get("device_name")
        dtype = doc.get("device_type", "cli")
        if name is not None and not isinstance(name, str):
            raise KeyFileError("invalid device_name")
        if not isinstance(dtype, str):
            raise KeyFileError("invalid device_type")
        counters = []
        for field, low in (("next_device_seq", 1), ("last_received_seq", 0)):
            value = doc.get(field, low)
            if not is_wire_int(value) or not low <= value <= MAX_DEVICE_SEQ + 1:
                raise KeyFileError("invalid " + field)
            counters.append(value)
        pins = doc.get("server_pins", {})
        if not isinstance(pins, dict) or not all(
            isinstance(k, str) and k and is_hex(v, HEX64_RE) for k, v in pins.items()
        ):
            raise KeyFileError("invalid server_pins")
        return cls(identity, device_id, name, dtype, counters[0], counters[1], pins)

    def save(self, path: str) -> None:
        """
        Write the file atomically (temp file, fsync, rename) with mode 0600,
        creating the directory with mode 0700. Blocking file I/O: call it
        before or after the reactor's busy work, not from a hot path.
        """
        path = os.path.expanduser(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        data = orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2) + b"\n"
        tmp = "{}.tmp-{}".format(path, os.getpid())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to an existing tmp file
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "DeviceKeys":
        """Read a key file written by ``save``; KeyFileError when it is unusable."""
        path = os.path.expanduser(path)
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                raw = f.read()
        except FileNotFoundError as e:
            raise KeyFileError("no key file at {} (run `pocketbridge-cli keygen`)".format(path)) from e
        except OSError as e:
            raise KeyFileError("cannot read {}: {}".format(path, e.strerror)) from e
        if stat.S_IMODE(mode) & 0o077:
            log.warn("Key file {path} is readable by other users; it should be mode 0600", path=path)
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise KeyFileError("{} is not valid JSON".format(path)) from e
        return cls.from_dict(doc)

    def __repr__(self) -> str:
        """Shows ids, never the seed."""
        return "DeviceKeys(user_id={}, device_id={})".format(self.user_id, self.device_id)
