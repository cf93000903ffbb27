"""
``pocketbridge-cli``: a small v1 client on the command line.

    pocketbridge-cli keygen [--keys PATH] [--name NAME] [--from PATH]
    pocketbridge-cli send  --url ws://127.0.0.1:3001/ws [--keys PATH] --stream S --type T [--ttl MS]
    pocketbridge-cli watch --url ws://127.0.0.1:3001/ws [--keys PATH] [--count N] [--json | --decode]

v1 "pairing" is copying the user key: ``keygen --from first.json --keys
second.json`` makes a second device of the same user.

``send`` puts the base64 of stdin in ``encrypted_payload`` as is: v1 has no
end-to-end encryption in this tool yet (it comes with protocol v2), so only
use it with data you would let the server operator read.

Results go to stdout, progress to stderr, an error is one line on stderr and
a non-zero exit status.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, TextIO

import orjson
from twisted.internet.defer import Deferred, TimeoutError as DeferTimeoutError
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from pocketbridge.client import (
    Client,
    ConnectionClosed,
    DeviceKeys,
    DeviceRevoked,
    EventDeduper,
    HandshakeError,
    KeyFileError,
    ReconnectingClient,
    RetryDecision,
)
from pocketbridge.client.keys import DEVICE_TYPES, default_keys_path


class CliError(Exception):
    """A failure to report as one line and exit status 1."""


def describe(exc: BaseException) -> str:
    """A one-line, secret-free description of why a command failed."""
    if isinstance(exc, CliError):
        return str(exc)
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, DNSLookupError):
        return "cannot resolve the server's host name"
    if isinstance(exc, ConnectError):
        return "cannot connect: {}".format(exc.osError or exc.__class__.__name__)
    if isinstance(exc, DeviceRevoked):
        return "device revoked (close {} {})".format(exc.code, exc.reason).strip()
    if isinstance(exc, ConnectionClosed):
        return "server closed the connection: {} {}".format(exc.code, exc.reason).strip()
    if isinstance(exc, HandshakeError):
        return "handshake failed: {}".format(exc)
    if isinstance(exc, DeferTimeoutError):
        return "timed out"
    if isinstance(exc, KeyFileError):
        return str(exc)
    return "{}: {}".format(exc.__class__.__name__, exc)


def _progress(message: str, err: Optional[TextIO] = None) -> None:
    """One progress or error line on stderr."""
    stream = err if err is not None else sys.stderr
    stream.write(message + "\n")
    stream.flush()


def _client_for(reactor: Any, url: str, keys: DeviceKeys, **kwargs: Any) -> Client:
    """A Client for the device in ``keys``."""
    return Client(
        reactor,
        url,
        keys.identity,
        device_id=keys.device_id,
        device_name=keys.device_name,
        device_type=keys.device_type,
        next_device_seq=keys.next_device_seq,
        **kwargs,
    )


# ---------------------------------------------------------------- keygen


def cmd_keygen(args: argparse.Namespace, out: TextIO, err: Optional[TextIO] = None) -> int:
    """Write a new device key file; print user_id and device_id (never the seed)."""
    path = os.path.expanduser(args.keys)
    if os.path.exists(path) and not args.force:
        raise CliError("{} exists; refusing to overwrite a key file (use --force)".format(path))
    if args.from_path:
        keys = DeviceKeys.load(args.from_path).for_new_device(args.name, args.device_type)
    else:
        keys = DeviceKeys.generate(args.name, args.device_type)
    keys.save(path)
    out.write("user_id={}\ndevice_id={}\n".format(keys.user_id, keys.device_id))
    _progress("wrote {} (keep it private: it holds the user key)".format(path), err)
    return 0


# ---------------------------------------------------------------- send


async def cmd_send(reactor: Any, args: argparse.Namespace, payload: bytes, out: TextIO) -> int:
    """Send stdin as one event and print the ack."""
    keys = DeviceKeys.load(args.keys)
    client = _client_for(reactor, args.url, keys, auto_ack=False, keep_history=False)
    _progress("connecting to {} as device {}".format(args.url, keys.device_id))
    await client.connect()
    device_seq = client.next_device_seq
    keys.next_device_seq = device_seq + 1
    keys.save(args.keys)  # reserve the seq before it is used (see DeviceKeys)
    ttl = args.expires_at
    if args.ttl is not None:
        ttl = int(reactor.seconds() * 1000) + args.ttl
    ack = await client.send_event(
        stream_id=args.stream,
        type=args.type,
        encrypted_payload=base64.b64encode(payload).decode("ascii"),
        ttl=ttl,
        device_seq=device_seq,
        timeout=args.timeout,
    )
    if ack.get("dropped"):
        out.write("dropped\n")
    else:
        out.write("stored seq={} stream_seq={}\n".format(ack.get("seq"), ack.get("stream_seq")))
    out.flush()
    await client.close()
    return 0


# ---------------------------------------------------------------- watch


def format_event(event: Dict[str, Any], as_json: bool) -> str:
    """One output line for an event: a summary, or the full payload as JSON."""
    if as_json:
        return orjson.dumps(event).decode("utf-8")
    data = event.get("encrypted_payload")
    size: Any = "?"
    if isinstance(data, str):
        try:
            size = len(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError):
            size = len(data)
    return "seq={} stream={} type={} size={}".format(event.get("seq"), event.get("stream_id"), event.get("type"), size)


async def cmd_watch(reactor: Any, args: argparse.Namespace, out: Any) -> int:
    """Print received events until ``--count`` are printed (or for ever)."""
    keys = DeviceKeys.load(args.keys)
    dedupe = EventDeduper()
    printed: List[int] = [0]
    runner: Optional[ReconnectingClient] = None

    def on_event(event: Dict[str, Any]) -> None:
        """Print, dedupe and ack one event; stop after ``--count``."""
        done = args.count is not None and printed[0] >= args.count
        if done:
            return  # not acked: the server sends it again next time
        if dedupe.is_new(event):
            if args.decode:
                data = event.get("encrypted_payload")
                try:
                    raw = base64.b64decode(data if isinstance(data, str) else "", validate=True)
                except (binascii.Error, ValueError):
                    raw = b"<invalid base64>"
                out.flush()
                out.buffer.write(raw if raw.endswith(b"\n") else raw + b"\n")
            else:
                out.write(format_event(event, args.json) + "\n")
            out.flush()
            printed[0] += 1
            seq = event.get("seq")
            if isinstance(seq, int) and seq > keys.last_received_seq:
                keys.last_received_seq = seq
        if isinstance(event.get("device_seq"), int):
            try:
                client.ack(event["device_seq"])
            except ConnectionClosed:
                pass  # it is sent again on the next connection
        if args.count is not None and printed[0] >= args.count and runner is not None:
            reactor.callLater(0, runner.stop)

    client = _client_for(reactor, args.url, keys, auto_ack=False, keep_history=False, on_event=on_event)

    def connected(est: Dict[str, Any]) -> None:
        """Progress: connected."""
        _progress("connected as device {}; catching up".format(keys.device_id))

    def caught_up(events: list) -> None:
        """Progress: backlog done."""
        _progress("caught up ({} replayed events)".format(len(events)))

    def disconnected(code: Optional[int], reason: str, decision: RetryDecision) -> None:
        """Progress: reconnect plan, or fail with ``--no-reconnect``."""
        if not decision.retry:
            return  # the runner raises DeviceRevoked
        if not args.reconnect:
            raise ConnectionClosed(code or 1006, reason)
        if decision.retry:
            _progress("disconnected ({} {}); reconnecting in {:.1f} s".format(code, reason, decision.delay))

    runner = ReconnectingClient(reactor, client, on_connected=connected, on_caught_up=caught_up,
                                on_disconnected=disconnected)
    _progress("connecting to {}".format(args.url))
    try:
        await runner.run()
    finally:
        if keys.last_received_seq:
            try:
                keys.save(args.keys)
            except OSError as e:
                _progress("warning: could not update {}: {}".format(args.keys, e.strerror))
    return 0


# ---------------------------------------------------------------- main


def ws_url(text: str) -> str:
    """argparse type: a ``ws://`` or ``wss://`` URL."""
    from autobahn.websocket.util import parse_url

    try:
        parse_url(text)
    except Exception as e:  # Autobahn raises plain Exception/ValueError with a message
        raise argparse.ArgumentTypeError("not a WebSocket URL (ws://host:port/ws or wss://…): {}".format(e))
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="pocketbridge-cli", description="PocketBridge v1 command-line client.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log protocol details to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    def keys_option(p: argparse.ArgumentParser) -> None:
        """Add ``--keys``/``--device-keys`` to a subcommand."""
        p.add_argument("--keys", "--device-keys", dest="keys", default=default_keys_path(), metavar="PATH",
                       help="device key file (default: %(default)s)")

    keygen = sub.add_parser("keygen", help="create a device key file")
    keys_option(keygen)
    keygen.add_argument("--name", help="device name shown to the user's other devices")
    keygen.add_argument("--type", dest="device_type", default="cli", choices=DEVICE_TYPES)
    keygen.add_argument("--from", dest="from_path", metavar="PATH",
                        help="copy the user key from this device file (a second device of the same user)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key file")

    send = sub.add_parser("send", help="send stdin as one event (base64, not end-to-end encrypted in v1)")
    send.add_argument("--url", required=True, type=ws_url, help="WebSocket URL, e.g. ws://127.0.0.1:3001/ws")
    keys_option(send)
    send.add_argument("--stream", required=True, help="stream_id, e.g. clipboard:main")
    send.add_argument("--type", required=True, help="event type, e.g. clipboard:text")
    expiry = send.add_mutually_exclusive_group()
    expiry.add_argument("--ttl", type=int, metavar="MS", help="expire the event MS milliseconds from now")
    expiry.add_argument("--expires-at", type=int, metavar="MS", help="expire the event at this Unix time in ms")
    send.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the ack (default 30)")

    watch = sub.add_parser("watch", help="print events sent by the user's other devices")
    watch.add_argument("--url", required=True, type=ws_url, help="WebSocket URL, e.g. ws://127.0.0.1:3001/ws")
    keys_option(watch)
    watch.add_argument("--count", type=int, metavar="N", help="exit after N events")
    output = watch.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print each event as one JSON line")
    output.add_argument("--decode", action="store_true", help="print each event's base64-decoded payload")
    watch.add_argument("--no-reconnect", dest="reconnect", action="store_false",
                       help="exit with an error when the connection ends instead of reconnecting")
    return parser


def _start_logging(verbose: bool) -> None:
    """Send Twisted logs to stderr (errors only unless ``--verbose``)."""
    level = LogLevel.debug if verbose else LogLevel.error
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])], redirectStandardIO=False
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``pocketbridge-cli``; exits with the command's status."""
    args = build_parser().parse_args(argv)
    _start_logging(args.verbose)
    if args.command == "keygen":
        try:
            sys.exit(cmd_keygen(args, sys.stdout))
        except (CliError, KeyFileError, OSError) as e:
            _progress("error: " + (describe(e) if not isinstance(e, OSError) else str(e)))
            sys.exit(1)
    if args.command == "watch" and args.count is not None and args.count < 1:
        _progress("error: --count must be at least 1")
        sys.exit(2)
    payload = b""
    if args.command == "send":
        payload = sys.stdin.buffer.read()
        if not payload:
            _progress("error: stdin is empty; nothing to send")
            sys.exit(1)

    from twisted.internet.task import react

    async def run(reactor: Any) -> None:
        """Run the subcommand and turn its outcome into an exit status."""
        try:
            if args.command == "send":
                code = await cmd_send(reactor, args, payload, sys.stdout)
            else:
                code = await cmd_watch(reactor, args, sys.stdout)
        except Exception as e:
            where = " ({})".format(args.url) if isinstance(e, (ConnectError, DNSLookupError)) else ""
            _progress("error: " + describe(e) + where)
            raise SystemExit(1)
        raise SystemExit(code)

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
