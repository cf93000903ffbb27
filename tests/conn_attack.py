"""
Attacks on single connections, run in their own process by
tests/test_conn_attacks.py so that an attacker spinning on its socket never
delays the test's reactor. Prints one JSON line with what it did.

    python tests/conn_attack.py preauth-ping-flood HOST PORT SECONDS
    python tests/conn_attack.py auth-ping-flood HOST PORT SECONDS VERSION
"""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any, Dict, List, Tuple

# A masked WebSocket ping with a 125-byte payload (131 bytes on the wire).
PING = b"\x89\xfd\0\0\0\0" + b"p" * 125
UPGRADE = (
    "GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def preauth_ping_flood(host: str, port: int, seconds: float) -> Dict[str, Any]:
    """Upgrade, then send pings and never read; reconnect whenever dropped, until ``seconds`` pass."""
    end = time.monotonic() + seconds
    sent = connections = dropped = received = pongs = 0
    closes = []
    chunk = PING * 100
    while time.monotonic() < end:
        try:
            s = socket.create_connection((host, port), timeout=2)
        except OSError:
            time.sleep(0.05)
            continue
        connections += 1
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            s.sendall(UPGRADE.format(host=host, port=port).encode())
            head = b""
            while b"\r\n\r\n" not in head:
                data = s.recv(4096)
                if not data:
                    raise OSError("closed during the upgrade")
                head += data
            if b" 101 " not in head.split(b"\r\n")[0]:
                raise OSError("upgrade refused")
            rest = head.split(b"\r\n\r\n", 1)[1]
            s.settimeout(0.2)
            while time.monotonic() < end:
                try:
                    sent += s.send(chunk)
                except socket.timeout:
                    continue
            data = rest + _drain(s, 3.0)
            received += len(data)
            for op, payload in _frames(data):
                if op == 10:
                    pongs += 1
                elif op == 8 and len(payload) >= 2:
                    closes.append(int.from_bytes(payload[:2], "big"))
        except OSError:
            dropped += 1
        finally:
            s.close()
    return {"sent_bytes": sent, "connections": connections, "dropped": dropped, "received_bytes": received,
            "pongs": pongs, "closes": closes}


def _drain(s: socket.socket, seconds: float) -> bytes:
    """What the server sent (read for up to ``seconds``, at most 16 MiB)."""
    got = []
    size = 0
    end = time.monotonic() + seconds
    s.settimeout(0.5)
    try:
        while time.monotonic() < end and size < 16 * 1024 * 1024:
            data = s.recv(65536)
            if not data:
                break
            got.append(data)
            size += len(data)
    except OSError:
        pass
    return b"".join(got)


def _frames(data: bytes) -> List[Tuple[int, bytes]]:
    """(opcode, payload) of the unmasked server frames in ``data``."""
    out = []
    i = 0
    while i + 2 <= len(data):
        op, n = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if n == 126:
            n, i = int.from_bytes(data[i:i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i:i + 8], "big"), i + 8
        out.append((op, data[i:i + n]))
        i += n
    return out


def auth_ping_flood(host: str, port: int, seconds: float, version: int) -> Dict[str, Any]:
    """Authenticate a fresh device, stop reading, and send pings for ``seconds``."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, ensureDeferred
    from twisted.internet.task import deferLater

    from pocketbridge.client import Client, Identity

    result: Dict[str, Any] = {}

    async def run() -> None:
        client = Client(reactor, "ws://{}:{}/ws".format(host, port), Identity.generate(),
                        protocol_version=version, keep_history=False, handshake_timeout=10)
        await client.connect()
        assert client.raw is not None and client.raw.protocol is not None
        t: Any = client.raw.protocol.transport
        t.pauseProducing()  # never read a pong
        frame = PING * 100
        end = time.monotonic() + seconds
        sent = 0
        while time.monotonic() < end:
            if len(t.dataBuffer) - t.offset + t._tempDataLen < 256 * 1024:
                t.write(frame)
                sent += len(frame)
            await deferLater(reactor, 0.001, lambda: None)
        result["sent_bytes"] = sent
        result["closed"] = list(client.raw.close_info) if client.raw.close_info else None
        t.abortConnection()

    def done(r: Any) -> None:
        if not isinstance(r, dict) and r is not None:
            result["error"] = str(getattr(r, "value", r))
        reactor.stop()

    d: "Deferred[Any]" = ensureDeferred(run())
    d.addBoth(done)
    reactor.run()
    return result


def main(argv: Any) -> None:
    attack, host, port, seconds = argv[1], argv[2], int(argv[3]), float(argv[4])
    if attack == "preauth-ping-flood":
        out = preauth_ping_flood(host, port, seconds)
    elif attack == "auth-ping-flood":
        out = auth_ping_flood(host, port, seconds, int(argv[5]))
    else:
        raise SystemExit("unknown attack " + attack)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main(sys.argv)
