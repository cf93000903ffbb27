"""
``run_handshake``: one handshake object (``handshake.py``) driven over a
``RawConnection`` until ``session_established``.

The handshake classes are sans-IO so that the §13 vectors can be fed to them
directly; this is the one place their messages meet a socket. It is the same
for both protocol versions (v2 only adds a codec to install before
``client_auth``), so it is not part of a protocol strategy, and it is apart
from ``Client`` because it needs nothing of the client but the handshake.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from twisted.logger import Logger

from pocketbridge.client.connection import ConnectionClosed, RawConnection
from pocketbridge.client.handshake import HandshakeError, envelope_payload

__all__ = ["run_handshake"]

log = Logger()


async def run_handshake(raw: RawConnection, handshake: Any, timeout: Optional[float]) -> Dict[str, Any]:
    """
    The checked ``session_established`` payload of ``handshake`` run over
    ``raw``, waiting at most ``timeout`` s for each server message.

    On ``HandshakeError`` the socket is closed 1000; on anything but that or
    ``ConnectionClosed`` (a timeout, a cancellation, a bug) it is aborted, so
    that no socket is left half-open. The error is raised either way.
    """
    try:
        return await _exchange(raw, handshake, timeout)
    except HandshakeError:
        raw.close(1000, "handshake failed")
        raise
    except ConnectionClosed:
        raise
    except BaseException:
        raw.abort()
        raise


async def _exchange(raw: RawConnection, handshake: Any, timeout: Optional[float]) -> Dict[str, Any]:
    """The messages of the handshake; server messages of other types are logged and ignored."""
    raw.send_json(handshake.client_hello())
    while True:
        message = await raw.next_message(timeout=timeout)
        msg_type = message.get("type") if isinstance(message, dict) else None
        if msg_type == "server_hello":
            auth = handshake.on_server_hello(envelope_payload(message, "server_hello"))
            codec = handshake.codec() if hasattr(handshake, "codec") else None
            if codec is not None:
                raw.set_codec(codec)  # v2: client_auth is the first encrypted frame
            raw.send_json(auth)
        elif msg_type == "session_established":
            return handshake.on_session_established(envelope_payload(message, "session_established"))
        else:
            log.info("Ignoring {type!r} during the handshake", type=msg_type)
