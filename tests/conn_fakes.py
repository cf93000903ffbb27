"""
In-memory fakes for the gateway and session unit tests: a TCP transport
with Twisted's real send-buffer code, a node with fake storage and writer,
WebSocket frame encoding and decoding. No sockets, no sleeps.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Dict, List, Optional, Tuple

import txaio
from nacl.signing import SigningKey
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock

from pocketbridge.server import config

from pocketbridge.protocol import wire
from pocketbridge.server.gateway.connection import Input
from pocketbridge.protocol.events import StoredEvent
from pocketbridge.server.gateway.adapter import GatewayProtocol, _Conn, make_factory
from pocketbridge.server.fanout.hub import DeliveryHub
from pocketbridge.server.context import Node
from pocketbridge.server.gateway.session import Session
from pocketbridge.server.cluster.presence import Claim, LocalPresence
from pocketbridge.server.storage import DeviceState

USER = "ab" * 32
DEVICE = "0b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b"
OTHER = "1b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b"
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class FakeTCP(FileDescriptor):
    """Twisted's FileDescriptor write path (buffers, producer calls); the peer takes ``room`` bytes per doWrite."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self.connected = 1
        self.room = 0
        self.sent = bytearray()
        self.reading = True
        self.aborted = False

    def writeSomeData(self, data: Any) -> int:
        n = min(len(data), self.room)
        self.room -= n
        self.sent += bytes(data[:n])
        return n

    def drain(self, n: int) -> None:
        """The peer reads ``n`` bytes."""
        self.room = n
        self.doWrite()

    def written(self) -> bytes:
        """Everything the server wrote, sent or still buffered."""
        return bytes(self.sent) + bytes(self.dataBuffer[self.offset:]) + b"".join(self._tempDataBuffer)

    def startReading(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startWriting(self) -> None:
        pass

    def stopWriting(self) -> None:
        pass

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 40000)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 3001)

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def abortConnection(self) -> None:
        self.aborted = True

    def loseConnection(self) -> None:
        self.disconnecting = True


def client_frame(opcode: int, payload: bytes = b"") -> bytes:
    """One masked client frame (mask 0, so the payload reads as is)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + b"\0\0\0\0" + payload


def text(msg_type: str, payload: Dict[str, Any]) -> bytes:
    """A client text frame holding one message."""
    return client_frame(1, wire.encode(msg_type, payload))


def server_frames(data: bytes) -> List[Tuple[int, bytes]]:
    """(opcode, payload) of every server frame in ``data`` after the HTTP response."""
    end = data.find(b"\r\n\r\n")
    data = data[end + 4:] if data.startswith(b"HTTP/") else data
    out = []
    i = 0
    while i + 2 <= len(data):
        op, n = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if n == 126:
            n, i = struct.unpack("!H", data[i:i + 2])[0], i + 2
        elif n == 127:
            n, i = struct.unpack("!Q", data[i:i + 8])[0], i + 8
        out.append((op, data[i:i + n]))
        i += n
    return out


def close_code(frames: List[Tuple[int, bytes]]) -> Optional[int]:
    """The code of the first close frame, if any."""
    for op, payload in frames:
        if op == 8:
            return int(struct.unpack("!H", payload[:2])[0])
    return None


def stored(seq: int, device: str = OTHER, size: int = 10) -> StoredEvent:
    """A committed event of USER from ``device``."""
    return StoredEvent(USER, seq, "00000000-0000-7000-8000-%012d" % seq, device, seq, "s", seq, "t",
                       "x" * size, None, 1_700_000_000_000)


class FakeStorage:
    """The storage calls a session makes, over an in-memory event list."""

    def __init__(self) -> None:
        self.events: List[StoredEvent] = []
        self.pages: List[Tuple[int, int, int]] = []  # (after, upto, limit) of each read_page
        self.ranges: List[Tuple[int, int]] = []

    def head(self, user_id: str) -> "Deferred[int]":
        return succeed(self.events[-1].seq if self.events else 0)

    def read_range(self, user_id: str, after: int, upto: int) -> "Deferred[List[StoredEvent]]":
        self.ranges.append((after, upto))
        return succeed([e for e in self.events if after < e.seq <= upto])

    def read_page(self, user_id: str, after: int, upto: int, exclude: Optional[str], limit: int,
                  max_bytes: int, now: int) -> "Deferred[Tuple[List[StoredEvent], bool]]":
        self.pages.append((after, upto, limit))
        rows = [e for e in self.events if after < e.seq <= upto and e.device_id != exclude]
        return succeed((rows[:limit], len(rows) > limit))

    def count_backlog(self, user_id: str, after: int, upto: int, exclude: Optional[str], now: int) -> "Deferred[int]":
        return succeed(sum(1 for e in self.events if after < e.seq <= upto and e.device_id != exclude))

    def user_state(self, user_id: str) -> "Deferred[Tuple[int, int]]":
        """(head, purged_below)."""
        return succeed((self.events[-1].seq if self.events else 0, 0))

    def update_cursors(self, batch: Any, now: int, last_seen: Any = None) -> "Deferred[None]":
        return succeed(None)

    def record_unacked(self, *args: Any) -> "Deferred[bool]":
        return succeed(False)

    def touch_device(self, *args: Any) -> "Deferred[None]":
        return succeed(None)


class FakeConn:
    """The ``Conn`` of a session without a socket: records what is sent; calls ``on_send`` after each frame."""

    def __init__(self) -> None:
        self.frames: List[Any] = []
        self.closed: Optional[Tuple[int, str]] = None
        self.reading = True
        self.on_send: Any = None

    def send(self, data: bytes) -> None:
        self.frames.append(wire.parse_message(data))
        if self.on_send is not None:
            self.on_send()

    def close(self, code: int, reason: str) -> None:
        self.frames.append(("<close>", {"code": code}))
        self.closed = (code, reason)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def send_pong(self, payload: bytes) -> None:
        pass

    def pong_received(self) -> None:
        pass

    def events(self) -> List[int]:
        return [f["seq"] for t, f in self.frames if t == "event"]

    def types(self) -> List[str]:
        """The message types sent, in order."""
        return [t for t, _ in self.frames]

    def take(self) -> List[Any]:
        """The frames sent since the last call."""
        frames, self.frames = self.frames, []
        return frames


def upload(n: int, device: str = DEVICE, **fields: Any) -> Dict[str, Any]:
    """The fields of a client ``event`` frame with device_seq ``n``."""
    event = {"event_id": "00000000-0000-7000-8000-%012d" % n, "user_id": USER, "device_id": device,
             "device_seq": n, "stream_id": "s", "stream_seq": n, "type": "t", "encrypted_payload": "eHh4eA==",
             "created_at": 1_700_000_000_000}
    event.update(fields)
    return event


class FakeWriter:
    """Holds each submitted event until the test commits it."""

    def __init__(self) -> None:
        self.pending: List[Tuple[Any, "Deferred[Any]"]] = []

    def submit(self, event: Any) -> "Deferred[Any]":
        d: "Deferred[Any]" = Deferred()
        self.pending.append((event, d))
        return d


def make_node(clock: MemoryReactorClock, **settings: Any) -> Node:
    """A node with fake storage and writer and the given settings."""
    s = config.Settings().replace(**settings)
    storage = FakeStorage()
    key = SigningKey(b"\x22" * 32)
    node = Node(s, storage, FakeWriter(), DeliveryHub(storage), clock, key, "test")  # type: ignore[arg-type]
    return node


def connect(node: Node, clock: MemoryReactorClock) -> Tuple[GatewayProtocol, FakeTCP]:
    """A connection whose WebSocket upgrade is done (before authentication)."""
    txaio.use_twisted()
    txaio.config.loop = clock
    factory = make_factory(node)
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    tcp = FakeTCP(clock)
    proto.makeConnection(tcp)
    proto.dataReceived(UPGRADE)
    return proto, tcp


def authenticate(proto: GatewayProtocol, version: int = 1, head: int = 0) -> Session:
    """
    Walk the connection's machine to LIVE with a session attached, as the
    handshake would (without the key exchange, the storage reads and the
    heartbeat timers).
    """
    node = proto.node
    session = Session(node, _Conn(proto), USER, DEVICE, proto.session_id, version, None, "cli")
    node.hub.attach(session)
    proto.machine.feed(Input.HELLO)
    proto.machine.feed(Input.AUTH)
    proto._attached(session)
    proto.machine.feed(Input.ESTABLISHED)
    session.established(head, head, 1)
    return session


def device_state(user_id: str, device_id: str = DEVICE, revoked_at: Optional[int] = None) -> DeviceState:
    """The stored row of a device (``revoked_at`` set: revoked)."""
    return DeviceState(user_id, device_id, "laptop", "cli", 0, 0, 0, 0, revoked_at)


class HandshakeStorage(FakeStorage):
    """
    FakeStorage with the device reads of the handshake, each answered when the
    test says: ``registrations`` (register + head + revocation, the one read of
    a handshake) and ``device_reads`` (only a handshake refused by a socket
    limit); ``last_seen`` records the last_seen times of each cursor write.
    """

    def __init__(self) -> None:
        super().__init__()
        self.device_reads: List[Deferred[Optional[DeviceState]]] = []
        self.registrations: List[Deferred[Tuple[DeviceState, bool, int, int]]] = []
        self.last_seen: List[Dict[Tuple[str, str], int]] = []

    def get_device(self, user_id: str, device_id: str) -> "Deferred[Optional[DeviceState]]":
        d: Deferred[Optional[DeviceState]] = Deferred()
        self.device_reads.append(d)
        return d

    def register_and_read_head(self, user_id: str, device_id: str, name: Optional[str], dtype: str,
                               now: int) -> "Deferred[Tuple[DeviceState, bool, int, int]]":
        d: Deferred[Tuple[DeviceState, bool, int, int]] = Deferred()
        self.registrations.append(d)
        return d

    def update_cursors(self, batch: Any, now: int, last_seen: Any = None) -> "Deferred[None]":
        if last_seen:
            self.last_seen.append(dict(last_seen))
        return succeed(None)


class HeldPresence(LocalPresence):
    """
    LocalPresence whose ``claim`` is decided when the test calls ``answer``
    (as LocalPresence would decide it then): the connection stays ADMITTING
    meanwhile, before its session is subscribed or its device registered.
    """

    def __init__(self) -> None:
        super().__init__()
        self.claims: List[Tuple["Deferred[Claim]", Tuple[Any, ...]]] = []

    def claim(self, user_id: str, device_id: str, socket_id: str, auth_ms: int,
              max_device: int, max_user: int) -> "Deferred[Claim]":
        d: Deferred[Claim] = Deferred()
        self.claims.append((d, (user_id, device_id, socket_id, auth_ms, max_device, max_user)))
        return d

    def answer(self, i: int = 0) -> None:
        """Decide the ``i``-th held claim now."""
        d, args = self.claims[i]
        LocalPresence.claim(self, *args).chainDeferred(d)


def send_auth(proto: GatewayProtocol, tcp: FakeTCP, hs: Any) -> Any:
    """
    Walk a fresh connection through ``client_hello`` and ``client_auth`` of
    the client handshake ``hs`` (a V1Handshake or V2Handshake); the v2 frame
    codec (None on v1).
    """
    proto.dataReceived(client_frame(1, wire.dumps(hs.client_hello())))
    _, hello = wire.parse_message(server_frames(tcp.written())[-1][1])
    auth = hs.on_server_hello(hello)
    codec = hs.codec()
    data = wire.dumps(auth)
    proto.dataReceived(client_frame(1, data) if codec is None else client_frame(2, codec.seal(data)))
    return codec


def hold_established(proto: GatewayProtocol, seen: Optional[Callable[[], None]] = None) -> List[Callable[[], None]]:
    """
    Keep ``proto`` in JOINING once admission attaches its session: sending
    ``session_established`` waits until the test calls the function appended
    to the returned list (admission itself no longer awaits anything
    there). ``seen`` runs where the frame would have been sent: JOINING,
    before the session learns the head and handles the frames it was given.
    """
    held: List[Callable[[], None]] = []
    send = proto._established

    def hold(*args: Any) -> None:
        if seen is not None:
            seen()
        held.append(lambda: send(*args))

    proto._established = hold  # type: ignore[method-assign]
    return held
