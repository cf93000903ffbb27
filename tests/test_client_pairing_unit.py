"""
Unit tests of the SDK's pairing crypto (``pocketbridge.client.pairing``) and
payload encryption (``pocketbridge.client.payload``): no sockets, no clock.
"""

from __future__ import annotations

import base64
import re
from typing import Any, Dict, List, Set, Tuple
from urllib.parse import parse_qsl, urlsplit

import orjson
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from pocketbridge.client import pairing

from pocketbridge.client.keys import DeviceKeys, Identity
from pocketbridge.client.pairing import (
    BUNDLE_AAD,
    Pake,
    PairingBurned,
    PairingCodeInUse,
    PairingExpired,
    PairingFailed,
    PairingTimedOut,
    RateLimited,
    _raise_for,
    derive_keys,
    identity_bundle,
    keys_from_bundle,
    new_code,
    normalize_code,
    open_bundle,
    seal_bundle,
)
from pocketbridge.client.payload import PayloadError, PayloadKey
from pocketbridge.client.rest import RestClient, RestResponse

# The server's rule for encrypted_payload (PROTOCOL.md §6).
SERVER_B64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
# What the mailbox accepts as a relayed message (pocketbridge/server/api/pairing_v2.py).
MAILBOX_TEXT = re.compile(r"^[A-Za-z0-9+/=_-]+$")


def run_pake(code_a: str, code_b: str) -> Any:
    """Both sides of one SPAKE2 run: (A's keys, B's keys)."""
    a = Pake("A", code_a)
    b = Pake("B", code_b)
    return a.finish(b.message), b.finish(a.message)


class CodeTests(SynchronousTestCase):
    """Pairing codes."""

    def test_new_code_is_six_digits_and_varies(self) -> None:
        """new_code gives six ASCII digits, leading zeros kept, and not the same code every time."""
        codes = {new_code() for _ in range(200)}
        for code in codes:
            self.assertRegex(code, r"^[0-9]{6}$")
        self.assertGreater(len(codes), 150)

    def test_normalize_code(self) -> None:
        """Spaces and hyphens people type are dropped; anything but six digits is refused."""
        self.assertEqual(normalize_code(" 012-345 "), "012345")
        for bad in ("12345", "1234567", "12345a", "١٢٣٤٥٦", "", 123456):
            self.assertRaises(PairingFailed, normalize_code, bad)  # type: ignore[arg-type]


class PakeTests(SynchronousTestCase):
    """SPAKE2 with the code as password."""

    def test_equal_codes_agree(self) -> None:
        """With the same code both sides derive the same sealing key and verification string (ten base32 characters)."""
        a, b = run_pake("482913", "482913")
        self.assertEqual(a.seal_key, b.seal_key)
        self.assertEqual(len(a.seal_key), 32)
        self.assertEqual(a.verification, b.verification)
        self.assertRegex(a.verification, r"^[0-9A-HJKMNP-TV-Z]{5}-[0-9A-HJKMNP-TV-Z]{5}$")

    def test_runs_are_independent(self) -> None:
        """Two runs with the same code give different keys (fresh randomness each time)."""
        first, _ = run_pake("482913", "482913")
        second, _ = run_pake("482913", "482913")
        self.assertNotEqual(first.seal_key, second.seal_key)

    def test_different_codes_disagree_and_bundle_does_not_open(self) -> None:
        """With different codes the keys differ, and B cannot open A's sealed bundle: 'codes do not match'."""
        a, b = run_pake("482913", "482914")
        self.assertNotEqual(a.seal_key, b.seal_key)
        sealed = seal_bundle(a.seal_key, identity_bundle(DeviceKeys.generate()))
        e = self.assertRaises(PairingFailed, open_bundle, b.seal_key, sealed)
        self.assertEqual(str(e), "codes do not match")

    def test_messages_fit_the_mailbox(self) -> None:
        """Both PAKE messages are standard base64 text the mailbox accepts, far below 16 KiB."""
        for side in ("A", "B"):
            message = Pake(side, "000000").message
            self.assertRegex(message, MAILBOX_TEXT)
            self.assertRegex(message, SERVER_B64)
            self.assertLess(len(message), 1024)

    def test_same_side_or_garbage_is_refused(self) -> None:
        """A message from the same side, or one that is not base64, raises PairingFailed."""
        a = Pake("A", "111111")
        self.assertRaises(PairingFailed, a.finish, Pake("A", "111111").message)
        self.assertRaises(PairingFailed, Pake("B", "111111").finish, "not base64!")
        self.assertRaises(PairingFailed, Pake("B", "111111").finish, base64.b64encode(b"A" + b"\x00" * 32).decode())
        self.assertRaises(ValueError, Pake, "C", "111111")

    def test_derive_keys_is_deterministic(self) -> None:
        """derive_keys depends only on the SPAKE2 key: same input, same output; another input, another key."""
        self.assertEqual(derive_keys(b"\x01" * 32), derive_keys(b"\x01" * 32))
        self.assertNotEqual(derive_keys(b"\x01" * 32).seal_key, derive_keys(b"\x02" * 32).seal_key)
        self.assertNotIn(derive_keys(b"\x01" * 32).seal_key.hex(), repr(derive_keys(b"\x01" * 32)))


class BundleTests(SynchronousTestCase):
    """The sealed identity bundle."""

    def test_round_trip_gives_a_new_device_of_the_user(self) -> None:
        """Seal then open returns the bundle; the keys built from it have A's identity and pins and a new device_id."""
        a = DeviceKeys.generate(device_name="Laptop")
        a.pin_server_key("wss://sync.example/ws", "ab" * 32)
        key = b"\x07" * 32
        sealed = seal_bundle(key, identity_bundle(a))
        self.assertRegex(sealed, SERVER_B64)
        self.assertNotIn(a.identity.seed_hex, sealed)
        bundle = open_bundle(key, sealed)
        self.assertEqual(bundle, {"user_seed": a.identity.seed_hex, "user_id": a.user_id,
                                  "server_pins": {"sync.example:443": "ab" * 32}})
        b = keys_from_bundle(bundle, device_name="Phone", device_type="mobile")
        self.assertEqual(b.identity, a.identity)
        self.assertNotEqual(b.device_id, a.device_id)
        self.assertRegex(b.device_id, r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}$")
        self.assertEqual((b.device_name, b.device_type, b.next_device_seq, b.last_received_seq),
                         ("Phone", "mobile", 1, 0))
        self.assertEqual(b.pinned_server_key("wss://sync.example:443/ws"), "ab" * 32)

    def test_tampered_or_truncated_bundle_is_refused(self) -> None:
        """A flipped bit, a cut-off bundle, or a bundle sealed with another AAD does not open."""
        key = b"\x07" * 32
        raw = bytearray(base64.b64decode(seal_bundle(key, {"a": 1})))
        raw[-1] ^= 1
        self.assertRaises(PairingFailed, open_bundle, key, base64.b64encode(bytes(raw)).decode())
        self.assertRaises(PairingFailed, open_bundle, key, base64.b64encode(bytes(raw[:20])).decode())
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = b"\x00" * 12
        other_aad = base64.b64encode(nonce + AESGCM(key).encrypt(nonce, b"{}", b"other")).decode()
        self.assertRaises(PairingFailed, open_bundle, key, other_aad)
        right_aad = base64.b64encode(nonce + AESGCM(key).encrypt(nonce, b"{}", BUNDLE_AAD)).decode()
        self.assertEqual(open_bundle(key, right_aad), {})

    def test_inconsistent_bundle_is_refused(self) -> None:
        """A bundle whose user_id is not its seed's key, or with a bad seed or pins, raises PairingFailed."""
        good = identity_bundle(DeviceKeys.generate())
        for change in ({"user_id": Identity.generate().user_id}, {"user_seed": "zz"}, {"user_seed": None},
                       {"server_pins": {"h:1": "nothex"}}, {"server_pins": []}):
            self.assertRaises(PairingFailed, keys_from_bundle, {**good, **change})


class ErrorMappingTests(SynchronousTestCase):
    """HTTP answers become typed exceptions."""

    def test_statuses(self) -> None:
        """404, 409, 410 and 429 (with Retry-After) map to their exceptions, all PairingFailed."""
        def response(status: int, headers: Any = None) -> RestResponse:
            return RestResponse(status, Headers(headers or {}), b'{"error":"x","code":"Y"}')

        cases = [(404, PairingExpired), (409, PairingCodeInUse), (410, PairingBurned), (500, PairingFailed)]
        for status, exc in cases:
            e = self.assertRaises(exc, _raise_for, response(status), "testing")
            self.assertIsInstance(e, PairingFailed)
        limited = self.assertRaises(RateLimited, _raise_for, response(429, {"Retry-After": ["17"]}), "testing")
        self.assertEqual(limited.retry_after, 17)
        self.assertTrue(issubclass(PairingTimedOut, PairingFailed))


class PayloadTests(SynchronousTestCase):
    """End-to-end payload encryption."""

    def setUp(self) -> None:
        self.identity = Identity.from_seed(bytes(range(32)))
        self.key = PayloadKey.from_identity(self.identity)

    def test_round_trip_and_same_key_on_every_device(self) -> None:
        """A payload sealed on one device opens on another device of the same user (same seed, same key)."""
        other_device = PayloadKey.from_seed(bytes(range(32)))
        for plain in (b"", b"hello", bytes(range(256)) * 100):
            sealed = self.key.seal(plain, "clipboard:main", "clipboard:text")
            self.assertEqual(other_device.open(sealed, "clipboard:main", "clipboard:text"), plain)

    def test_derivation_vector(self) -> None:
        """The key is HKDF-SHA256(seed, salt 'pocketbridge/payload', info 'pocketbridge payload v1'), as documented."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"pocketbridge/payload",
                   info=b"pocketbridge payload v1").derive(bytes(range(32)))
        nonce = b"\x05" * 12
        sealed = self.key.seal(b"vector", "s", "t", nonce=nonce)
        expected = b"\x01" + nonce + AESGCM(raw).encrypt(nonce, b"vector", b"s\x00t")
        self.assertEqual(base64.b64decode(sealed), expected)

    def test_output_follows_the_server_rule(self) -> None:
        """Every sealed payload is padded standard base64 the server accepts (regex and length % 4 == 0)."""
        for n in range(0, 40):
            sealed = self.key.seal(b"x" * n, "s", "t")
            self.assertRegex(sealed, SERVER_B64)
            self.assertEqual(len(sealed) % 4, 0)
            self.assertEqual(base64.b64decode(sealed)[:1], b"\x01")

    def test_tamper_is_detected(self) -> None:
        """Any flipped bit in version, nonce, ciphertext or tag makes open raise PayloadError."""
        sealed = base64.b64decode(self.key.seal(b"secret", "s", "t"))
        for i in range(len(sealed)):
            bad = bytearray(sealed)
            bad[i] ^= 0x40
            self.assertRaises(PayloadError, self.key.open, base64.b64encode(bytes(bad)).decode(), "s", "t")

    def test_wrong_stream_type_or_key_is_rejected(self) -> None:
        """A payload moved to another stream or type, or opened by another user, raises PayloadError."""
        sealed = self.key.seal(b"secret", "clipboard:main", "clipboard:text")
        self.assertRaises(PayloadError, self.key.open, sealed, "clipboard:other", "clipboard:text")
        self.assertRaises(PayloadError, self.key.open, sealed, "clipboard:main", "file:chunk")
        # The separator keeps ("ab", "c") and ("a", "bc") apart.
        joined = self.key.seal(b"x", "ab", "c")
        self.assertRaises(PayloadError, self.key.open, joined, "a", "bc")
        other_user = PayloadKey.from_identity(Identity.generate())
        self.assertRaises(PayloadError, other_user.open, sealed, "clipboard:main", "clipboard:text")

    def test_malformed_input_is_rejected(self) -> None:
        """Unpadded, url-safe or truncated text, an unknown version and non-strings raise PayloadError."""
        sealed = self.key.seal(b"secret", "s", "t")
        raw = base64.b64decode(sealed)
        for bad in (sealed.rstrip("="), sealed.replace("+", "-").replace("/", "_") + "-_",
                    base64.b64encode(raw[:20]).decode(), base64.b64encode(b"\x02" + raw[1:]).decode(),
                    None, b"AAAA", "", sealed + "\n"):
            self.assertRaises(PayloadError, self.key.open, bad, "s", "t")
        self.assertRaises(ValueError, self.key.seal, b"x", "s\x00", "t")
        self.assertNotIn(bytes(range(32)).hex(), repr(self.key))


# ---------------------------------------------------------------------------
# The two coroutines against an in-memory mailbox (the real routes are tested
# against a real server in tests/test_pairing_v2.py, which keeps this honest).


class FakeMailbox:
    """
    The five mailbox routes in memory (API.md "Pairing, v2"), long-polls on
    a ``Clock``. ``taken`` codes answer 409 to a create.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.boxes: Dict[str, Dict[str, Any]] = {}
        self.taken: Set[str] = set()
        self.requests: List[Tuple[str, str]] = []

    def client(self) -> "FakeRest":
        """A RestClient whose requests this mailbox answers."""
        return FakeRest(self)

    async def answer(self, method: str, path: str, body: Any) -> Tuple[int, Any, Dict[str, str]]:
        self.requests.append((method, path))
        url = urlsplit(path)
        query = dict(parse_qsl(url.query))
        parts = url.path.split("/")[4:]  # after /api/pairing/v2
        wait = int(query.get("wait", "0"))
        if method == "POST" and not parts:
            if body["code"] in self.taken or body["code"] in self.boxes:
                return 409, {"error": "taken", "code": "CONFLICT"}, {}
            self.boxes[body["code"]] = {"msg_a": body["msg_a"], "msg_b": None, "token": None, "sealed": None}
            return 201, {"expires_at": 1}, {}
        box = self.boxes.get(parts[0])
        if box is None:
            return 404, {"error": "gone", "code": "NOT_FOUND"}, {}
        if method == "POST" and parts[1:] == ["join"]:
            box["msg_b"], box["token"] = body["msg_b"], "ab" * 32
            return 200, {"msg_a": box["msg_a"], "b_token": box["token"]}, {}
        if method == "PUT":
            box["sealed"] = body["sealed"]
            return 204, None, {}
        field = "msg_b" if len(parts) == 1 else "sealed"
        if field == "sealed" and query.get("token") != box["token"]:
            return 404, {"error": "gone", "code": "NOT_FOUND"}, {}
        deadline = self.clock.seconds() + wait
        while box[field] is None and self.clock.seconds() < deadline:
            await deferLater(self.clock, 0.5, lambda: None)
        if box[field] is None:
            return 204, None, {}
        if field == "sealed":
            del self.boxes[parts[0]]
        return 200, {field: box[field]}, {}


class FakeRest(RestClient):
    """A RestClient that asks a ``FakeMailbox`` instead of the network."""

    def __init__(self, mailbox: FakeMailbox) -> None:
        super().__init__(mailbox.clock, "http://fake")
        self.mailbox = mailbox

    async def request(self, method: str, path: str, body: Any = None, **kw: Any) -> RestResponse:
        status, doc, headers = await self.mailbox.answer(method, path, body)
        raw = b"" if doc is None else orjson.dumps(doc)
        return RestResponse(status, Headers({k: [v] for k, v in headers.items()}), raw)


class FlowTests(SynchronousTestCase):
    """pair_new and pair_join over the fake mailbox, on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.mailbox = FakeMailbox(self.clock)
        self.keys = DeviceKeys.generate()

    def run_clock(self, *ds: "Deferred[Any]", limit: float = 1000.0) -> None:
        """Advance the clock in small steps until every Deferred fired (or ``limit`` s passed)."""
        waited = 0.0
        while not all(d.called for d in ds) and waited < limit:
            self.clock.advance(0.25)
            waited += 0.25

    def test_both_sides_complete(self) -> None:
        """A and B finish with the same verification string, and B holds A's identity under a new device_id."""
        shown: Dict[str, str] = {}
        joined: List["Deferred[Any]"] = []

        def on_code(code: str) -> None:
            joined.append(Deferred.fromCoroutine(pairing.pair_join(
                self.clock, "http://fake", code, on_verify=lambda v: shown.__setitem__("b", v),
                rest=self.mailbox.client())))

        a = Deferred.fromCoroutine(pairing.pair_new(
            self.clock, self.mailbox.client(), self.keys, on_code=on_code,
            on_verify=lambda v: shown.__setitem__("a", v)))
        self.run_clock(a, *joined)
        result = self.successResultOf(a)
        b_keys, b_verification = self.successResultOf(joined[0])
        self.assertEqual({result.verification, b_verification, shown["a"], shown["b"]}, {result.verification})
        self.assertEqual(b_keys.identity, self.keys.identity)
        self.assertNotEqual(b_keys.device_id, self.keys.device_id)
        self.assertEqual(self.mailbox.boxes, {})

    def test_generated_code_that_is_taken_is_replaced(self) -> None:
        """A taken generated code is replaced by a fresh one before on_code; a taken chosen code raises PairingCodeInUse."""
        codes = iter(["111111", "222222"])
        self.patch(pairing, "new_code", lambda: next(codes))
        self.mailbox.taken.add("111111")
        shown: List[str] = []
        a = Deferred.fromCoroutine(pairing.pair_new(self.clock, self.mailbox.client(), self.keys,
                                                    on_code=shown.append, timeout=5))
        self.run_clock(a)
        self.failureResultOf(a, PairingTimedOut)
        self.assertEqual(shown, ["222222"])
        chosen = Deferred.fromCoroutine(pairing.pair_new(self.clock, self.mailbox.client(), self.keys, code="111111"))
        self.failureResultOf(chosen, PairingCodeInUse)

    def test_timeout_bounds_the_long_poll(self) -> None:
        """Unjoined, A long-polls with wait=30, 30, then the remaining 5 s and raises PairingTimedOut at 65 s."""
        a = Deferred.fromCoroutine(pairing.pair_new(self.clock, self.mailbox.client(), self.keys, code="333333",
                                                    timeout=65))
        self.run_clock(a, limit=64.5)
        self.assertNoResult(a)
        self.run_clock(a, limit=1.0)
        self.failureResultOf(a, PairingTimedOut)
        polls = [p for m, p in self.mailbox.requests if m == "GET"]
        self.assertEqual(polls, ["/api/pairing/v2/333333?wait=30", "/api/pairing/v2/333333?wait=30",
                                 "/api/pairing/v2/333333?wait=5"])

    def test_join_of_unknown_code(self) -> None:
        """pair_join of a code with no mailbox raises PairingExpired at once; a malformed code raises PairingFailed before any request."""
        def join(code: str) -> "Deferred[Any]":
            return Deferred.fromCoroutine(pairing.pair_join(self.clock, "http://fake", code,
                                                            rest=self.mailbox.client()))

        self.failureResultOf(join("444444"), PairingExpired)
        self.failureResultOf(join("44444"), PairingFailed)
        self.assertEqual(len(self.mailbox.requests), 1)
