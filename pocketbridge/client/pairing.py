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

Everything but the two coroutines at the bottom is sans-IO. Those two take
the reactor (for their deadline) and talk to the server through
``RestClient``; they run on the reactor thread.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import os
import re
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B
from spake2.spake2 import SPAKEError
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.task import deferLater

from pocketbridge.client.keys import DeviceKeys, Identity
from pocketbridge.client.rest import RestClient, RestResponse
from pocketbridge.protocol.wire import HEX64_RE, PAIRING_CODE_RE, TOKEN_RE, is_hex

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

#: SPAKE2 identities of the two sides (fixed: the code is the only secret).
PAKE_ID_A = b"pocketbridge A"
PAKE_ID_B = b"pocketbridge B"
#: HKDF-SHA256 ``info`` of the sealing key and of the verification string.
SEAL_INFO = b"pocketbridge pair seal"
VERIFY_INFO = b"pocketbridge pair verify"
#: AES-256-GCM associated data of the sealed identity bundle.
BUNDLE_AAD = b"pocketbridge pair bundle"
NONCE_BYTES = 12
TAG_BYTES = 16

MAX_WAIT = 30  # seconds: the server's longest long-poll (API.md)
REQUEST_SLACK = 15.0  # seconds a request may take beyond its long-poll before we give up on it
MIN_POLL_INTERVAL = 1.0  # seconds between long-polls that came back early
CREATE_ATTEMPTS = 3  # fresh codes tried when a generated one is taken


# ---------------------------------------------------------------------------
# Errors


class PairingFailed(Exception):
    """Pairing did not complete; the message says why in words a user can read."""


class PairingCodeInUse(PairingFailed):
    """HTTP 409: the code is already live (pick another one)."""


class PairingExpired(PairingFailed):
    """HTTP 404: no live mailbox under this code (mistyped, expired or already completed)."""


class PairingBurned(PairingFailed):
    """HTTP 410: someone else joined this code too, so the server burned it. Start again."""


class PairingTimedOut(PairingFailed):
    """The other device did not take its step within the caller's ``timeout``."""


class RateLimited(PairingFailed):
    """HTTP 429: too many failed pairing attempts (or requests); ``retry_after`` in whole seconds."""

    def __init__(self, retry_after: int, message: str = "Too many failed pairing attempts") -> None:
        super().__init__("{}; retry in {} s".format(message, retry_after))
        self.retry_after = retry_after


# ---------------------------------------------------------------------------
# Codes, PAKE and keys (sans-IO)


def new_code() -> str:
    """Six random decimal digits from ``secrets`` (leading zeros kept)."""
    return "{:06d}".format(secrets.randbelow(1_000_000))


def normalize_code(code: str) -> str:
    """
    ``code`` without the spaces and hyphens people type (``"123 456"``);
    PairingFailed unless six ASCII digits remain.
    """
    if not isinstance(code, str):
        raise PairingFailed("a pairing code is six digits")
    cleaned = re.sub(r"[\s-]", "", code)
    if not PAIRING_CODE_RE.match(cleaned):
        raise PairingFailed("a pairing code is six digits")
    return cleaned


@dataclass(frozen=True)
class PairingKeys:
    """What both sides derive from the SPAKE2 key: the bundle sealing key and the verification string."""

    seal_key: bytes = field(repr=False)
    verification: str


def _hkdf(ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


def derive_keys(shared_key: bytes) -> PairingKeys:
    """
    The sealing key (32 bytes, HKDF-SHA256 info ``pocketbridge pair seal``)
    and the verification string of the SPAKE2 key: the first 50 bits of
    HKDF-SHA256 info ``pocketbridge pair verify`` as ten Crockford base32
    characters in two groups (``7QX2M-K9D4A``). 50 bits, because a malicious
    relay that learned the code can grind its own PAKE messages until both
    devices would show the same string: 20 bits (six digits) take it seconds.
    """
    seal = _hkdf(shared_key, SEAL_INFO, 32)
    bits = int.from_bytes(_hkdf(shared_key, VERIFY_INFO, 8), "big") >> 14
    chars = "".join(_CROCKFORD[(bits >> (5 * i)) & 31] for i in reversed(range(10)))
    return PairingKeys(seal, chars[:5] + "-" + chars[5:])


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise PairingFailed("the server sent an invalid {}".format(what))
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise PairingFailed("the server sent an invalid {}".format(what)) from e


class Pake:
    """
    One side (``"A"`` or ``"B"``) of a SPAKE2 run with the code as password.

    ``message`` is this side's message as base64 text (what the mailbox
    relays); ``finish`` takes the other side's and returns the derived
    ``PairingKeys``. A single use: ``finish`` may be called once.
    """

    def __init__(self, side: str, code: str, entropy: Callable[[int], bytes] = os.urandom) -> None:
        password = normalize_code(code).encode("ascii")
        if side == "A":
            self._spake: Any = SPAKE2_A(password, idA=PAKE_ID_A, idB=PAKE_ID_B, entropy_f=entropy)
        elif side == "B":
            self._spake = SPAKE2_B(password, idA=PAKE_ID_A, idB=PAKE_ID_B, entropy_f=entropy)
        else:
            raise ValueError("side must be 'A' or 'B'")
        self.side = side
        self.message = _b64(self._spake.start())

    def finish(self, other_message: str) -> PairingKeys:
        """The keys, given the other side's base64 message; PairingFailed when it is not one."""
        raw = _unb64(other_message, "PAKE message")
        try:
            shared = self._spake.finish(raw)
        except (SPAKEError, ValueError, AssertionError) as e:
            raise PairingFailed("the other device sent an invalid PAKE message") from e
        return derive_keys(shared)


# ---------------------------------------------------------------------------
# The identity bundle (sans-IO)


def identity_bundle(keys: DeviceKeys) -> Dict[str, Any]:
    """What A hands to B: the user's seed and id, and A's server pins."""
    return {
        "user_seed": keys.identity.seed_hex,
        "user_id": keys.identity.user_id,
        "server_pins": dict(sorted(keys.server_pins.items())),
    }


def seal_bundle(seal_key: bytes, bundle: Mapping[str, Any], nonce: Optional[bytes] = None) -> str:
    """
    base64(nonce(12) ‖ AES-256-GCM(seal_key, nonce, JSON(bundle),
    aad = ``pocketbridge pair bundle``) ‖ tag). ``nonce`` is random unless given (tests).
    """
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    if len(nonce) != NONCE_BYTES:
        raise ValueError("the nonce is 12 bytes")
    return _b64(nonce + AESGCM(seal_key).encrypt(nonce, orjson.dumps(dict(bundle)), BUNDLE_AAD))


def open_bundle(seal_key: bytes, sealed: str) -> Dict[str, Any]:
    """
    The bundle sealed by ``seal_bundle``. A different key, which is what a
    different code gives, fails authentication: PairingFailed("codes do not match").
    """
    raw = _unb64(sealed, "sealed bundle")
    if len(raw) < NONCE_BYTES + TAG_BYTES:
        raise PairingFailed("the sealed bundle is truncated")
    try:
        plain = AESGCM(seal_key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], BUNDLE_AAD)
    except InvalidTag as e:
        raise PairingFailed("codes do not match") from e
    try:
        doc = orjson.loads(plain)
    except orjson.JSONDecodeError as e:
        raise PairingFailed("the identity bundle is not JSON") from e
    if not isinstance(doc, dict):
        raise PairingFailed("the identity bundle is not an object")
    return doc


def keys_from_bundle(bundle: Mapping[str, Any], device_name: Optional[str] = None,
                     device_type: str = "cli") -> DeviceKeys:
    """
    A new device of the bundle's user: its identity, a fresh uuid4
    ``device_id``, fresh counters and A's server pins. PairingFailed when the
    bundle is malformed or its ``user_id`` is not the seed's public key.
    """
    try:
        identity = Identity.from_seed_hex(bundle.get("user_seed"))  # type: ignore[arg-type]
    except ValueError as e:
        raise PairingFailed("the identity bundle has no valid user_seed") from e
    user_id = bundle.get("user_id")
    if not isinstance(user_id, str) or user_id.lower() != identity.user_id:
        raise PairingFailed("the identity bundle's user_id does not match its seed")
    pins = bundle.get("server_pins", {})
    if not isinstance(pins, dict) or not all(
        isinstance(k, str) and k and is_hex(v, HEX64_RE) for k, v in pins.items()
    ):
        raise PairingFailed("the identity bundle has invalid server_pins")
    return DeviceKeys(identity, str(uuid.uuid4()), device_name=device_name, device_type=device_type,
                      server_pins=pins)


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
