"""
The lifecycle of one WebSocket connection as an explicit machine (a
transition table, like magic-wormhole's ``_mailbox.py``): docs/architecture.md,
"The connection lifecycle".

The machine knows nothing of Autobahn: the gateway feeds it inputs
(``Input``) and asks it what the connection may do now (read, send, hand a
frame to the session). Every timer is armed through ``call_later`` and
belongs to a set of states: it is cancelled as soon as the machine enters a
state outside that set. Reactor thread only.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple


class State(enum.Enum):
    """Where a connection is in its life."""

    UPGRADING = "upgrading"  # HTTP upgrade under way (per-IP limits, failure token)
    AWAIT_HELLO = "await_hello"  # open; waiting for client_hello
    AWAIT_AUTH = "await_auth"  # server_hello sent; waiting for client_auth
    ADMITTING = "admitting"  # client_auth valid; socket slot claimed, subscribed, registered + head read; reading held
    JOINING = "joining"  # session attached to the connection; session_established about to be sent
    LIVE = "live"  # session_established sent: heartbeat and session expiry run
    CLOSING = "closing"  # our close frame is sent; waiting for the peer (or the drop timer)
    ABORTED = "aborted"  # TCP aborted; waiting for Autobahn's onClose
    GONE = "gone"  # onClose: nothing more happens


class Input(enum.Enum):
    """What can happen to a connection."""

    OPENED = "opened"  # upgrade answered with a failure token at hand
    HELLO = "hello"  # a valid client_hello was answered
    AUTH = "auth"  # a valid client_auth arrived
    ATTACHED = "attached"  # the session is attached (frames go to it from now on)
    ESTABLISHED = "established"  # session_established was sent
    CLOSE = "close"  # we send a close frame
    HEARTBEAT_LOST = "heartbeat_lost"  # no pong within heartbeat_timeout: close 1008
    DROP = "drop"  # abort the TCP connection without a close handshake
    LOST = "lost"  # Autobahn's onClose


class InvalidTransition(Exception):
    """An input that cannot happen in the current state (a bug in the caller)."""


#: The states of the opening handshake (its deadline runs through them).
HANDSHAKE: FrozenSet[State] = frozenset({State.AWAIT_HELLO, State.AWAIT_AUTH, State.ADMITTING})
#: The states before session_established in which a close drops the TCP after preauth_close_grace.
PRE_LIVE: FrozenSet[State] = frozenset(
    {State.UPGRADING, State.AWAIT_HELLO, State.AWAIT_AUTH, State.ADMITTING, State.JOINING})
#: LIVE alone (the heartbeat's and the session expiry's timers).
LIVE: FrozenSet[State] = frozenset({State.LIVE})
#: The states in which a session is attached.
SESSION: FrozenSet[State] = frozenset({State.JOINING, State.LIVE})
#: The states in which the connection is open for frames and writes.
OPEN: FrozenSet[State] = frozenset(
    {State.AWAIT_HELLO, State.AWAIT_AUTH, State.ADMITTING, State.JOINING, State.LIVE})

_S = State
_I = Input
#: (state, input) -> next state; ``None``: the input is ignored in that state.
#: A pair that is not listed is a bug (``InvalidTransition``).
TRANSITIONS: Dict[Tuple[State, Input], Optional[State]] = {
    (_S.UPGRADING, _I.OPENED): _S.AWAIT_HELLO,
    (_S.AWAIT_HELLO, _I.HELLO): _S.AWAIT_AUTH,
    (_S.AWAIT_AUTH, _I.AUTH): _S.ADMITTING,
    (_S.ADMITTING, _I.ATTACHED): _S.JOINING,
    (_S.JOINING, _I.ESTABLISHED): _S.LIVE,
    (_S.LIVE, _I.HEARTBEAT_LOST): _S.CLOSING,
    (_S.CLOSING, _I.CLOSE): None,
    (_S.CLOSING, _I.HEARTBEAT_LOST): None,
    (_S.ABORTED, _I.CLOSE): None,
    (_S.ABORTED, _I.HEARTBEAT_LOST): None,
    (_S.ABORTED, _I.DROP): None,
}
for _state in PRE_LIVE | {_S.LIVE}:
    TRANSITIONS[(_state, _I.CLOSE)] = _S.CLOSING
for _state in PRE_LIVE | {_S.LIVE, _S.CLOSING}:
    TRANSITIONS[(_state, _I.DROP)] = _S.ABORTED
for _state in State:
    TRANSITIONS[(_state, _I.LOST)] = None if _state is _S.GONE else _S.GONE
for _input in Input:
    TRANSITIONS.setdefault((_S.GONE, _input), None)
del _state, _input

#: Each state alone (the default states of a timer), built once rather than per timer.
_ONLY: Dict[State, FrozenSet[State]] = {_s: frozenset({_s}) for _s in State}

#: Seconds before an unanswered "Heartbeat timeout" close drops the TCP connection.
HEARTBEAT_CLOSE_GRACE = 5.0


class _Timer:
    """
    One armed timer, and the function its DelayedCall runs: firing forgets
    the timer, then calls ``fn(*args)``. Being the callable itself, it keeps
    a timer down to this object and the DelayedCall (no closure and cells
    per timer; a LIVE connection holds two or three for hours).
    """

    __slots__ = ("machine", "states", "fn", "args", "call")

    def __init__(self, machine: "ConnectionMachine", states: FrozenSet[State], fn: Callable[..., Any],
                 args: Tuple[Any, ...]) -> None:
        self.machine = machine
        self.states = states
        self.fn = fn
        self.args = args
        self.call: Any = None

    def __call__(self) -> None:
        self.machine.timers.remove(self)
        self.fn(*self.args)

    def __repr__(self) -> str:  # what a DelayedCall shows for its function
        return "<timer {!r}>".format(self.fn)


class ConnectionMachine:
    """
    One connection's state and the timers that belong to it.

    ``on_enter`` is called with (old state, new state, input) after each
    transition, once the timers of the old state are cancelled; the gateway
    does the work of the transition there (metrics, reading, drop timers).
    """

    __slots__ = ("clock", "state", "on_enter", "reached", "timers")  # one per connection: no __dict__

    def __init__(self, clock: Any, on_enter: Callable[[State, State, Input], None]) -> None:
        self.clock = clock
        self.state = State.UPGRADING
        self.on_enter = on_enter
        #: The last state before CLOSING, ABORTED or GONE (what the connection had reached).
        self.reached = State.UPGRADING
        self.timers: List[_Timer] = []

    def feed(self, event: Input) -> bool:
        """Apply ``event``; True when the state changed, False when it was ignored."""
        try:
            new = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise InvalidTransition("{} in {}".format(event.name, self.state.name)) from None
        if new is None:
            return False
        old = self.state
        self.state = new
        if new in OPEN or new is State.UPGRADING:
            self.reached = new
        self._cancel_timers_outside(new)
        self.on_enter(old, new, event)
        return True

    def accepts(self, event: Input) -> bool:
        """True when ``event`` would change the state now."""
        return TRANSITIONS.get((self.state, event)) is not None

    def call_later(self, seconds: float, fn: Callable[..., Any], *args: Any,
                   states: Optional[FrozenSet[State]] = None) -> Any:
        """
        Arm a timer that lives while the machine stays in ``states`` (default:
        the current state); its DelayedCall, or None (nothing armed) when the
        machine is not in ``states`` now (it left them while the caller ran).
        """
        live_in = states if states is not None else _ONLY[self.state]
        if self.state not in live_in:
            return None
        timer = _Timer(self, live_in, fn, args)
        timer.call = self.clock.callLater(seconds, timer)
        self.timers.append(timer)
        return timer.call

    def pending(self) -> List[Any]:
        """The DelayedCalls armed and not yet fired or cancelled (tests and introspection)."""
        return [t.call for t in self.timers]

    def _cancel_timers_outside(self, state: State) -> None:
        keep = []
        for t in self.timers:
            if state in t.states:
                keep.append(t)
            elif t.call.active():
                t.call.cancel()
        self.timers = keep

    # ------------------------------------------------------------ questions

    @property
    def is_open(self) -> bool:
        """Frames are handled and writes made (the upgrade is done, no close sent, not gone)."""
        return self.state in OPEN

    @property
    def has_session(self) -> bool:
        """A session is attached and handles the frames."""
        return self.state in SESSION

    @property
    def ended(self) -> bool:
        """Closing, aborted or gone: a handshake step that awaited must stop."""
        return self.state in (State.CLOSING, State.ABORTED, State.GONE)


class Heartbeat:
    """
    The server's pings of a LIVE connection (PROTOCOL.md §1): one every
    ``interval`` seconds; ``lost`` is called once no pong came for
    ``timeout`` seconds, not counting time the connection's reading was
    paused (a paused socket cannot read the pong). Its timer belongs to LIVE.
    """

    __slots__ = ("machine", "interval", "timeout", "send_ping", "lost", "last_pong", "paused_since", "paused_total")

    def __init__(self, machine: ConnectionMachine, interval: float, timeout: float,
                 send_ping: Callable[[], None], lost: Callable[[], None]) -> None:
        self.machine = machine
        self.interval = interval
        self.timeout = timeout
        self.send_ping = send_ping
        self.lost = lost
        self.last_pong = 0.0
        self.paused_since: Optional[float] = None
        self.paused_total = 0.0

    def start(self) -> None:
        """LIVE: count from now, ping every ``interval``."""
        self.last_pong = self.machine.clock.seconds()
        self._schedule()

    def pong(self) -> None:
        """A pong was read."""
        self.last_pong = self.machine.clock.seconds()
        self.paused_total = 0.0
        if self.paused_since is not None:
            self.paused_since = self.last_pong

    def reading_paused(self, paused: bool) -> None:
        """Bookkeeping so paused time does not count against the heartbeat."""
        now = self.machine.clock.seconds()
        if paused and self.paused_since is None:
            self.paused_since = now
        elif not paused and self.paused_since is not None:
            self.paused_total += now - self.paused_since
            self.paused_since = None

    def _schedule(self) -> None:
        self.machine.call_later(self.interval, self._ping, states=LIVE)

    def _ping(self) -> None:
        now = self.machine.clock.seconds()
        paused = self.paused_total + (now - self.paused_since if self.paused_since is not None else 0.0)
        if now - self.last_pong - paused > self.timeout:
            self.lost()
            return
        self.send_ping()
        self._schedule()
