"""
The connection lifecycle machine (issue 10 item 1; docs/architecture.md,
"The connection lifecycle"), in memory: every (state, input) pair of the
transition table does what the table says, timers die with the states they
belong to, and a real gateway connection walks the machine through a v1 and
a v2 handshake, closes, drops and losses. No sockets, no sleeps.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.server import metrics

from pocketbridge.protocol import wire
from pocketbridge.client.handshake import V1Handshake, V2Handshake
from pocketbridge.client.keys import Identity
from pocketbridge.server.gateway.connection import (
    HANDSHAKE, TRANSITIONS, ConnectionMachine, Input, InvalidTransition, State,
)
from pocketbridge.server.gateway.adapter import GatewayProtocol, make_factory
from pocketbridge.server.storage import DeviceState
from tests.conn_fakes import (
    DEVICE, UPGRADE, FakeTCP, HandshakeStorage, HeldPresence, client_frame, close_code, connect, device_state,
    hold_established, make_node, send_auth, server_frames, text,
)

#: Inputs that lead from UPGRADING to each state.
PATHS: Dict[State, List[Input]] = {
    State.UPGRADING: [],
    State.AWAIT_HELLO: [Input.OPENED],
    State.AWAIT_AUTH: [Input.OPENED, Input.HELLO],
    State.ADMITTING: [Input.OPENED, Input.HELLO, Input.AUTH],
    State.JOINING: [Input.OPENED, Input.HELLO, Input.AUTH, Input.ATTACHED],
    State.LIVE: [Input.OPENED, Input.HELLO, Input.AUTH, Input.ATTACHED, Input.ESTABLISHED],
    State.CLOSING: [Input.OPENED, Input.CLOSE],
    State.ABORTED: [Input.OPENED, Input.DROP],
    State.GONE: [Input.LOST],
}


def machine_in(state: State, clock: Clock) -> Tuple[ConnectionMachine, List[Tuple[State, State, Input]]]:
    """A machine walked to ``state``, and the list its on_enter calls go to from then on."""
    entered: List[Tuple[State, State, Input]] = []
    m = ConnectionMachine(clock, lambda old, new, event: entered.append((old, new, event)))
    for event in PATHS[state]:
        m.feed(event)
    assert m.state is state, (m.state, state)
    entered.clear()
    return m, entered


class TransitionTableTests(SynchronousTestCase):
    """The machine does exactly what its table says, for every state and input."""

    def test_every_pair_of_the_table(self) -> None:
        """Each (state, input): the listed next state (on_enter once), ignored (no call), or InvalidTransition."""
        for state in State:
            for event in Input:
                m, entered = machine_in(state, Clock())
                if (state, event) not in TRANSITIONS:
                    self.assertRaises(InvalidTransition, m.feed, event)
                    self.assertIs(m.state, state)
                    continue
                new = TRANSITIONS[(state, event)]
                changed = m.feed(event)
                if new is None:
                    self.assertFalse(changed, (state, event))
                    self.assertIs(m.state, state)
                    self.assertEqual(entered, [])
                else:
                    self.assertTrue(changed, (state, event))
                    self.assertIs(m.state, new)
                    self.assertEqual(entered, [(state, new, event)])

    def test_every_state_is_reachable_and_every_state_reaches_gone(self) -> None:
        """The table's graph: all states reachable from UPGRADING, GONE reachable from all."""
        edges = {(s, n) for (s, _), n in TRANSITIONS.items() if n is not None}
        reach = {State.UPGRADING}
        while True:
            more = {n for s, n in edges if s in reach} - reach
            if not more:
                break
            reach |= more
        self.assertEqual(reach, set(State))
        for state in State:
            if state is not State.GONE:
                self.assertIn((state, State.GONE), edges)

    def test_timers_of_a_state_are_cancelled_when_it_is_left(self) -> None:
        """For every transition, a timer of the old state is cancelled; one that also belongs to the new state survives."""
        for (state, event), new in TRANSITIONS.items():
            if new is None:
                continue
            clock = Clock()
            m, _ = machine_in(state, clock)
            own = m.call_later(10, lambda: None)
            shared = m.call_later(10, lambda: None, states=frozenset({state, new}))
            m.feed(event)
            self.assertFalse(own.active(), (state, event))
            self.assertTrue(shared.active(), (state, event))
            self.assertEqual(m.pending(), [shared])
            self.assertEqual(clock.getDelayedCalls(), [shared])

    def test_a_fired_timer_is_forgotten(self) -> None:
        """A timer that fired runs once and leaves nothing pending."""
        clock = Clock()
        m, _ = machine_in(State.AWAIT_HELLO, clock)
        fired: List[int] = []
        m.call_later(1, fired.append, 1, states=HANDSHAKE)
        clock.advance(1)
        self.assertEqual(fired, [1])
        self.assertEqual(m.pending(), [])
        m.feed(Input.HELLO)
        self.assertEqual(fired, [1])

    def test_no_timer_for_states_already_left(self) -> None:
        """A timer asked for states the machine is not in is not armed (it could never be cancelled by leaving them)."""
        clock = Clock()
        m, _ = machine_in(State.CLOSING, clock)
        self.assertIsNone(m.call_later(5, lambda: None, states=HANDSHAKE))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_reached_is_the_last_open_state(self) -> None:
        """``reached`` keeps the state a connection got to before it closed, dropped or was lost."""
        m, _ = machine_in(State.LIVE, Clock())
        m.feed(Input.CLOSE)
        m.feed(Input.DROP)
        m.feed(Input.LOST)
        self.assertIs(m.reached, State.LIVE)
        m, _ = machine_in(State.JOINING, Clock())
        m.feed(Input.LOST)
        self.assertIs(m.reached, State.JOINING)


def device(user_id: str, revoked_at: Optional[int] = None) -> DeviceState:
    return device_state(user_id, DEVICE, revoked_at)


def gauge(state: str) -> float:
    return float(metrics.CONNECTIONS.labels(state=state)._value.get())


class GatewayLifecycleTests(SynchronousTestCase):
    """A gateway connection walks the machine as the client and the storage act; each state's timers go with it."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.node = make_node(self.clock)
        self.storage = HandshakeStorage()
        self.node.storage = self.storage
        self.node.cursors.storage = self.storage
        self.identity = Identity.generate()

    def frames(self, tcp: FakeTCP) -> List[Tuple[int, bytes]]:
        return server_frames(tcp.written())

    def to_admitting(self, version: int = 1) -> Tuple[GatewayProtocol, FakeTCP, Any]:
        """A connection that sent a valid client_auth (the registration read not answered yet)."""
        proto, tcp = connect(self.node, self.clock)
        self.assertIs(proto.machine.state, State.AWAIT_HELLO)
        hs: Any = V1Handshake(self.identity, DEVICE) if version == 1 else V2Handshake(self.identity, DEVICE)
        codec = send_auth(proto, tcp, hs)
        self.assertIs(proto.machine.state, State.ADMITTING)
        return proto, tcp, codec

    def to_live(self, version: int = 1) -> Tuple[GatewayProtocol, FakeTCP, Any]:
        proto, tcp, codec = self.to_admitting(version)
        self.storage.registrations[0].callback((device(self.identity.user_id), True, 0, 0))
        self.assertIs(proto.machine.state, State.LIVE)
        return proto, tcp, codec

    def test_opened_arms_the_handshake_deadline(self) -> None:
        """UPGRADING -> AWAIT_HELLO: the connection is listed and counted, and the handshake deadline runs (1008 at 30 s)."""
        before = gauge("open")
        proto, tcp = connect(self.node, self.clock)
        self.assertIs(proto.machine.state, State.AWAIT_HELLO)
        self.assertIn(proto, self.node.connections)
        self.assertEqual(gauge("open") - before, 1)
        self.assertEqual(len(proto.machine.pending()), 1)
        self.clock.advance(29.9)
        self.assertIsNone(close_code(self.frames(tcp)))
        self.clock.advance(0.2)
        self.assertEqual(close_code(self.frames(tcp)), 1008)
        self.assertIs(proto.machine.state, State.CLOSING)

    def test_denied_upgrade_is_not_counted(self) -> None:
        """UPGRADING -> GONE: an upgrade refused 503 (draining) never counts as an open connection, before or after onClose."""
        before = gauge("open")
        self.node.draining = True
        proto = make_factory(self.node).buildProtocol(None)
        tcp = FakeTCP(self.clock)
        proto.makeConnection(tcp)
        proto.dataReceived(UPGRADE)
        self.assertTrue(tcp.written().startswith(b"HTTP/1.1 503"))
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertIs(proto.machine.state, State.GONE)
        self.assertEqual(gauge("open"), before)
        self.assertNotIn(proto, self.node.connections)

    def test_no_failure_token_closes_4029_and_drops_after_the_grace(self) -> None:
        """AWAIT_HELLO -> CLOSING at once without a handshake-failure token; the drop timer is the only timer; ABORTED 1 s later."""
        node = make_node(self.clock, handshake_failures_per_ip=1)
        first, _ = connect(node, self.clock)
        first.dataReceived(client_frame(1, b"not json"))
        proto, tcp = connect(node, self.clock)
        self.assertEqual(close_code(self.frames(tcp)), 4029)
        self.assertIs(proto.machine.state, State.CLOSING)
        self.assertEqual(len(proto.machine.pending()), 1)
        self.clock.advance(1.0)
        self.assertIs(proto.machine.state, State.ABORTED)
        self.assertTrue(tcp.aborted)
        self.assertEqual(proto.machine.pending(), [])

    def test_admitting_holds_reading(self) -> None:
        """AWAIT_AUTH -> ADMITTING: the transport stops reading; a frame already read waits, unanswered, for the session."""
        proto, tcp, _ = self.to_admitting()
        self.assertFalse(tcp.reading)
        proto.dataReceived(text("ping", {}))  # read before the pause took effect
        self.assertNotIn(b'"pong"', tcp.written())
        self.assertEqual(len(proto.machine.pending()), 1)  # the handshake deadline still runs

    def test_claim_pending_is_admitting_under_the_deadline(self) -> None:
        """ADMITTING while presence decides the claim: reading held, nothing subscribed or registered; at 30 s 1008, and the late claim's slot is given back."""
        presence = HeldPresence()
        self.node.presence = presence
        proto, tcp, _ = self.to_admitting()
        self.assertFalse(tcp.reading)
        self.assertEqual((len(presence.claims), self.storage.registrations), (1, []))
        self.assertEqual(self.node.hub.sinks(self.identity.user_id), [])
        self.clock.advance(30.1)
        self.assertEqual(close_code(self.frames(tcp)), 1008)
        self.assertIs(proto.machine.state, State.CLOSING)
        presence.answer()
        self.assertEqual(self.storage.registrations, [])
        self.assertIsNone(proto.session)
        self.assertEqual((presence.users, presence.node_summary()), ({}, (0, 0)))

    def test_joining_attaches_the_session_and_ends_the_handshake_deadline(self) -> None:
        """ADMITTING -> JOINING: queued frames go to the session, the deadline is cancelled; nothing times out at 30 s."""
        proto, tcp, _ = self.to_admitting()
        proto.dataReceived(text("ping", {}))
        deadline = proto.machine.pending()[0]
        at_joining: List[Tuple[State, bool, int]] = []
        held = hold_established(proto, lambda: at_joining.append(
            (proto.machine.state, deadline.active(), len(proto.session.inbox) if proto.session else -1)))
        self.storage.registrations[0].callback((device(self.identity.user_id), True, 0, 0))
        self.assertEqual(at_joining, [(State.JOINING, False, 1)])  # the ping waits in the session for the head
        self.assertIs(proto.machine.state, State.JOINING)  # session_established held
        self.clock.advance(31)
        self.assertIsNone(close_code(self.frames(tcp)))
        held[0]()
        self.assertIs(proto.machine.state, State.LIVE)

    def test_live_v1_arms_heartbeat_and_expiry(self) -> None:
        """JOINING -> LIVE (v1): session_established is sent, queued pings answered, heartbeat and expiry timers run, no expiry warning."""
        proto, tcp, _ = self.to_admitting()
        proto.dataReceived(text("ping", {}))
        before = gauge("authenticated")
        self.storage.registrations[0].callback((device(self.identity.user_id), True, 0, 0))
        self.assertIs(proto.machine.state, State.LIVE)
        self.assertEqual(gauge("authenticated") - before, 1)
        types = [wire.parse_message(p)[0] for op, p in self.frames(tcp) if op == 1]
        self.assertEqual(types[-2:], ["session_established", "pong"])
        self.assertTrue(tcp.reading)
        self.assertEqual(len(proto.machine.pending()), 2)  # heartbeat, expiry
        self.clock.advance(30)
        self.assertEqual(sum(1 for op, _ in self.frames(tcp) if op == 9), 1)  # a server ping

    def test_live_v2_also_warns_before_expiry(self) -> None:
        """JOINING -> LIVE (v2): a third timer sends session_expiring_soon 5 minutes before the session ends."""
        proto, tcp, codec = self.to_live(2)
        self.assertEqual(len(proto.machine.pending()), 3)

    def test_live_close_cancels_the_live_timers(self) -> None:
        """LIVE -> CLOSING (a session close): heartbeat and expiry timers are cancelled, no drop timer (Autobahn's close timeout applies)."""
        proto, tcp, _ = self.to_live()
        timers = proto.machine.pending()
        assert proto.session is not None
        proto.session.close(4003, "Device revoked")
        self.assertIs(proto.machine.state, State.CLOSING)
        self.assertEqual(close_code(self.frames(tcp)), 4003)
        self.assertEqual([t.active() for t in timers], [False, False])
        self.assertEqual(proto.machine.pending(), [])

    def test_heartbeat_lost_closes_and_drops_after_5_s(self) -> None:
        """LIVE -> CLOSING (no pong for heartbeat_timeout): 1008, then ABORTED 5 s later if the peer does not answer."""
        proto, tcp, _ = self.to_live()
        self.clock.pump([30.0] * 3)
        self.assertEqual(close_code(self.frames(tcp)), 1008)
        self.assertIs(proto.machine.state, State.CLOSING)
        self.clock.advance(4.9)
        self.assertFalse(tcp.aborted)
        self.clock.advance(0.2)
        self.assertTrue(tcp.aborted)
        self.assertIs(proto.machine.state, State.ABORTED)

    def test_revoked_device_fails_while_admitting(self) -> None:
        """ADMITTING -> CLOSING: a revoked device is closed 4003, reading resumes, the deadline is cancelled, no session."""
        proto, tcp, _ = self.to_admitting()
        self.storage.registrations[0].callback((device(self.identity.user_id, revoked_at=1), False, 0, 0))
        self.assertIs(proto.machine.state, State.CLOSING)
        self.assertEqual(close_code(self.frames(tcp)), 4003)
        self.assertTrue(tcp.reading)
        self.assertIsNone(proto.session)
        self.assertEqual(len(proto.machine.pending()), 1)  # the pre-auth drop timer only

    def test_revoked_between_reads_fails_while_joining(self) -> None:
        """JOINING -> CLOSING -> GONE: revoked after registration, before going live: 4003, then onClose detaches the session."""
        proto, tcp, _ = self.to_admitting()
        hold_established(proto)
        self.storage.registrations[0].callback((device(self.identity.user_id), False, 0, 0))
        self.node.hub.on_control({"kind": "revoke", "user_id": self.identity.user_id, "device_id": DEVICE,
                                  "reason": "revoked", "timestamp": 1})
        self.assertEqual(close_code(self.frames(tcp)), 4003)
        self.assertIs(proto.machine.state, State.CLOSING)
        proto.onClose(True, 1000, "")
        self.assertIs(proto.machine.state, State.GONE)
        self.assertEqual(self.node.hub.sinks(self.identity.user_id), [])
        self.assertEqual(proto.machine.pending(), [])

    def test_storage_error_while_admitting_closes_1013(self) -> None:
        """ADMITTING -> CLOSING: storage unavailable on the device read closes 1013."""
        from pocketbridge.server.storage import StorageUnavailable

        proto, tcp, _ = self.to_admitting()
        self.storage.registrations[0].errback(StorageUnavailable("down"))
        self.assertEqual(close_code(self.frames(tcp)), 1013)
        self.assertIs(proto.machine.state, State.CLOSING)

    def test_lost_while_admitting_stops_admission(self) -> None:
        """ADMITTING -> GONE: the peer goes away mid-admission; the device read's answer attaches nothing."""
        proto, tcp, _ = self.to_admitting()
        proto.onClose(False, 1006, "gone")
        self.assertIs(proto.machine.state, State.GONE)
        self.storage.registrations[0].callback((device(self.identity.user_id), False, 0, 0))
        self.assertIsNone(proto.session)
        self.assertEqual(self.node.hub.sinks(self.identity.user_id), [])
        self.assertEqual(proto.machine.pending(), [])

    def test_lost_while_live_releases_everything(self) -> None:
        """LIVE -> GONE: timers cancelled, session detached, connection unlisted, gauges back."""
        open_before, auth_before = gauge("open"), gauge("authenticated")
        proto, tcp, _ = self.to_live()
        timers = proto.machine.pending()
        proto.onClose(False, 1006, "gone")
        self.assertIs(proto.machine.state, State.GONE)
        self.assertFalse(any(t.active() for t in timers))
        self.assertNotIn(proto, self.node.connections)
        self.assertEqual(self.node.hub.sinks(self.identity.user_id), [])
        self.assertEqual((gauge("open"), gauge("authenticated")), (open_before, auth_before))

    def test_preauth_ceiling_aborts(self) -> None:
        """AWAIT_HELLO -> ABORTED: past the pre-auth outbound ceiling the TCP is aborted; later frames are not handled."""
        node = make_node(self.clock, preauth_outbound_bytes=512, max_preauth_messages=100000)
        proto, tcp = connect(node, self.clock)
        proto.dataReceived(client_frame(9, b"p" * 125) * 20)
        self.assertIs(proto.machine.state, State.ABORTED)
        self.assertTrue(tcp.aborted)
        self.assertEqual(proto.machine.pending(), [])
        size = len(tcp.written())
        proto.dataReceived(client_frame(9, b"p") * 5)
        self.assertEqual(len(tcp.written()), size)
        proto.onClose(False, 1006, "aborted")
        self.assertIs(proto.machine.state, State.GONE)

