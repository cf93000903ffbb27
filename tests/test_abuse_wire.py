"""
The attacker side of the abuse suite: blocking raw sockets that speak HTTP
and WebSocket framing themselves, run as a separate process by
``tests.abuse.run_attack``::

    python tests/test_abuse_wire.py ping-flood 127.0.0.1 PORT --version 2 --seconds 5

Each attack prints one JSON line with what it did and saw. The unit tests
at the bottom check the framing against Autobahn's own parser.

Attacks (all loopback, bounded in time and count):

- ``ping-flood --version 1|2|0``: authenticate as a fresh device (v1 or v2;
  0 = no handshake at all, just the upgrade), then send WebSocket PING
  frames as fast as the socket takes them and never read.
- ``junk-acks``: a fresh v2 user stores one event from a first device; a
  second device receives it in its catch-up and never acks it, then sends
  junk ``ack`` frames with an app-level ``ping`` every ``--ping-every``;
  the pongs it reads tell how many frames the server processed.
- ``slowloris --source IP --count N``: N connections that send an upgrade
  request head one byte per second and never finish it.
- ``slow-body``: a chunked POST whose body arrives one byte per second.
- ``bad-auth --source IP --count N``: N v1 handshakes at once whose
  client_auth is signed with the wrong key.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import os
import select
import socket
import struct
import sys
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

from twisted.trial.unittest import SynchronousTestCase

PING_PAYLOAD = b"p" * 125
RCVBUF = 16384  # bytes: the attacker's socket receive buffer  # the largest control frame payload: the pong echoes it


# ---------------------------------------------------------------- framing


def frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame: masked, with an all-zero mask key (legal, and the payload stays as is)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


class Reader:
    """Reads server frames from a blocking socket."""

    def __init__(self, sock: socket.socket, buf: bytes = b"") -> None:
        self.sock = sock
        self.buf = buf

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by server")
            self.buf += chunk

    def next_frame(self) -> Tuple[int, bytes]:
        """(opcode, payload) of the next frame; a close frame raises ConnectionError with its code."""
        self._need(2)
        b0, b1 = self.buf[0], self.buf[1]
        n, pos = b1 & 0x7F, 2
        if n == 126:
            self._need(4)
            n, pos = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            self._need(10)
            n, pos = struct.unpack("!Q", self.buf[2:10])[0], 10
        self._need(pos + n)
        payload, self.buf = self.buf[pos:pos + n], self.buf[pos + n:]
        opcode = b0 & 0x0F
        if opcode == 0x8:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            raise ConnectionError("close {} {}".format(code, payload[2:].decode("utf-8", "replace")))
        return opcode, payload

    def next_data(self) -> Tuple[int, bytes]:
        """The next text or binary frame (control frames skipped)."""
        while True:
            opcode, payload = self.next_frame()
            if opcode in (0x1, 0x2):
                return opcode, payload


def upgrade(host: str, port: int, source: Optional[str] = None, timeout: float = 10.0) -> Tuple[socket.socket, Reader]:
    """A socket past a successful WebSocket upgrade at /ws."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small receive buffer (set before connect, so the kernel does not grow it): what the attacker does not
    # read piles up in the server, not in the attacker's kernel.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.settimeout(timeout)
    if source:
        sock.bind((source, 0))
    sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    sock.sendall(upgrade_head(host, port, key).encode("ascii"))
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the upgrade")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError("upgrade refused: " + head.split(b"\r\n")[0].decode("latin-1"))
    return sock, Reader(sock, rest)


def upgrade_head(host: str, port: int, key: str) -> str:
    return ("GET /ws HTTP/1.1\r\nHost: {}:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\r\n").format(host, port, key)


def authenticate(host: str, port: int, version: int, identity: Any = None,
                 device_id: Optional[str] = None) -> Tuple[socket.socket, Reader, Any]:
    """A socket with an established session of a fresh (or given) device: (sock, reader, v2 codec or None)."""
    from pocketbridge.client import Identity, V1Handshake, V2Handshake
    from pocketbridge.client.handshake import envelope_payload

    sock, reader = upgrade(host, port)
    identity = identity or Identity.generate()
    device_id = device_id or str(uuid.uuid4())
    hs: Any = V1Handshake(identity, device_id) if version == 1 else V2Handshake(identity, device_id, pins={})
    sock.sendall(frame(0x1, json.dumps(hs.client_hello()).encode()))
    hello = json.loads(reader.next_data()[1])
    auth = hs.on_server_hello(envelope_payload(hello, "server_hello"))
    codec = hs.codec() if version == 2 else None
    if codec is None:
        sock.sendall(frame(0x1, json.dumps(auth).encode()))
        est = json.loads(reader.next_data()[1])
    else:
        sock.sendall(frame(0x2, codec.encode(auth)[0]))
        est = codec.decode(reader.next_data()[1], True)
    if est.get("type") != "session_established":
        raise ConnectionError("no session: {!r}".format(est))
    return sock, reader, codec


# ---------------------------------------------------------------- attacks


def ping_flood(host: str, port: int, version: int, seconds: float, hold: float) -> Dict[str, Any]:
    """Pings as fast as the socket takes them, never reading; then hold the socket ``hold`` s and close."""
    if version:
        sock, _, _ = authenticate(host, port, version)
    else:
        sock, _ = upgrade(host, port)
    chunk = frame(0x9, PING_PAYLOAD) * 256
    view, pos, sent, started = memoryview(chunk), 0, 0, time.monotonic()
    sock.settimeout(0.1)
    closed_after: Optional[float] = None
    while time.monotonic() - started < seconds:
        try:
            n = sock.send(view[pos:])
        except socket.timeout:
            continue  # the server stopped reading: that is allowed
        except OSError:
            closed_after = time.monotonic() - started
            break
        sent += n
        pos = (pos + n) % len(chunk)
    held_until = time.monotonic() + hold
    while closed_after is None and time.monotonic() < held_until:
        time.sleep(0.1)
    sock.close()
    return {"bytes_sent": sent, "pings_sent": sent // len(frame(0x9, PING_PAYLOAD)),
            "closed_by_server_after_s": closed_after, "seconds": seconds}


def junk_acks(host: str, port: int, seconds: float, ping_every: int) -> Dict[str, Any]:
    """See the module docstring; reports frames sent and pongs (frames answered) per second."""
    from pocketbridge.client import Identity

    identity = Identity.generate()
    device_a = str(uuid.uuid4())
    sender, reader, codec = authenticate(host, port, 2, identity, device_a)
    event = {"event_id": str(uuid.uuid4()), "user_id": identity.user_id, "device_id": device_a,
             "device_seq": 1, "stream_id": "s", "stream_seq": 0, "type": "t", "encrypted_payload": "AAAA"}
    sender.sendall(frame(0x2, codec.encode({"type": "event", "payload": event})[0]))
    while True:
        message = codec.decode(reader.next_data()[1], True)
        if message.get("type") == "ack":
            break
    sender.close()
    sock, reader, codec = authenticate(host, port, 2, identity)
    unacked = None
    while True:
        message = codec.decode(reader.next_data()[1], True)
        if message.get("type") == "replay_response":
            unacked = [e["seq"] for e in message["payload"]["events"]]
        if message.get("type") == "caught_up":
            break
    sock.setblocking(False)
    frames_sent = pongs = 0
    out = bytearray()
    started = time.monotonic()
    pong_times: List[float] = []
    while time.monotonic() - started < seconds:
        if len(out) < 65536:
            for _ in range(ping_every):
                out += frame(0x2, codec.encode({"type": "ack", "payload": {"seq": 0}})[0])
            out += frame(0x2, codec.encode({"type": "ping", "payload": {}})[0])
            frames_sent += ping_every + 1
        readable, writable, _ = select.select([sock], [sock], [], 0.05)
        if writable:
            try:
                n = sock.send(out)
                del out[:n]
            except BlockingIOError:
                pass
        if readable:
            try:
                data = sock.recv(262144)
            except BlockingIOError:
                data = b""
            reader.buf += data
            while True:
                try:
                    opcode, payload = _try_frame(reader)
                except _Incomplete:
                    break
                if opcode == 0x2 and codec.decode(payload, True).get("type") == "pong":
                    pongs += 1
                    pong_times.append(time.monotonic() - started)
    sock.close()
    return {"frames_queued": frames_sent, "pongs": pongs, "frames_answered": pongs * (ping_every + 1),
            "seconds": seconds, "unacked_seqs": unacked, "last_pong_at_s": pong_times[-1] if pong_times else None}


class _Incomplete(Exception):
    pass


def _try_frame(reader: Reader) -> Tuple[int, bytes]:
    """The next whole frame already in ``reader.buf``, or _Incomplete."""
    buf = reader.buf
    if len(buf) < 2:
        raise _Incomplete()
    n, pos = buf[1] & 0x7F, 2
    if n == 126:
        if len(buf) < 4:
            raise _Incomplete()
        n, pos = struct.unpack("!H", buf[2:4])[0], 4
    elif n == 127:
        if len(buf) < 10:
            raise _Incomplete()
        n, pos = struct.unpack("!Q", buf[2:10])[0], 10
    if len(buf) < pos + n:
        raise _Incomplete()
    reader.buf = buf[pos + n:]
    return buf[0] & 0x0F, buf[pos:pos + n]


def slowloris(host: str, port: int, source: str, count: int, seconds: float) -> Dict[str, Any]:
    """``count`` connections from ``source``, each trickling an upgrade head one byte per second."""
    head = upgrade_head(host, port, base64.b64encode(os.urandom(16)).decode()).encode()[:-2]  # never finished
    socks: List[Optional[socket.socket]] = []
    refused = 0
    closed_at: List[float] = []
    started = time.monotonic()
    for _ in range(count):
        try:
            s = socket.create_connection((host, port), timeout=2, source_address=(source, 0))
            s.setblocking(False)
            socks.append(s)
        except OSError:
            refused += 1
    connected = len(socks)
    positions = [0] * len(socks)
    while time.monotonic() - started < seconds:
        tick = time.monotonic()
        for i, s in enumerate(socks):
            if s is None:
                continue
            try:
                if s.recv(4096) == b"":
                    raise ConnectionError()
            except BlockingIOError:
                pass
            except OSError:
                closed_at.append(time.monotonic() - started)
                socks[i] = None
                s.close()
                continue
            try:
                s.send(head[positions[i] % len(head):positions[i] % len(head) + 1])
                positions[i] += 1
            except BlockingIOError:
                pass
            except OSError:
                closed_at.append(time.monotonic() - started)
                socks[i] = None
                s.close()
        time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    still_open = sum(1 for s in socks if s is not None)
    for s in socks:
        if s is not None:
            s.close()
    return {"attempted": count, "connected": connected, "refused": refused, "closed_by_server": len(closed_at),
            "still_open_at_end": still_open, "last_close_at_s": max(closed_at) if closed_at else None}


def slow_body(host: str, port: int, seconds: float) -> Dict[str, Any]:
    """A chunked POST body at one byte per second; when (if) the server dropped it."""
    sock = socket.create_connection((host, port), timeout=2)
    sock.sendall("POST /api/pairing/v2/123456/join HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".format(host, port).encode())
    sock.setblocking(False)
    started = time.monotonic()
    closed_after: Optional[float] = None
    answer = b""
    while time.monotonic() - started < seconds:
        try:
            data = sock.recv(4096)
            if data == b"":
                closed_after = time.monotonic() - started
                break
            answer += data
        except BlockingIOError:
            pass
        except OSError:
            closed_after = time.monotonic() - started
            break
        try:
            sock.send(b"1\r\n \r\n")
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.ECONNRESET):
                closed_after = time.monotonic() - started
                break
        time.sleep(1.0)
    sock.close()
    return {"closed_by_server_after_s": closed_after, "answer": answer[:200].decode("latin-1"), "seconds": seconds}


def bad_auth(host: str, port: int, source: str, count: int) -> Dict[str, Any]:
    """
    ``count`` v1 connections from ``source`` opened at once, each sending a
    client_auth whose signature is made with the wrong key once all have
    their server_hello: how each one ended ("1008 Invalid client signature", "4029", ...).
    """
    from pocketbridge.client import Identity, V1Handshake
    from pocketbridge.client.handshake import envelope_payload

    outcomes: Dict[str, int] = {}
    started = time.monotonic()

    def count_as(what: str) -> None:
        outcomes[what] = outcomes.get(what, 0) + 1

    conns: List[Tuple[socket.socket, Reader, Any]] = []
    for _ in range(count):
        try:
            sock, reader = upgrade(host, port, source)
        except ConnectionError as e:
            count_as(str(e)[:40])
            continue
        hs = V1Handshake(Identity.generate(), str(uuid.uuid4()))
        sock.sendall(frame(0x1, json.dumps(hs.client_hello()).encode()))
        conns.append((sock, reader, hs))
    ready = []
    for sock, reader, hs in conns:
        try:
            hello = json.loads(reader.next_data()[1])
            auth = hs.on_server_hello(envelope_payload(hello, "server_hello"))
            ready.append((sock, reader, auth))
        except (ConnectionError, OSError) as e:
            count_as(_close_label(e))
            sock.close()
    for sock, _, auth in ready:
        auth["payload"]["client_signature"] = Identity.generate().sign_hex(b"\0" * 32)  # valid format, wrong key
        sock.sendall(frame(0x1, json.dumps(auth).encode()))
    for sock, reader, _ in ready:
        try:
            reader.next_data()
            count_as("authenticated")
        except (ConnectionError, OSError) as e:
            count_as(_close_label(e))
        sock.close()
    return {"attempted": count, "outcomes": outcomes, "seconds": time.monotonic() - started}


def _close_label(e: BaseException) -> str:
    """'close 4029' or 'close 1008 <reason>' from a Reader close, else the error's text."""
    text = str(e)
    if text.startswith("close 4029"):
        return "close 4029"
    return text[:60]


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("attack", choices=["ping-flood", "junk-acks", "slowloris", "slow-body", "bad-auth"])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--ping-every", type=int, default=100)
    parser.add_argument("--source", default="127.0.0.3")
    parser.add_argument("--count", type=int, default=100)
    a = parser.parse_args(argv)
    if a.attack == "ping-flood":
        result = ping_flood(a.host, a.port, a.version, a.seconds, a.hold)
    elif a.attack == "junk-acks":
        result = junk_acks(a.host, a.port, a.seconds, a.ping_every)
    elif a.attack == "slowloris":
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, a.count + 64)), hard))
        result = slowloris(a.host, a.port, a.source, a.count, a.seconds)
    elif a.attack == "bad-auth":
        result = bad_auth(a.host, a.port, a.source, a.count)
    else:
        result = slow_body(a.host, a.port, a.seconds)
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------- unit tests of the framing


class FramingTests(SynchronousTestCase):
    """The attacker's frames are what a WebSocket server parses."""

    def test_frames_parse_in_autobahn(self) -> None:
        """Autobahn's server protocol reads our masked ping and binary frames (all payload lengths) as sent."""
        from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        got: List[Tuple[str, bytes]] = []

        class P(WebSocketServerProtocol):
            def onMessage(self, payload: bytes, isBinary: bool) -> None:
                got.append(("binary" if isBinary else "text", payload))

            def onPing(self, payload: bytes) -> None:
                got.append(("ping", payload))

        factory = WebSocketServerFactory("ws://127.0.0.1:1/ws")
        factory.protocol = P
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(upgrade_head("127.0.0.1", 1, base64.b64encode(b"k" * 16).decode()).encode())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101"))
        big = os.urandom(70000)
        proto.dataReceived(frame(0x9, PING_PAYLOAD) + frame(0x2, b"x" * 200) + frame(0x2, big) + frame(0x1, b"{}"))
        self.assertEqual(got, [("ping", PING_PAYLOAD), ("binary", b"x" * 200), ("binary", big), ("text", b"{}")])

    def test_reader_splits_server_frames(self) -> None:
        """The frame reader returns each unmasked server frame and raises with the code on a close frame."""
        server_frames = b"\x89\x02hi" + b"\x82\x7e\x01\x00" + b"z" * 256 + b"\x88\x02\x0f\xa0"

        class OneByteAtATime:
            def __init__(self) -> None:
                self.data = server_frames

            def recv(self, n: int) -> bytes:
                chunk, self.data = self.data[:1], self.data[1:]
                return chunk

        a: Any = OneByteAtATime()
        reader = Reader(a)
        self.assertEqual(reader.next_data(), (0x2, b"z" * 256))
        with self.assertRaises(ConnectionError) as caught:
            reader.next_frame()
        self.assertIn("close 4000", str(caught.exception))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
