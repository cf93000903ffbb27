"""
Outbound accounting of one WebSocket connection (PROTOCOL.md §12, "v1
outbound buffer" and "unsent bytes held before authentication").

Every byte the gateway hands to its transport goes through ``Outbound``:
``admit`` says whether the bytes still fit under the connection's ceiling and
``wrote`` counts them. Both are O(1): the unsent amount is read from the TCP
transport's own running counters (its list buffer keeps a running length),
never summed over the buffer. Delivery pauses once, when the unsent bytes pass
``outbound_pause_bytes``; one timer per connection is armed then and ticks
until the buffer is below ``outbound_resume_bytes`` (resume) or no byte has
left it for ``slow_consumer_timeout`` (stall). Reactor thread only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from pocketbridge.server import metrics
from pocketbridge.server.gateway.connection import SESSION, ConnectionMachine, State

if TYPE_CHECKING:
    from pocketbridge.server.gateway.session import Session

#: Seconds between checks of a paused connection's buffer (at most).
TICK = 1.0


def tcp_transport(transport: Any) -> Optional[Any]:
    """The transport whose send buffer holds this connection's bytes (under TLS, the one below), if known."""
    for t in (transport, getattr(transport, "transport", None)):
        if t is not None and all(hasattr(t, a) for a in ("dataBuffer", "offset", "_tempDataLen")):
            return t
    return None


def buffered(tcp: Any) -> int:
    """Bytes waiting in a Twisted ``FileDescriptor``'s send buffer, in O(1)."""
    return len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen


@implementer(IPushProducer)
class Outbound:
    """
    The unsent bytes of one connection and its flow control.

    Registered as the transport's streaming producer: Twisted calls
    ``pauseProducing`` on every write while its buffer is over its own size
    (a no-op here) and ``resumeProducing`` when the buffer is empty.
    """

    # One per connection: slots, and the connection it reports to rather than
    # a bound method per callback.
    __slots__ = ("tcp", "clock", "limit", "pause_bytes", "resume_bytes", "stall_timeout", "owner", "flow", "written",
                 "drained_mark", "paused", "timer", "progress_at", "progress_drained")

    def __init__(
        self, transport: Any, clock: Any, limit: int, pause_bytes: int, resume_bytes: int, stall_timeout: float,
        owner: "FlowControl",
    ) -> None:
        self.tcp = tcp_transport(transport)
        self.clock = clock
        self.limit = limit  # unsent bytes past which a write is refused
        self.pause_bytes = pause_bytes
        self.resume_bytes = min(resume_bytes, pause_bytes)
        self.stall_timeout = stall_timeout
        self.owner = owner  # told when delivery pauses, resumes or stalls
        self.flow = False  # pause/resume delivery (after authentication)
        self.written = 0  # bytes handed to the transport, ever
        self.drained_mark = 0  # without a known buffer: ``written`` when it was last empty
        self.paused = False
        self.timer: Any = None
        self.progress_at = 0.0
        self.progress_drained = 0

    def unsent(self) -> int:
        """Bytes written and not yet sent to the peer (an upper bound on unknown transports)."""
        if self.tcp is not None:
            return buffered(self.tcp)
        return self.written - self.drained_mark

    def admit(self, n: int) -> bool:
        """True when ``n`` more bytes stay within the ceiling."""
        return self.unsent() + n <= self.limit

    def wrote(self, n: int) -> None:
        """``n`` bytes were handed to the transport; pause delivery when over the pause size."""
        self.written += n
        if self.flow and not self.paused and self.unsent() > self.pause_bytes:
            self.paused = True
            self.progress_at = self.clock.seconds()
            self.progress_drained = self.written - self.unsent()
            self.timer = self.clock.callLater(min(TICK, self.stall_timeout), self._tick)
            self.owner._outbound_paused()

    def _tick(self) -> None:
        self.timer = None
        if not self.paused:
            return
        unsent = self.unsent()
        if unsent < self.resume_bytes:
            self._resume()
            return
        drained = self.written - unsent
        now = self.clock.seconds()
        if drained > self.progress_drained:
            self.progress_drained = drained
            self.progress_at = now
        elif now - self.progress_at >= self.stall_timeout:
            self.paused = False
            self.owner._outbound_stalled()
            return
        self.timer = self.clock.callLater(min(TICK, self.stall_timeout), self._tick)

    def _resume(self) -> None:
        self.paused = False
        self._cancel()
        self.owner._outbound_resumed()

    def _cancel(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def stop(self) -> None:
        """The connection is gone: release the timer."""
        self.paused = False
        self.flow = False
        self._cancel()

    # IPushProducer, called by the transport

    def pauseProducing(self) -> None:
        """Called on every write while the transport's buffer is over its size: nothing to do."""

    def resumeProducing(self) -> None:
        """The transport's buffer is empty."""
        self.drained_mark = self.written
        if self.paused:
            self._resume()

    def stopProducing(self) -> None:
        self.stop()


class FlowControl:
    """
    The gateway protocol's byte flow, mixed in before Autobahn's protocol:
    every write goes through ``Outbound`` (the ceiling, then the count), and
    reading stops for real while held: Autobahn handles every frame buffered
    from one read in a single loop, so ``processData`` refuses to go on and
    the frames wait, unparsed, until reading resumes.

    Reading is held while the connection machine is ADMITTING, and while an
    attached session has paused its reading (JOINING, LIVE); never once the
    close frame is sent. Expects the gateway's ``machine``, ``outbound``,
    ``session``, ``read_held``, ``in_rx``, ``_drop`` and ``reading_paused``.
    """

    machine: ConnectionMachine
    outbound: Optional[Outbound]
    session: Optional["Session"]
    read_held: bool
    in_rx: bool
    transport: Any
    state: int
    data: bytes
    STATE_CLOSED: int

    def _drop(self) -> None:
        raise NotImplementedError

    def reading_paused(self, paused: bool) -> None:
        raise NotImplementedError

    # -------------------------------------------------------------- bytes out

    def sendData(self, data: bytes, sync: bool = False, chopsize: Optional[int] = None) -> None:
        """Every write of the connection: within the outbound ceiling, never after the socket is gone."""
        phase = self.machine.state
        if phase in (State.ABORTED, State.GONE) or self.transport is None or self.state == self.STATE_CLOSED:
            return
        out = self.outbound
        # Once CLOSING, the only write is our close frame: it goes out even past the ceiling.
        if out is not None and phase is not State.CLOSING and not out.admit(len(data)):
            self._over_ceiling()
            return
        super().sendData(data, sync, chopsize)  # type: ignore[misc]
        if out is not None:
            out.wrote(len(data))

    def _over_ceiling(self) -> None:
        """More unsent bytes than allowed: 4008 after authentication, dropped before (§12)."""
        if self.machine.state is State.LIVE and self.session is not None:
            metrics.LIMIT_HITS.labels(limit="outbound_bytes").inc()
            self.session.close(4008, "Slow consumer")
        else:
            metrics.LIMIT_HITS.labels(limit="preauth_outbound_bytes").inc()
            self._drop()

    def _outbound_paused(self) -> None:
        if self.session is not None:
            self.session.outbound_paused()

    def _outbound_resumed(self) -> None:
        if self.session is not None and self.machine.state is not State.GONE:
            self.session.outbound_resumed()

    def _outbound_stalled(self) -> None:
        session = self.session
        if session is not None and self.machine.state is not State.GONE:
            metrics.LIMIT_HITS.labels(limit="outbound_stall").inc()
            session.close(4008, "Slow consumer")

    # -------------------------------------------------------------- bytes in

    def _dataReceived(self, data: bytes) -> None:
        self.in_rx = True
        try:
            super()._dataReceived(data)  # type: ignore[misc]
        finally:
            self.in_rx = False

    def processData(self) -> bool:
        """Autobahn handles all buffered frames in one loop; stop it while reading is held."""
        if self.read_held:
            return False
        return bool(super().processData())  # type: ignore[misc]

    def _hold_wanted(self) -> bool:
        phase = self.machine.state
        if phase is State.ADMITTING:
            return True
        return phase in SESSION and self.session is not None and bool(self.session.reading_paused)

    def _apply_hold(self) -> None:
        """Pause or resume the transport as the state says; on resume, handle frames already buffered."""
        held = self._hold_wanted()
        if self.machine.state is State.GONE or self.transport is None or held == self.read_held:
            return
        self.read_held = held
        transport: Any = self.transport
        if held:
            transport.pauseProducing()
            self.reading_paused(True)
            return
        transport.resumeProducing()
        self.reading_paused(False)
        if self.data and not self.in_rx:
            self.in_rx = True
            try:
                self.consumeData()  # type: ignore[attr-defined]
            finally:
                self.in_rx = False
