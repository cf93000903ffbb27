"""
The two narrow faces of a ``GatewayProtocol`` that the rest of the gateway
sees: ``_Conn`` is the ``Conn`` an attached ``Session`` writes to and pauses,
``_Gate`` the ``Gate`` admission reports to. They hold nothing but the
protocol and only forward to it, which is why they sit apart from the
adapter's own logic; ``adapter`` re-exports both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pocketbridge.protocol.wire import ProtocolError
    from pocketbridge.server.gateway.adapter import GatewayProtocol
    from pocketbridge.server.gateway.session import Session

__all__ = ["_Conn", "_Gate"]


class _Conn:
    """The ``Conn`` a Session uses, backed by the Autobahn protocol."""

    __slots__ = ("proto",)

    def __init__(self, proto: GatewayProtocol) -> None:
        self.proto = proto

    def send(self, data: bytes) -> None:
        self.proto.send_frame(data)

    def close(self, code: int, reason: str) -> None:
        self.proto.close(code, reason)

    def pause_reading(self) -> None:
        self.proto._apply_hold()  # the session set its reading_paused

    def resume_reading(self) -> None:
        self.proto._apply_hold()

    def send_pong(self, payload: bytes) -> None:
        self.proto.send_pong(payload)

    def pong_received(self) -> None:
        self.proto.pong_received()


class _Gate:
    """The ``Gate`` admission uses, backed by the Autobahn protocol."""

    __slots__ = ("proto",)

    def __init__(self, proto: GatewayProtocol) -> None:
        self.proto = proto

    def ended(self) -> bool:
        return self.proto.machine.ended or self.proto.state != self.proto.STATE_OPEN

    def fail(self, error: ProtocolError, result: str) -> None:
        self.proto._handshake_failed(error.code, error.reason, result)

    def close(self, error: ProtocolError) -> None:
        self.proto.close(error.code, error.reason)

    def attached(self, session: Session) -> None:
        self.proto._attached(session)

    def established(self, session: Session, frame: bytes, age: float, expires_at: int) -> None:
        self.proto._established(session, frame, age, expires_at)
