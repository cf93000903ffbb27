"""
``pocketbridge-cli watch``: print the events of the user's other devices,
decrypted, and resume where the previous ``watch`` stopped.

The key file's ``last_received_seq`` is the resume point, and it only ever
covers events this command has printed: with ``--count N`` the events after
the N-th are neither acknowledged nor recorded, so the next ``watch`` gets
them. Acks are cumulative ``{seq}``, one per reactor turn (a catch-up page
costs one ack). Events at or below the resume point that the server sends
again (at-least-once delivery) are acknowledged and skipped.
"""

from __future__ import annotations

import argparse
import base64
from typing import Any, Dict, Optional, TextIO

import orjson

from pocketbridge.cli.support import CliError, keys_path, progress, save_keys, sync_pins, working_copy
from pocketbridge.client import Client, ConnectionClosed, DeviceKeys, ReconnectingClient, RetryDecision
from pocketbridge.client._util import is_wire_int
from pocketbridge.client.connection import ABNORMAL_CLOSE
from pocketbridge.client.payload import PayloadKey

#: Seconds between key-file saves while events stream in (each save is an fsync).
SAVE_INTERVAL = 2.0

NOT_DECRYPTABLE = "<not decryptable>"

#: Close codes worth retrying even before the first session: the server is there but busy or restarting.
TRANSIENT_CLOSES = frozenset({1001, 1013, 4008, 4029})


def decrypt(key: PayloadKey, event: Dict[str, Any]) -> Optional[bytes]:
    """The plaintext of ``event``, or None when it does not open (a v1 sender, another key, tampering)."""
    stream, etype = event.get("stream_id"), event.get("type")
    if not isinstance(stream, str) or not isinstance(etype, str):
        return None
    try:
        return key.open(event.get("encrypted_payload"), stream, etype)
    except ValueError:  # PayloadError, or NUL in stream/type
        return None


def render(event: Dict[str, Any], plaintext: Optional[bytes], mode: str) -> bytes:
    """
    The bytes printed for one event. ``text``: a ``seq= stream= type=``
    line, then the plaintext as UTF-8 (invalid bytes replaced) ending in a
    newline. ``json``: one object per line (``text`` when the plaintext is
    UTF-8, else ``base64``; ``decrypted: false`` when it does not open).
    ``raw``: the plaintext bytes alone.
    """
    if mode == "raw":
        return plaintext or b""
    if mode == "json":
        fields = ("seq", "stream_id", "stream_seq", "type", "event_id", "device_id", "device_seq", "created_at", "ttl")
        doc: Dict[str, Any] = {k: event.get(k) for k in fields if k in event}
        doc["decrypted"] = plaintext is not None
        if plaintext is not None:
            try:
                doc["text"] = plaintext.decode("utf-8")
            except UnicodeDecodeError:
                doc["base64"] = base64.b64encode(plaintext).decode("ascii")
        return orjson.dumps(doc) + b"\n"
    head = "seq={} stream={} type={}\n".format(event.get("seq"), event.get("stream_id"), event.get("type"))
    body = NOT_DECRYPTABLE if plaintext is None else plaintext.decode("utf-8", "replace")
    return (head + body + ("" if body.endswith("\n") else "\n")).encode("utf-8")


class Watcher:
    """
    The state of one ``watch`` run across reconnections: what was printed
    (``done_seq``), what to ack, when to save. Reactor thread only.
    """

    def __init__(self, reactor: Any, args: argparse.Namespace, keys: DeviceKeys, path: str, out: Any) -> None:
        self.reactor = reactor
        self.args = args
        self.keys = keys
        self.path = path
        self.out = out
        self.mode = "json" if args.json else "raw" if args.raw else "text"
        self.payload_key = PayloadKey.from_identity(keys.identity)
        self.work = working_copy(keys)
        self.done_seq = keys.last_received_seq  # everything up to here was printed (this run or before)
        self.ack_target = 0  # highest seq handled on the current connection
        self.acked = 0  # highest seq acked on the current connection
        self.printed = 0
        self.finished = False
        self.connected_once = False
        self._ack_call: Any = None
        self._saved_at = reactor.seconds()
        self.client = Client.for_device(reactor, args.urls.ws, self.work, auto_ack=False, keep_history=False,
                                        on_event=self.on_event, on_resync=self.on_resync,
                                        server_key=args.server_key)
        self.runner = ReconnectingClient(reactor, self.client, on_connected=self.on_connected,
                                         on_caught_up=self.on_caught_up, on_disconnected=self.on_disconnected)

    # ------------------------------------------------------------ events

    def on_event(self, event: Dict[str, Any]) -> None:
        """Print a new event, skip a repeat, schedule the ack; stop after ``--count``."""
        if self.finished:
            return  # not acked, not recorded: the next watch gets it
        seq = event.get("seq")
        if is_wire_int(seq) and seq <= self.done_seq:
            self.ack_target = max(self.ack_target, seq)  # printed before; ack it again so the window moves
            self._schedule_ack()
            return
        plaintext = decrypt(self.payload_key, event)
        if plaintext is None and self.mode == "raw":
            progress("seq={} stream={} type={}: {}".format(seq, event.get("stream_id"), event.get("type"),
                                                          NOT_DECRYPTABLE))
        self._write(render(event, plaintext, self.mode))
        self.printed += 1
        if is_wire_int(seq):
            self.done_seq = self.ack_target = max(self.done_seq, seq)
        self._schedule_ack()
        if self.args.count is not None and self.printed >= self.args.count:
            self.finished = True
            self.reactor.callLater(0, self.finish)

    def _write(self, data: bytes) -> None:
        """Write bytes to stdout and flush (a pipe reader sees each event at once)."""
        buffer = getattr(self.out, "buffer", None)
        self.out.flush()
        if buffer is not None:
            buffer.write(data)
            buffer.flush()
        else:
            self.out.write(data.decode("utf-8"))
            self.out.flush()

    def on_resync(self, payload: Dict[str, Any]) -> None:
        """The server no longer holds everything after the resume point."""
        progress("warning: events before seq {} are gone (server retention); the backlog starts there".format(
            payload.get("oldest_seq")))

    # ------------------------------------------------------------ acks and saving

    def _schedule_ack(self) -> None:
        """One ack per reactor turn: a whole catch-up page is handled before the ack goes out."""
        if self._ack_call is None:
            self._ack_call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        """Ack what was handled on this connection; save the resume point every ``SAVE_INTERVAL`` s."""
        if self._ack_call is not None and self._ack_call.active():
            self._ack_call.cancel()
        self._ack_call = None
        if self.ack_target > self.acked:
            try:
                self.client.ack_seq(self.ack_target)
                self.acked = self.ack_target
            except ConnectionClosed:
                pass  # the next connection resumes from the saved seq
        if self.reactor.seconds() - self._saved_at >= SAVE_INTERVAL:
            self.save()

    def save(self) -> None:
        """Write the resume point and any new server pin to the key file (only when they changed)."""
        self._saved_at = self.reactor.seconds()
        try:
            sync_pins(self.keys, self.work, self.path)
            if self.done_seq > self.keys.last_received_seq:
                self.keys.last_received_seq = self.done_seq
                save_keys(self.keys, self.path)
        except OSError as e:
            progress("warning: could not update {}: {}".format(self.path, e.strerror or e))

    def finish(self) -> None:
        """Ack, save and close: ``--count`` reached."""
        self.flush()
        self.save()
        self.runner.stop()

    # ------------------------------------------------------------ connection progress

    def on_connected(self, session: Dict[str, Any]) -> None:
        """A session is up: new per-connection ack state; save a newly pinned key."""
        self.connected_once = True
        self.ack_target = self.acked = 0
        self.save()
        progress("connected as device {}; catching up after seq {}".format(self.keys.device_id, self.done_seq))

    def on_caught_up(self, events: list) -> None:
        """The backlog is done."""
        self.save()
        if not self.finished:
            progress("caught up; waiting for new events" + (" ({} of {} printed)".format(
                self.printed, self.args.count) if self.args.count is not None else ""))

    def on_disconnected(self, code: Optional[int], reason: str, decision: RetryDecision) -> None:
        """Save; report the reconnect plan, or give up (first connection impossible, ``--no-reconnect``)."""
        self.save()
        if not decision.retry:
            return  # the runner raises DeviceRevoked
        if not self.connected_once and code not in TRANSIENT_CLOSES:
            # Never connected: most likely a wrong URL or a server that is down; say so instead of looping.
            raise CliError("cannot connect to {}: {}".format(
                self.args.urls.ws, reason if code in (None, ABNORMAL_CLOSE) else "{} {}".format(code, reason)))
        if not self.args.reconnect:
            raise ConnectionClosed(code or ABNORMAL_CLOSE, reason)
        progress("disconnected ({} {}); reconnecting in {:.1f} s".format(code, reason, decision.delay))


async def cmd_watch(reactor: Any, args: argparse.Namespace, out: TextIO) -> int:
    """Print events until ``--count`` were printed (or until interrupted)."""
    path = keys_path(args.keys)
    keys = DeviceKeys.load(path)
    watcher = Watcher(reactor, args, keys, path, out)
    progress("connecting to {}".format(args.urls.ws))
    try:
        await watcher.runner.run()
    finally:
        watcher.save()
    return 0
