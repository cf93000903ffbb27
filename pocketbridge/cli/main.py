"""
``pocketbridge-cli``: a PocketBridge client on the command line (protocol v2).

    pocketbridge-cli keygen   [--keys PATH] [--name NAME] [--type TYPE] [--from PATH] [--force]
    pocketbridge-cli pair new [--url URL] [--keys PATH] [--yes]
    pocketbridge-cli pair join CODE [--url URL] [--keys PATH] [--name NAME] [--type TYPE] [--yes] [--force]
    pocketbridge-cli send     [--url URL] [--keys PATH] --stream S --type T [--ttl MS | --expires-at MS]
    pocketbridge-cli watch    [--url URL] [--keys PATH] [--count N] [--json | --raw] [--no-reconnect]
    pocketbridge-cli devices  [--url URL] [--keys PATH] [--all] [--json]
    pocketbridge-cli revoke   DEVICE_ID [--url URL] [--keys PATH] [--self]
    pocketbridge-cli status   [--url URL] [--keys PATH]

``--url`` is ``http(s)://host:port`` or ``ws(s)://host:port/ws`` (either one
gives the other); ``POCKETBRIDGE_URL`` is the default. Payloads are
encrypted end to end with a key derived from the user key (``PayloadKey``,
docs/pairing.md); the server stores only ciphertext. docs/cli.md has the
details.

Results go to stdout, progress to stderr. A failure is one line on stderr
and exit status 1; a command line that cannot work is exit status 2; an
interrupted command exits 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn, Optional, Sequence

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from pocketbridge.cli.commands import cmd_devices, cmd_keygen, cmd_revoke, cmd_send, cmd_status
from pocketbridge.cli.pair import cmd_pair_join, cmd_pair_new
from pocketbridge.cli.support import CliError, UsageError, describe, parse_server_url, progress
from pocketbridge.cli.watch import cmd_watch
from pocketbridge.client.keys import DEVICE_TYPES, default_keys_path

URL_ENV = "POCKETBRIDGE_URL"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        """``<prog>: usage error: <message> (see <prog> --help)``."""
        progress("{}: usage error: {} (see {} --help)".format(self.prog, message, self.prog))
        sys.exit(EXIT_USAGE)


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not an integer: {!r}".format(text))
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def seconds(text: str) -> float:
    """argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number of seconds: {!r}".format(text))
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def hex64(text: str) -> str:
    """argparse type: 64 hex characters (a server key), lowercased."""
    if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise argparse.ArgumentTypeError("a server key is 64 hex characters")
    return text.lower()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = Parser(prog="pocketbridge-cli", description="PocketBridge command-line client (protocol v2).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log protocol details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def keys_option(p: argparse.ArgumentParser) -> None:
        """``--keys PATH``."""
        p.add_argument("--keys", "--device-keys", dest="keys", default=default_keys_path(), metavar="PATH",
                       help="this device's key file (default: %(default)s)")

    def server_options(p: argparse.ArgumentParser, timeout: float) -> None:
        """``--url``, ``--keys``, ``--server-key``, ``--timeout`` for a command that talks to the server."""
        p.add_argument("--url", default=os.environ.get(URL_ENV), metavar="URL",
                       help="server: http(s)://host:port or ws(s)://host:port/ws (default: ${})".format(URL_ENV))
        keys_option(p)
        p.add_argument("--server-key", type=hex64, metavar="HEX64",
                       help="accept and pin this server key (after the operator replaced it on purpose)")
        p.add_argument("--timeout", type=seconds, default=timeout, metavar="S",
                       help="seconds to wait for the server (default %(default)s)")

    keygen = sub.add_parser("keygen", help="create a key file: a new user, or another device of a user (--from)")
    keys_option(keygen)
    keygen.add_argument("--name", help="device name shown to the user's other devices")
    keygen.add_argument("--type", dest="device_type", default="cli", choices=DEVICE_TYPES)
    keygen.add_argument("--from", dest="from_path", metavar="PATH",
                        help="copy the user key of this key file (the v1 way; `pair` is the secure way)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key file")

    pair = sub.add_parser("pair", help="give the user key to a new device (SPAKE2 with a 6-digit code)")
    pair_sub = pair.add_subparsers(dest="pair_command", required=True, metavar="{new,join}")
    pair_new = pair_sub.add_parser("new", help="on an existing device: show a code for the new device")
    server_options(pair_new, 300.0)
    pair_new.add_argument("--yes", action="store_true",
                          help="do not ask to confirm the verification string (scripts)")
    pair_join = pair_sub.add_parser("join", help="on the new device: join with the code, write a new key file")
    pair_join.add_argument("code", metavar="CODE", help="the six digits shown by `pair new`")
    server_options(pair_join, 300.0)
    pair_join.add_argument("--name", help="this device's name")
    pair_join.add_argument("--type", dest="device_type", default="cli", choices=DEVICE_TYPES)
    pair_join.add_argument("--yes", action="store_true",
                           help="do not ask to confirm the verification string (scripts)")
    pair_join.add_argument("--force", action="store_true", help="overwrite an existing key file")

    send = sub.add_parser("send", help="encrypt stdin and send it as one event")
    server_options(send, 30.0)
    send.add_argument("--stream", required=True, help="stream_id, e.g. clipboard:main")
    send.add_argument("--type", required=True, help="event type, e.g. clipboard:text")
    expiry = send.add_mutually_exclusive_group()
    expiry.add_argument("--ttl", type=positive_int, metavar="MS", help="expire the event MS milliseconds from now")
    expiry.add_argument("--expires-at", type=positive_int, metavar="MS",
                        help="expire the event at this Unix time in milliseconds")

    watch = sub.add_parser("watch", help="print the events of the user's other devices, decrypted")
    server_options(watch, 30.0)
    watch.add_argument("--count", type=positive_int, metavar="N", help="exit after N events")
    output = watch.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object per event and line")
    output.add_argument("--raw", action="store_true", help="only the decrypted bytes, nothing added")
    watch.add_argument("--no-reconnect", dest="reconnect", action="store_false",
                       help="exit with an error when the connection ends instead of reconnecting")

    devices = sub.add_parser("devices", help="list the user's devices")
    server_options(devices, 30.0)
    devices.add_argument("--all", action="store_true", help="include revoked devices")
    devices.add_argument("--json", action="store_true", help="print the server's JSON document")

    revoke = sub.add_parser("revoke", help="revoke one of the user's devices")
    revoke.add_argument("device_id", metavar="DEVICE_ID", help="a device id, or a unique prefix of one")
    server_options(revoke, 30.0)
    revoke.add_argument("--self", action="store_true", help="allow revoking this device (sign it out)")

    status = sub.add_parser("status", help="server health, this device, connections and presence")
    server_options(status, 30.0)
    return parser


def _start_logging(verbose: bool) -> None:
    """Send Twisted logs to stderr: errors only unless ``--verbose``."""
    level = LogLevel.debug if verbose else LogLevel.error
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])], redirectStandardIO=False
    )


def _fail(exc: BaseException, args: argparse.Namespace) -> int:
    """Report ``exc`` as one line; the exit status it calls for."""
    prefix = exc.prefix if isinstance(exc, CliError) else "error"
    progress("{}: {}".format(prefix, describe(exc, getattr(args, "urls", None))))
    if args.verbose and not isinstance(exc, CliError):
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_ERROR


def _command(args: argparse.Namespace) -> Any:
    """The coroutine function running ``args.command``, called as ``fn(reactor)``."""
    out = sys.stdout
    if args.command == "send":
        if os.isatty(0):
            progress("reading the payload from stdin (end it with Ctrl-D)")
        payload = sys.stdin.buffer.read()
        return lambda reactor: cmd_send(reactor, args, payload, out)
    if args.command == "pair":
        fn = cmd_pair_new if args.pair_command == "new" else cmd_pair_join
        return lambda reactor: fn(reactor, args, out)
    fn = {"watch": cmd_watch, "devices": cmd_devices, "revoke": cmd_revoke, "status": cmd_status}[args.command]
    return lambda reactor: fn(reactor, args, out)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``pocketbridge-cli``; exits with the command's status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _start_logging(args.verbose)
    try:
        if args.command == "keygen":
            sys.exit(cmd_keygen(args, sys.stdout))
        if not args.url:
            raise UsageError("--url is required (or set {})".format(URL_ENV))
        args.urls = parse_server_url(args.url)
        command = _command(args)
    except Exception as e:  # CliError, KeyFileError, OSError before the reactor starts
        sys.exit(_fail(e, args))

    from twisted.internet.task import react

    async def run(reactor: Any) -> None:
        """Run the command; turn its outcome into ``SystemExit``. Shutdown (Ctrl-C) cancels it."""
        d = Deferred.fromCoroutine(command(reactor))
        interrupted = []

        def interrupt() -> None:
            interrupted.append(True)
            d.cancel()

        trigger = reactor.addSystemEventTrigger("before", "shutdown", interrupt)
        try:
            code = await d
        except CancelledError as e:
            if not interrupted:
                code = _fail(e, args)
            else:
                progress("interrupted")
                code = EXIT_INTERRUPTED
        except Exception as e:
            code = _fail(e, args)
        finally:
            try:
                reactor.removeSystemEventTrigger(trigger)
            except ValueError:
                pass  # already run
        raise SystemExit(code)

    react(run)


if __name__ == "__main__":
    main()
