"""
Pairing, v2, on the client: SPAKE2 over the server's mailbox (API.md
"Pairing, v2"; the design is in docs/pairing.md).

The existing device A runs ``pair_new``; the new device B runs ``pair_join``
with the six-digit code the user read off A. The code is the rendezvous and
the SPAKE2 password: both devices end with the same 32-byte key only when
they used the same code, and the server, which relays the messages, learns
nothing it could test a guess against offline. From that key each side
derives

- a sealing key, under which A seals the identity bundle
  (``{"user_seed", "user_id", "server_pins"}``) with AES-256-GCM, and
- a ten-character verification string, which both devices show so that the user
  can compare them before A hands the bundle over.

The sans-IO half (codes, PAKE, keys, the bundle, the errors) is in
``pairing_crypto`` and re-exported here. This module holds the two
coroutines; they take the reactor (for their deadline) and talk to the
server through ``RestClient``; they run on the reactor thread.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.task import deferLater

from pocketbridge.protocol.wire import TOKEN_RE, is_hex
from pocketbridge.client.keys import DeviceKeys
from pocketbridge.client.pairing_crypto import (  # re-exported: callers import them from here
    BUNDLE_AAD,
    NONCE_BYTES,
    PAKE_ID_A,
    PAKE_ID_B,
    SEAL_INFO,
    TAG_BYTES,
    VERIFY_INFO,
    PairingBurned,
    PairingCodeInUse,
    PairingExpired,
    PairingFailed,
    PairingKeys,
    PairingTimedOut,
    Pake,
    RateLimited,
    derive_keys,
    identity_bundle,
    keys_from_bundle,
    new_code,
    normalize_code,
    open_bundle,
    seal_bundle,
)
from pocketbridge.client.rest import RestClient, RestResponse

__all__ = [
    "PairingBurned",
    "PairingCodeInUse",
    "PairingExpired",
    "PairingFailed",
    "PairingKeys",
    "PairingResult",
    "PairingTimedOut",
    "Pake",
    "RateLimited",
    "derive_keys",
    "identity_bundle",
    "keys_from_bundle",
    "new_code",
    "normalize_code",
    "open_bundle",
    "pair_join",
    "pair_new",
    "seal_bundle",
]

MAX_WAIT = 30  # seconds: the server's longest long-poll (API.md)
REQUEST_SLACK = 15.0  # seconds a request may take beyond its long-poll before we give up on it
MIN_POLL_INTERVAL = 1.0  # seconds between long-polls that came back early
CREATE_ATTEMPTS = 3  # fresh codes tried when a generated one is taken

# ---------------------------------------------------------------------------
# Talking to the mailbox


@dataclass(frozen=True)
class PairingResult:
    """A's outcome: the code, the verification string both devices showed, and the mailbox expiry (ms)."""

    code: str
    verification: str
    expires_at: int


def _raise_for(resp: RestResponse, doing: str) -> None:
    """Translate an unwanted answer into the typed exception (API.md §2)."""
    status = resp.status
    if status == 429:
        header = resp.header("Retry-After") or ""
        raise RateLimited(int(header) if header.isdigit() else 60)
    if status == 404:
        raise PairingExpired("no pairing under this code: mistyped, expired or already used ({})".format(doing))
    if status == 410:
        raise PairingBurned("the code was used by another device too and is burned; start again")
    if status == 409:
        raise PairingCodeInUse("the code is already in use ({})".format(doing))
    message = resp.json.get("error") if isinstance(resp.json, dict) else None
    raise PairingFailed("{}: HTTP {}{}".format(doing, status, ": " + message if isinstance(message, str) else ""))


async def _call(reactor: Any, rest: RestClient, method: str, path: str, body: Any = None, *,
                sign: bool = True, wait: int = 0) -> RestResponse:
    """One request, abandoned ``wait + REQUEST_SLACK`` seconds after it was sent."""
    d = Deferred.fromCoroutine(rest.request(method, path, body, sign=sign))
    d.addTimeout(wait + REQUEST_SLACK, reactor)
    try:
        return await d
    except DeferredTimeoutError as e:
        raise PairingTimedOut("the server did not answer in time") from e


async def _long_poll(reactor: Any, rest: RestClient, path: str, deadline: float, sign: bool,
                     doing: str, waiting_for: str) -> RestResponse:
    """GET ``path`` (plus ``wait=N``) until 200 or ``deadline`` (reactor seconds)."""
    joiner = "&" if "?" in path else "?"
    while True:
        remaining = deadline - reactor.seconds()
        if remaining <= 0:
            raise PairingTimedOut("timed out waiting for {}".format(waiting_for))
        wait = max(1, min(MAX_WAIT, int(remaining)))
        started = reactor.seconds()
        resp = await _call(reactor, rest, "GET", "{}{}wait={}".format(path, joiner, wait), sign=sign, wait=wait)
        if resp.status == 200:
            return resp
        if resp.status != 204:
            _raise_for(resp, doing)
        if reactor.seconds() - started < MIN_POLL_INTERVAL:
            # The server answered early (a shorter wait than asked): do not spin.
            await deferLater(reactor, MIN_POLL_INTERVAL, lambda: None)


async def _maybe_await(value: Any) -> Any:
    if isinstance(value, Deferred) or inspect.isawaitable(value):
        return await value
    return value


def _mailbox_path(code: str) -> str:
    return "/api/pairing/v2/" + code


async def pair_new(
    reactor: Any,
    rest: RestClient,
    keys: DeviceKeys,
    code: Optional[str] = None,
    on_code: Optional[Callable[[str], Any]] = None,
    on_verify: Optional[Callable[[str], Any]] = None,
    timeout: float = 300.0,
) -> PairingResult:
    """
    Run device A's side: hand ``keys``' user identity to a new device.

    ``rest`` signs as a registered device of ``keys``' user (one WebSocket
    handshake registers it). ``code`` defaults to ``new_code()`` (a generated
    code that is taken is replaced, up to three times; a given one raises
    PairingCodeInUse). ``on_code(code)`` is called once the mailbox is open:
    show the code. ``on_verify(verification)`` is called once B has joined,
    before anything secret leaves: show the string; it may return (or fire a
    Deferred/coroutine with) ``False`` to refuse, and then the bundle is not
    sent (PairingFailed). ``timeout`` bounds the whole run in seconds.

    Raises PairingFailed or one of its subclasses; never logs the code or keys.
    """
    deadline = reactor.seconds() + timeout
    generated = code is None
    code = new_code() if code is None else normalize_code(code)
    for attempt in range(CREATE_ATTEMPTS):
        pake = Pake("A", code)
        resp = await _call(reactor, rest, "POST", "/api/pairing/v2", {"code": code, "msg_a": pake.message})
        if resp.status == 201:
            break
        if resp.status == 409 and generated and attempt + 1 < CREATE_ATTEMPTS:
            code = new_code()
            continue
        _raise_for(resp, "opening the mailbox")
    expires_at = resp.json.get("expires_at") if isinstance(resp.json, dict) else None
    if on_code is not None:
        await _maybe_await(on_code(code))

    got = await _long_poll(reactor, rest, _mailbox_path(code), deadline, True,
                           "waiting for the new device", "the new device to join")
    msg_b = got.json.get("msg_b") if isinstance(got.json, dict) else None
    derived = pake.finish(msg_b)  # type: ignore[arg-type]

    if on_verify is not None and await _maybe_await(on_verify(derived.verification)) is False:
        raise PairingFailed("the verification strings were not confirmed; nothing was sent")

    sealed = seal_bundle(derived.seal_key, identity_bundle(keys))
    put = await _call(reactor, rest, "PUT", _mailbox_path(code) + "/sealed", {"sealed": sealed})
    if put.status == 409:
        raise PairingFailed("the mailbox did not accept the sealed bundle (HTTP 409)")
    if put.status != 204:
        _raise_for(put, "sending the sealed bundle")
    return PairingResult(code, derived.verification, expires_at if isinstance(expires_at, int) else 0)


async def pair_join(
    reactor: Any,
    base_url: str,
    code: str,
    device_name: Optional[str] = None,
    device_type: str = "cli",
    timeout: float = 300.0,
    *,
    on_verify: Optional[Callable[[str], Any]] = None,
    rest: Optional[RestClient] = None,
) -> Tuple[DeviceKeys, str]:
    """
    Run device B's side with the ``code`` shown on A: (the new device's
    ``DeviceKeys``, the verification string).

    The keys hold the user's identity, a new ``device_id``, ``device_name``,
    ``device_type`` and A's server pins; nothing is saved (call
    ``keys.save(path)``) and the device is not registered until its first
    WebSocket handshake (``Client.for_device(reactor, ws_url, keys)``).
    ``on_verify(verification)`` is called as soon as it is known, before B
    waits for A: show it so that the user can compare it with A's. Returning
    ``False`` abandons the pairing (PairingFailed). ``timeout`` bounds the
    whole run in seconds. ``rest`` replaces the unsigned ``RestClient`` on
    ``base_url`` (another transport, tests).

    A mistyped code most likely names no mailbox: PairingExpired. One that
    names someone's mailbox but not this one's password gives another key,
    and the bundle does not open: PairingFailed("codes do not match").
    """
    deadline = reactor.seconds() + timeout
    code = normalize_code(code)
    rest = rest if rest is not None else RestClient(reactor, base_url)
    pake = Pake("B", code)
    resp = await _call(reactor, rest, "POST", _mailbox_path(code) + "/join", {"msg_b": pake.message}, sign=False)
    if resp.status != 200:
        _raise_for(resp, "joining")
    body = resp.json if isinstance(resp.json, dict) else {}
    token = body.get("b_token")
    if not is_hex(token, TOKEN_RE):
        raise PairingFailed("the server sent an invalid token")
    derived = pake.finish(body.get("msg_a"))  # type: ignore[arg-type]
    if on_verify is not None and await _maybe_await(on_verify(derived.verification)) is False:
        raise PairingFailed("the verification strings were not confirmed")

    got = await _long_poll(reactor, rest, "{}/sealed?token={}".format(_mailbox_path(code), token), deadline,
                           False, "fetching the sealed bundle", "the other device to send the identity")
    sealed = got.json.get("sealed") if isinstance(got.json, dict) else None
    bundle = open_bundle(derived.seal_key, sealed)  # type: ignore[arg-type]
    return keys_from_bundle(bundle, device_name, device_type), derived.verification
