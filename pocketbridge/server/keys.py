"""
The server's long-term Ed25519 identity key.

From ``SERVER_PRIVATE_KEY_HEX`` (the 32-byte seed, or seed‖public as 64 bytes)
and ``SERVER_PUBLIC_KEY_HEX`` when set; otherwise generated once and kept in
the data dir with mode 0600. Only the public key is ever logged.
"""

from __future__ import annotations

import hmac
import os
import re
from typing import Mapping, Optional

from nacl.signing import SigningKey

from pocketbridge.server.config import ConfigError

KEY_FILE = "server_identity.key"


def _from_env(private_hex: str, public_hex: Optional[str]) -> SigningKey:
    raw = private_hex.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}|[0-9a-f]{128}", raw):
        raise ConfigError("SERVER_PRIVATE_KEY_HEX: must be 64 hex characters (seed) or 128 (seed and public key)")
    key = SigningKey(bytes.fromhex(raw[:64]))
    derived = bytes(key.verify_key).hex()
    if len(raw) == 128 and not hmac.compare_digest(raw[64:], derived):
        raise ConfigError("SERVER_PRIVATE_KEY_HEX: its public half does not match its seed")
    if public_hex is not None:
        pub = public_hex.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", pub):
            raise ConfigError("SERVER_PUBLIC_KEY_HEX: must be 64 hex characters")
        if not hmac.compare_digest(pub, derived):
            raise ConfigError("SERVER_PUBLIC_KEY_HEX: does not match SERVER_PRIVATE_KEY_HEX")
    return key


def load_server_key(data_dir: str, environ: Mapping[str, str]) -> SigningKey:
    """The server identity key, from the environment or the data dir (created once)."""
    private_hex = environ.get("SERVER_PRIVATE_KEY_HEX")
    public_hex = environ.get("SERVER_PUBLIC_KEY_HEX")
    if private_hex:
        return _from_env(private_hex, public_hex)
    if public_hex:
        raise ConfigError("SERVER_PUBLIC_KEY_HEX: set without SERVER_PRIVATE_KEY_HEX")
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError("--data-dir: cannot create {!r}: {}".format(data_dir, e.strerror)) from None
    path = os.path.join(data_dir, KEY_FILE)
    if os.path.exists(path):
        try:
            with open(path, "r", encoding="ascii") as f:
                seed = f.read().strip()
            return SigningKey(bytes.fromhex(seed))
        except (OSError, ValueError) as e:
            raise ConfigError("--data-dir: unreadable server key file {}: {}".format(path, e)) from None
    key = SigningKey.generate()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(bytes(key).hex() + "\n")
    except OSError as e:
        raise ConfigError("--data-dir: cannot write the server key in {!r}: {}".format(data_dir, e.strerror)) from None
    return key
