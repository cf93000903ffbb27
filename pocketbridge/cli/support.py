"""
What every ``pocketbridge-cli`` command shares: the server address, error
wording, key files, a v2 connection that leaves the event cursor alone,
signed REST calls and the yes/no question.

Everything async here runs on the reactor thread. Key files are saved with
blocking I/O (fsync), only between network steps.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, TextIO
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferTimeoutError
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.web.client import ResponseFailed

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from pocketbridge.client import (
    Client,
    ConnectionClosed,
    DeviceKeys,
    DeviceRevoked,
    HandshakeError,
    KeyFileError,
    ServerKeyChanged,
    server_address,
)
from pocketbridge.client.pairing import PairingFailed
from pocketbridge.client.rest import RestClient, RestResponse

#: Seconds to wait for a closing handshake before dropping the socket.
CLOSE_TIMEOUT = 5.0


class CliError(Exception):
    """A failure reported as one line on stderr, ``<prefix>: <message>``, with exit status 1."""

    def __init__(self, message: str, prefix: str = "error") -> None:
        super().__init__(message)
        self.prefix = prefix


class UsageError(CliError):
    """A command line that cannot work as given: ``usage error: <message>``, exit status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message, prefix="usage error")


def progress(message: str, err: Optional[TextIO] = None) -> None:
    """One progress line on stderr (stdout is for results)."""
    stream = err if err is not None else sys.stderr
    stream.write(message + "\n")
    stream.flush()


def emit(out: TextIO, line: str) -> None:
    """One result line on stdout, flushed at once (scripts read it while the command runs)."""
    out.write(line + "\n")
    out.flush()


# ---------------------------------------------------------------- addresses


@dataclass(frozen=True)
class ServerUrls:
    """A server's two addresses: the REST base ``http(s)://host:port`` and the WebSocket ``ws(s)://host:port/ws``."""

    rest: str
    ws: str

    @property
    def address(self) -> str:
        """``host:port``, the key of the server pin."""
        return server_address(self.ws)


_URL_FORMS = "http(s)://host:port or ws(s)://host:port/ws"


def parse_server_url(text: str) -> ServerUrls:
    """
    Both addresses from one ``--url``: ``http://h:p`` gives ``ws://h:p/ws``,
    ``wss://h:p/ws`` gives ``https://h:p`` (the REST API and ``/ws`` share a
    port). CliError for anything else: a signed REST path may not be
    rewritten by a proxy (API.md §1.1), so a path prefix cannot work.
    """
    try:
        parts = urlsplit(text.strip())
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise CliError("bad server URL {!r} ({}); use {}".format(text, e, _URL_FORMS)) from e
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise CliError("bad server URL {!r}: use {}".format(text, _URL_FORMS))
    if parts.username or parts.password or parts.query or parts.fragment:
        raise CliError("bad server URL {!r}: no user, query or fragment; use {}".format(text, _URL_FORMS))
    path = parts.path.rstrip("/")
    if scheme.startswith("ws") and path != "/ws":
        raise CliError("bad server URL {!r}: a WebSocket URL ends in /ws".format(text))
    if scheme.startswith("http") and path:
        raise CliError("bad server URL {!r}: give the server's http(s)://host:port without a path".format(text))
    secure = scheme in ("https", "wss")
    return ServerUrls(
        rest="{}://{}".format("https" if secure else "http", parts.netloc),
        ws="{}://{}/ws".format("wss" if secure else "ws", parts.netloc),
    )


# ---------------------------------------------------------------- errors


def describe(exc: BaseException, urls: Optional[ServerUrls] = None) -> str:
    """A one-line, secret-free description of why a command failed."""
    where = " {}".format(urls.rest) if urls is not None else ""
    if isinstance(exc, CliError):
        return str(exc)
    if isinstance(exc, ServerKeyChanged):
        return ("the server key of {} changed: pinned {}, the server presented {}; someone may be intercepting"
                " the connection, or the operator replaced the key; if you know it was replaced, run again with"
                " --server-key {}".format(exc.address, exc.pinned, exc.presented, exc.presented))
    if isinstance(exc, (DeviceRevoked, ConnectionClosed)) and exc.code == 4003:
        return "this device was revoked (the server closed the connection: {} {})".format(exc.code, exc.reason)
    if isinstance(exc, ConnectionClosed):
        if exc.code == 4029:
            return "rate limited by the server ({}); try again later".format(exc.reason)
        return "the server closed the connection: {}".format(exc)
    if isinstance(exc, HandshakeError):
        return "handshake with the server failed: {}".format(exc)
    if isinstance(exc, ConnectionRefusedError):
        return "cannot connect to{}: connection refused".format(where)
    if isinstance(exc, DNSLookupError):
        return "cannot connect to{}: unknown host".format(where)
    if isinstance(exc, ConnectError):
        return "cannot connect to{}: {}".format(where, exc.osError or exc.__class__.__name__)
    if isinstance(exc, ResponseFailed):
        return "the connection to{} failed before an answer arrived".format(where)
    if isinstance(exc, (DeferTimeoutError, CancelledError)):
        return "timed out waiting for the server{}".format(where)
    if isinstance(exc, (KeyFileError, PairingFailed)):
        return str(exc)
    if isinstance(exc, OSError):
        return "{}: {}".format(exc.filename, exc.strerror) if exc.filename else str(exc)
    return "{}: {}".format(exc.__class__.__name__, exc)


# ---------------------------------------------------------------- key files


def keys_path(path: str) -> str:
    """A ``--keys`` value with ``~`` expanded."""
    return os.path.expanduser(path)


def working_copy(keys: DeviceKeys) -> DeviceKeys:
    """
    A separate ``DeviceKeys`` for a ``Client`` to update. The client moves
    ``last_received_seq`` as events arrive; the CLI decides what reaches the
    file, so that only ``watch`` (for what it printed) moves the resume point.
    """
    return DeviceKeys.from_dict(keys.to_dict())


@contextmanager
def key_file_lock(path: str) -> Iterator[None]:
    """
    Hold an exclusive ``flock`` on ``PATH.lock`` (created 0600 next to the
    key file) for a read-merge-write of the key file, so that two commands of
    one device (a ``send`` next to a running ``watch``) cannot each read the
    old file and the later write undo the earlier one. Where ``fcntl`` does
    not exist (Windows) the merge runs unlocked.
    """
    if fcntl is None:
        yield
        return
    path = os.path.expanduser(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def save_keys(keys: DeviceKeys, path: str) -> None:
    """
    Save ``keys``, keeping what another command of this device (a ``send``
    next to a running ``watch``) wrote since it was loaded: the counters only
    grow, and pins for other servers are kept. The read and the write happen
    under ``key_file_lock``.
    """
    with key_file_lock(path):
        try:
            disk: Optional[DeviceKeys] = DeviceKeys.load(path)
        except KeyFileError:
            disk = None
        if disk is not None and (disk.user_id, disk.device_id) == (keys.user_id, keys.device_id):
            keys.next_device_seq = max(keys.next_device_seq, disk.next_device_seq)
            keys.last_received_seq = max(keys.last_received_seq, disk.last_received_seq)
            for address, pin in disk.server_pins.items():
                keys.server_pins.setdefault(address, pin)
        keys.save(path)


def sync_pins(keys: DeviceKeys, work: DeviceKeys, path: str) -> None:
    """Save a server key the handshake pinned in ``work`` (trust on first use, or ``--server-key``)."""
    changed = {address: pin for address, pin in work.server_pins.items() if keys.server_pins.get(address) != pin}
    if changed:
        keys.server_pins.update(changed)
        save_keys(keys, path)


async def connect_device(reactor: Any, urls: ServerUrls, keys: DeviceKeys, path: str,
                         server_key: Optional[str] = None, keep_history: bool = False) -> Client:
    """
    A v2 session for the device in ``keys`` that leaves its event cursor
    alone: it acks nothing, so the events the server pushes (catch-up) are
    still there for the next ``watch``. The first handshake registers the
    device; a newly pinned server key is saved to ``path``.
    """
    work = working_copy(keys)
    client = Client.for_device(reactor, urls.ws, work, auto_ack=False, keep_history=keep_history,
                               server_key=server_key)
    await client.connect()
    sync_pins(keys, work, path)
    if client.pin_status == "new":
        progress("pinned the server key of {} (first v2 connection)".format(urls.address))
    return client


async def close_client(reactor: Any, client: Client) -> None:
    """Close with 1000 and wait (at most ``CLOSE_TIMEOUT`` s) for the closing handshake."""
    raw = client.raw
    if raw is None or raw.close_info is not None:
        return
    d = client.close()
    d.addTimeout(CLOSE_TIMEOUT, reactor)
    try:
        await d
    except DeferTimeoutError:
        raw.abort()


# ---------------------------------------------------------------- REST


class Api:
    """
    Signed REST calls as this device. A device that never opened a v2
    session is unknown to the REST API (401), so the first 401 triggers one
    handshake, which registers the device, and the request is signed again.
    """

    def __init__(self, reactor: Any, urls: ServerUrls, keys: DeviceKeys, path: str,
                 server_key: Optional[str] = None, timeout: float = 30.0) -> None:
        self.reactor = reactor
        self.urls = urls
        self.keys = keys
        self.path = path
        self.server_key = server_key
        self.timeout = timeout
        self.rest = RestClient(reactor, urls.rest, keys.identity, keys.device_id)
        self._registered = False

    async def _send(self, method: str, path: str, body: Any = None, sign: bool = True) -> RestResponse:
        """One request, given up after ``timeout`` s."""
        d = Deferred.fromCoroutine(self.rest.request(method, path, body, sign=sign))
        d.addTimeout(self.timeout, self.reactor)
        return await d

    async def get_unsigned(self, path: str) -> RestResponse:
        """GET without authentication (``/health``)."""
        return await self._send("GET", path, sign=False)

    async def request(self, method: str, path: str, body: Any = None) -> RestResponse:
        """
        A signed request; CliError for answers no caller can use (revoked,
        refused signature, rate limit, server error). Other statuses are the
        caller's to read.
        """
        resp = await self._send(method, path, body)
        if resp.status == 401 and not self._registered:
            self._registered = True
            progress("registering this device with {} (its first connection)".format(self.urls.rest))
            client = await connect_device(self.reactor, self.urls, self.keys, self.path, self.server_key)
            await close_client(self.reactor, client)
            resp = await self._send(method, path, body)
        code = resp.json.get("code") if isinstance(resp.json, dict) else None
        if resp.status == 403 and code == "DEVICE_REVOKED":
            raise CliError("this device was revoked (HTTP 403 DEVICE_REVOKED)")
        if resp.status == 401:
            raise CliError("the server refused this device's signed request (HTTP 401 {}); check that this"
                           " computer's clock is right".format(code))
        if resp.status == 429:
            raise CliError("rate limited by the server; retry in {} s".format(resp.header("Retry-After") or "a few"))
        if resp.status >= 500:
            raise CliError(rest_failure(resp, "the server failed"))
        return resp


def rest_failure(resp: RestResponse, doing: str) -> str:
    """``<doing>: HTTP <status> <code>: <error> (request id …)`` for an unexpected answer."""
    doc = resp.json if isinstance(resp.json, dict) else {}
    text = "{}: HTTP {}".format(doing, resp.status)
    if isinstance(doc.get("code"), str):
        text += " " + doc["code"]
    if isinstance(doc.get("error"), str):
        text += ": " + doc["error"]
    request_id = resp.header("X-Request-ID")
    return text + (" (request id {})".format(request_id) if request_id else "")


# ---------------------------------------------------------------- questions


def check_can_ask(yes: bool) -> None:
    """UsageError when a question would be needed but stdin is not a terminal."""
    if not yes and not os.isatty(0):
        raise UsageError("cannot ask for confirmation: stdin is not a terminal (compare the verification"
                         " strings yourself and pass --yes)")


def ask_yes_no(reactor: Any, question: str) -> "Deferred[bool]":
    """
    Ask on stderr, read one line from the terminal without blocking the
    reactor; fires True for ``y``/``yes``. The reading thread is a daemon
    and uses ``os.read`` (not ``sys.stdin``), so an unanswered question never
    keeps the process from exiting.
    """
    d: "Deferred[bool]" = Deferred()
    sys.stderr.write(question)
    sys.stderr.flush()

    def deliver(answer: bool) -> None:
        """Reactor thread: fire ``d`` (unless it was cancelled meanwhile)."""
        if not d.called:
            d.callback(answer)

    def read() -> None:
        """Reading thread: one line, then hand the answer to the reactor."""
        line = b""
        try:
            while not line.endswith(b"\n"):
                chunk = os.read(0, 256)
                if not chunk:
                    break
                line += chunk
        except OSError:
            pass
        answer = line.decode("utf-8", "replace").strip().lower() in ("y", "yes")
        reactor.callFromThread(deliver, answer)

    threading.Thread(target=read, name="pocketbridge-cli question", daemon=True).start()
    return d
