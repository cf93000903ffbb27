"""
The PocketBridge client SDK (protocol v1 and v2).

- ``Identity`` / ``DeviceKeys``: the user's Ed25519 key and a device key file
  with the v2 server pins and ``last_received_seq`` (``keys``).
- ``RawConnection``: a WebSocket with a message queue and a frame codec
  (``JsonCodec`` for v1, ``V2Codec`` for the v2 AES-GCM channel), for tests
  and tools (``connection``).
- ``V1Handshake`` / ``V2Handshake``: the sans-IO handshakes (``handshake``).
- ``Client``: handshake, events and acks, catch-up (``client``), with what
  differs between the versions in one strategy object (``protocol_v1``,
  ``protocol_v2``; the seam in ``strategy``, the v2 bookkeeping in ``v2``)
  and its tuning in a frozen ``ClientOptions`` (``options``). New code uses
  ``Client.for_device(reactor, url, keys)`` or ``Client.v2(...)`` (v2);
  ``Client(...)`` alone still speaks v1 for existing callers.
- ``ReconnectingClient`` / ``RetryPolicy``: the §11 close-code policy (``reconnect``).

``encrypted_payload`` is whatever base64 the caller passes: the v2 channel
encrypts frames, and ``payload.PayloadKey`` encrypts payloads end to end with
a key derived from the user identity (the CLI uses it; ``docs/pairing.md``).
"""

from pocketbridge.client.acks import AckTracker
from pocketbridge.client.connection import (
    ConnectionClosed,
    DecryptFailed,
    JsonCodec,
    KeyRotationRequired,
    MalformedMessage,
    RawConnection,
    V2Codec,
)
from pocketbridge.client.handshake import HandshakeError, ServerKeyChanged, V1Handshake, V2Handshake
from pocketbridge.client.keys import DeviceKeys, Identity, KeyFileError, default_keys_path, server_address
from pocketbridge.client.reconnect import (
    DeviceRevoked,
    EventDeduper,
    ReconnectingClient,
    RetryDecision,
    RetryPolicy,
    parse_retry_after,
)
from pocketbridge.client.client import AUTO, DEFAULT_PROTOCOL_VERSION, OMIT, Client, ClientOptions
from pocketbridge.client.v2 import EventRejected

__all__ = [
    "AUTO",
    "AckTracker",
    "Client",
    "ClientOptions",
    "ConnectionClosed",
    "DEFAULT_PROTOCOL_VERSION",
    "DecryptFailed",
    "DeviceKeys",
    "DeviceRevoked",
    "EventDeduper",
    "EventRejected",
    "HandshakeError",
    "Identity",
    "JsonCodec",
    "KeyFileError",
    "KeyRotationRequired",
    "MalformedMessage",
    "OMIT",
    "RawConnection",
    "ReconnectingClient",
    "RetryDecision",
    "RetryPolicy",
    "ServerKeyChanged",
    "V1Handshake",
    "V2Codec",
    "V2Handshake",
    "default_keys_path",
    "parse_retry_after",
    "server_address",
]
