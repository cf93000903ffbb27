"""
``pocketbridge-cli pair new`` and ``pair join CODE``: hand the user key to a
new device with the SDK's SPAKE2 pairing (docs/pairing.md).

``pair new`` runs on an existing device A. It opens a v2 session first
(which registers A if it never connected, and is where the server's
``pairing_complete`` notice arrives), opens the mailbox, prints the code,
waits for the new device, shows the verification string and, once the user
confirmed it, sends the sealed identity. ``pair join`` runs on the new device
B: it joins with the code, shows the verification string, waits for the
identity, writes a new key file and registers the device with one v2
handshake.

Results (code, verification string, ids) go to stdout as ``key=value``
lines so that scripts can read them while the command runs.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, List, TextIO

from twisted.internet.defer import CancelledError, TimeoutError as DeferTimeoutError

from pocketbridge.cli.support import (
    CliError,
    UsageError,
    ask_yes_no,
    check_can_ask,
    close_client,
    connect_device,
    describe,
    emit,
    keys_path,
    progress,
)
from pocketbridge.client import Client, ConnectionClosed, DeviceKeys
from pocketbridge.client.pairing import PairingFailed, normalize_code, pair_join, pair_new
from pocketbridge.client.rest import RestClient

#: Seconds ``pair new`` waits for ``pairing_complete`` after sending, at least.
MIN_COMPLETE_WAIT = 30.0


def _is_completion(message: Any, code: str) -> bool:
    """A ``pairing_complete`` notice for ``code``."""
    if not isinstance(message, dict) or message.get("type") != "pairing_complete":
        return False
    payload = message.get("payload")
    return not isinstance(payload, dict) or payload.get("code") in (None, code)


async def confirm(reactor: Any, verification: str, deadline: float) -> bool:
    """Ask whether both devices show ``verification``; CliError when nobody answers by ``deadline`` (reactor s)."""
    d = ask_yes_no(reactor, "Do both devices show {}? [y/N] ".format(verification))
    d.addTimeout(max(1.0, deadline - reactor.seconds()), reactor)
    try:
        return await d
    except DeferTimeoutError as e:
        raise CliError("no answer in time; nothing was sent") from e


async def _wait_complete(client: Client, since: int, code: str, timeout: float) -> None:
    """Until the server says the new device fetched the identity (``pairing_complete`` for ``code``)."""
    deadline = client.reactor.seconds() + timeout
    while True:
        if any(_is_completion(m, code) for m in client.messages[since:]):
            return
        since = len(client.messages)
        remaining = deadline - client.reactor.seconds()
        if remaining <= 0:
            raise DeferTimeoutError()
        await client.wait_for("pairing_complete", timeout=remaining, since=None)


async def cmd_pair_new(reactor: Any, args: argparse.Namespace, out: TextIO) -> int:
    """Device A: show a code, check the verification string, send the sealed identity, print ``paired``."""
    check_can_ask(args.yes)
    path = keys_path(args.keys)
    keys = DeviceKeys.load(path)
    urls = args.urls
    progress("connecting to {} as device {}".format(urls.ws, keys.device_id))
    client = await connect_device(reactor, urls, keys, path, args.server_key, keep_history=True)
    since = len(client.messages)
    started = reactor.seconds()
    refused: List[bool] = []  # set when the user answered no

    def on_code(code: str) -> None:
        emit(out, "code={}".format(code))
        progress("on the new device, run:  pocketbridge-cli pair join {} --url {}".format(code, urls.rest))
        progress("waiting for the new device (the code works once, for 5 minutes)")

    async def on_verify(verification: str) -> bool:
        emit(out, "verification={}".format(verification))
        if args.yes:
            progress("the new device joined; verification string {} (not confirmed: --yes)".format(verification))
        else:
            progress("the new device joined.")
            if not await confirm(reactor, verification, started + args.timeout):
                refused.append(True)
                return False
        if client.close_info is not None:
            # The session may have ended while the user was reading; the notice
            # that B fetched the identity only reaches an open socket.
            await client.connect()
        progress("sending the identity, sealed for the new device")
        return True

    try:
        try:
            result = await pair_new(reactor, RestClient(reactor, urls.rest, keys.identity, keys.device_id), keys,
                                    on_code=on_code, on_verify=on_verify, timeout=args.timeout)
        except PairingFailed as e:
            if refused:
                raise CliError("not confirmed; nothing was sent. If the strings differed, someone else may have"
                               " joined: start again with a new code") from e
            raise
        try:
            wait = max(MIN_COMPLETE_WAIT, args.timeout - (reactor.seconds() - started))
            await _wait_complete(client, since, result.code, wait)
        except (ConnectionClosed, DeferTimeoutError) as e:
            why = "the connection closed" if isinstance(e, ConnectionClosed) else "it timed out"
            raise CliError("the identity was sent, but {} before the new device confirmed it fetched it; check"
                           " `pocketbridge-cli devices` once the new device has connected".format(why)) from e
    finally:
        await close_client(reactor, client)
    emit(out, "paired")
    progress("the new device holds the user key now; it is listed by `devices` after its first connection")
    return 0


async def cmd_pair_join(reactor: Any, args: argparse.Namespace, out: TextIO) -> int:
    """Device B: join with the code, show the verification string, write a new key file, register."""
    check_can_ask(args.yes)
    path = keys_path(args.keys)
    if os.path.exists(path) and not args.force:
        raise CliError("{} exists; refusing to overwrite a key file (use another --keys PATH, or --force)".format(path))
    try:
        code = normalize_code(args.code)
    except PairingFailed as e:
        raise UsageError("{!r} is not a pairing code: {}".format(args.code, e)) from e
    urls = args.urls

    async def on_verify(verification: str) -> bool:
        emit(out, "verification={}".format(verification))
        if args.yes:
            progress("verification string {}: the other device must show the same".format(verification))
        elif not await confirm(reactor, verification, started + args.timeout):
            refused.append(True)
            return False
        progress("waiting for the other device to confirm and send the identity")
        return True

    progress("joining pairing code {} at {}".format(code, urls.rest))
    started = reactor.seconds()
    refused: List[bool] = []  # set when the user answered no
    try:
        keys, _ = await pair_join(reactor, urls.rest, code, device_name=args.name, device_type=args.device_type,
                                  timeout=args.timeout, on_verify=on_verify)
    except PairingFailed as e:
        if refused:
            raise CliError("not confirmed; the pairing was abandoned and nothing was saved") from e
        raise
    if os.path.exists(path) and not args.force:
        raise CliError("{} appeared while pairing; refusing to overwrite it (nothing was saved)".format(path))
    keys.save(path)
    progress("wrote {} (mode 0600; keep it private: it holds the user key)".format(path))
    try:
        client = await connect_device(reactor, urls, keys, path, args.server_key)
    except CancelledError:
        raise
    except Exception as e:
        raise CliError("{} was written, but registering the device failed: {}; any command that connects"
                       " (e.g. `pocketbridge-cli status`) registers it".format(path, describe(e, urls))) from e
    await close_client(reactor, client)
    emit(out, "user_id={}\ndevice_id={}".format(keys.user_id, keys.device_id))
    progress("paired: this device is registered as {}".format(keys.device_id))
    return 0
