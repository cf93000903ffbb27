"""
The PocketBridge client SDK (protocol v1).

- ``Identity`` / ``DeviceKeys``: the user's Ed25519 key and a device key file (``keys``).
- ``RawConnection``: a WebSocket with a message queue, for tests and tools (``connection``).
- ``Client``: handshake, events and acks, replay (``session``).
- ``ReconnectingClient`` / ``RetryPolicy``: the §11 close-code policy (``reconnect``).

v1 has no end-to-end encryption in the SDK yet: ``encrypted_payload`` is
whatever base64 the caller passes. The v2 channel and payload encryption
slot in as another handshake class and frame codec.
"""

from pocketbridge.client.acks import AckTracker
from pocketbridge.client.connection import ConnectionClosed, JsonCodec, MalformedMessage, RawConnection
from pocketbridge.client.handshake import HandshakeError, V1Handshake
from pocketbridge.client.keys import DeviceKeys, Identity, KeyFileError, default_keys_path
from pocketbridge.client.reconnect import (
    DeviceRevoked,
    EventDeduper,
    ReconnectingClient,
    RetryDecision,
    RetryPolicy,
    parse_retry_after,
)
from pocketbridge.client.session import OMIT, Client

__all__ = [
    "AckTracker",
    "Client",
    "ConnectionClosed",
    "DeviceKeys",
    "DeviceRevoked",
    "EventDeduper",
    "HandshakeError",
    "Identity",
    "JsonCodec",
    "KeyFileError",
    "MalformedMessage",
    "OMIT",
    "RawConnection",
    "ReconnectingClient",
    "RetryDecision",
    "RetryPolicy",
    "V1Handshake",
    "default_keys_path",
    "parse_retry_after",
]
