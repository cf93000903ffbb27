"""
The frame codecs and the close and decode exceptions of a client WebSocket,
kept apart from the socket (``pocketbridge.client.connection``, which
re-exports every name here) because they are sans-IO: a codec turns messages
into frame payloads and back, and knows nothing of Autobahn or the reactor.
"""

from __future__ import annotations

from typing import Any, Tuple

import orjson

from pocketbridge.protocol import crypto

#: The code reported when the TCP connection ended without a close frame.
ABNORMAL_CLOSE = 1006
#: The code reported for a close frame without a status code.
NO_STATUS = 1005

CloseInfo = Tuple[int, str]


class ConnectionClosed(Exception):
    """The WebSocket is closed; ``code`` and ``reason`` are what the server sent (or 1006)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        """``"<code> <reason>"``."""
        return "{} {}".format(self.code, self.reason).strip()


class MalformedMessage(Exception):
    """The server sent a frame that the codec could not decode."""


class DecryptFailed(MalformedMessage):
    """v2: a server frame was text, or failed AES-GCM authentication (§5)."""


class KeyRotationRequired(ConnectionClosed):
    """v2: the send counter would reach 2^32; the connection is closed, reconnect for fresh keys (§5)."""

    def __init__(self, reason: str = "Session key rotation required") -> None:
        super().__init__(1001, reason)


class JsonCodec:
    """v1 framing: one UTF-8 JSON document per frame, sent as text."""

    def encode(self, obj: Any) -> Tuple[bytes, bool]:
        """``(payload, is_binary)`` for one message."""
        return orjson.dumps(obj), False

    def decode(self, payload: bytes, is_binary: bool) -> Any:
        """The JSON value in a frame; MalformedMessage when it is not JSON."""
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as e:
            raise MalformedMessage("frame is not JSON") from e


class V2Codec:
    """
    v2 framing (PROTOCOL.md §5): every message is the UTF-8 JSON envelope
    sealed with AES-256-GCM into one binary frame; nonce = 4 zero bytes ‖ the
    8-byte big-endian counter of that direction, starting at 0.

    A client uses ``V2Codec(k_c2s, k_s2c)``; the same class with the keys
    swapped plays the server (tests). Not thread-safe; one per connection.
    """

    def __init__(self, send_key: bytes, receive_key: bytes) -> None:
        self._out = crypto.FrameCipher(send_key)
        self._in = crypto.FrameCipher(receive_key)

    @property
    def send_counter(self) -> int:
        """The counter the next sealed frame will use."""
        return self._out.counter

    @property
    def receive_counter(self) -> int:
        """The counter the next opened frame must have used."""
        return self._in.counter

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt any bytes as the next outgoing frame (tests use it for non-JSON plaintext)."""
        if self._out.counter >= crypto.MAX_FRAME_COUNTER - 1:
            raise KeyRotationRequired()
        return self._out.seal(plaintext)

    def open(self, ciphertext: bytes) -> bytes:
        """Decrypt the next incoming frame; DecryptFailed when it does not authenticate."""
        if self._in.counter >= crypto.MAX_FRAME_COUNTER - 1:
            raise DecryptFailed("receive counter exhausted")
        try:
            return self._in.open(ciphertext)
        except crypto.CryptoError as e:
            raise DecryptFailed("frame failed to decrypt") from e

    def encode(self, obj: Any) -> Tuple[bytes, bool]:
        """``(ciphertext, True)`` for one message."""
        return self.seal(orjson.dumps(obj)), True

    def decode(self, payload: bytes, is_binary: bool) -> Any:
        """The JSON value of a frame; DecryptFailed for a text frame or a bad tag."""
        if not is_binary:
            raise DecryptFailed("text frame on a v2 channel")
        plaintext = self.open(payload)
        try:
            return orjson.loads(plaintext)
        except orjson.JSONDecodeError as e:
            raise MalformedMessage("plaintext is not JSON") from e
