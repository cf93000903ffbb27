"""
A bare Autobahn WebSocket echo server: the baseline for what Twisted and
Autobahn alone cost on this machine (no JSON, no crypto, no storage).

    python -m pocketbridge.bench.echo [--port 0]

It prints the port it listens on (127.0.0.1 only) as one line on stdout and
runs until stdin closes or it gets SIGTERM. Settings match the server's
gateway where they matter for speed: permessage-deflate off, TCP_NODELAY on
(see ARCHITECTURE.md "Measured traps"), no auto-fragmentation.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, List, Optional

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.protocol import Protocol


class EchoProtocol(WebSocketServerProtocol):
    """Sends every message back as it came."""

    def connectionMade(self) -> None:
        """Turn Nagle off after Autobahn's own (too early) attempt."""
        super().connectionMade()
        try:
            self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        except (AttributeError, OSError):
            pass

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Echo."""
        self.sendMessage(payload, isBinary)


def make_factory(url: str, reactor: Any) -> WebSocketServerFactory:
    """The echo server factory."""
    factory = WebSocketServerFactory(url, reactor=reactor)
    factory.protocol = EchoProtocol
    factory.setProtocolOptions(
        perMessageCompressionAccept=lambda offers: None,
        autoFragmentSize=0,
        autoPingInterval=0,
        openHandshakeTimeout=30,
    )
    return factory


class _StdinWatch(Protocol):
    """Stops the reactor when the parent closes our stdin (it exited or is done)."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def connectionLost(self, reason: Any = None) -> None:
        if self.reactor.running:
            self.reactor.stop()


def main(argv: Optional[List[str]] = None) -> int:
    """Run the echo server; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m pocketbridge.bench.echo")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    args = parser.parse_args(argv)

    from twisted.internet import reactor, stdio

    from pocketbridge.bench.runner import raise_fd_limit

    raise_fd_limit()
    factory = make_factory("ws://127.0.0.1", reactor)
    port = reactor.listenTCP(args.port, factory, backlog=1024, interface="127.0.0.1")  # type: ignore[attr-defined]
    sys.stdout.write("{}\n".format(port.getHost().port))  # type: ignore[attr-defined]
    sys.stdout.flush()
    stdio.StandardIO(_StdinWatch(reactor), reactor=reactor)
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
