"""
Fuzzing (hypothesis, in memory) of what a WebSocket client controls before
and after authentication: message parsing (``wire.parse_message``), event
validation (``events.check_event``) and the server handshake
(``handshake.ServerHandshake``). The contract's only outcomes are typed:
``Malformed`` (closes 1008 ``Invalid message format``), a ``Checked``
verdict, a ``server_hello``/``AuthRequest``, or ``ProtocolError`` with a
1008 close and a short ASCII reason. Anything else is a crash.
"""

from __future__ import annotations

import base64
import json
import string
import uuid
from typing import Any, Dict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.protocol import crypto
from pocketbridge.client import Identity, V1Handshake, V2Handshake
from pocketbridge.protocol.events import B64_RE, MAX_DEVICE_SEQ, STREAM_RE, TYPE_RE, Checked, Verdict, check_event
from pocketbridge.server.gateway.handshake import AuthRequest, ServerHandshake
from pocketbridge.protocol.wire import Malformed, ProtocolError, is_uuid, parse_message

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

USER = "ab" * 32
DEVICE = "0b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b"
NOW = 1_700_000_000_000
MAX_PAYLOAD = 1024

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=20)
hexish = st.text(alphabet="0123456789abcdefABCDEFxg", max_size=140)


def valid_event() -> Dict[str, Any]:
    """An event the session (USER, DEVICE) may send."""
    return {"event_id": str(uuid.uuid4()), "user_id": USER, "device_id": DEVICE, "device_seq": 1,
            "stream_id": "clipboard:main", "type": "clipboard:text", "encrypted_payload": "AAAA"}


field_values = st.one_of(json_values, hexish, st.just(USER), st.just(DEVICE), st.just(USER.upper()),
                         st.integers(-1, 2**63), st.text(alphabet=string.ascii_letters + string.digits + "+/=:_-",
                                                         max_size=80))


class ParseMessageFuzz(SynchronousTestCase):
    """parse_message accepts exactly JSON objects with a string type; everything else is Malformed (arbitrary bytes: test_wire_events)."""

    @FUZZ
    @given(json_values, st.integers(0, 80))
    def test_json_documents_and_deep_nesting(self, value: Any, depth: int) -> None:
        """A JSON document, possibly nested past 64: accepted only as an object with a string type, never deeper than 64."""
        doc = {"type": "x", "payload": value}
        for _ in range(depth):
            doc = {"type": "x", "payload": doc}
        data = json.dumps(doc).encode()
        try:
            msg_type, fields = parse_message(data)
        except Malformed:
            self.assertGreater(depth + 1 + _depth(value), 64, "a well-formed message 64 deep or less was refused")
            return
        self.assertLessEqual(depth + 1 + _depth(value), 64, "a message deeper than 64 was accepted")
        self.assertEqual(msg_type, "x")
        self.assertIsInstance(fields, dict)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


class CheckEventFuzz(SynchronousTestCase):
    """check_event returns a verdict for any fields; what it accepts obeys §6."""

    def check(self, fields: Dict[str, Any]) -> Checked:
        checked = check_event(fields, USER, DEVICE, MAX_PAYLOAD, NOW)
        self.assertIsInstance(checked.verdict, Verdict)
        self.assertTrue(checked.reason.isascii() and len(checked.reason) <= 123, checked.reason)
        if checked.verdict is Verdict.ACCEPT:
            event = checked.event
            assert event is not None
            self.assertTrue(is_uuid(event.event_id) and event.event_id == event.event_id.lower())
            self.assertEqual((event.user_id, event.device_id), (USER, DEVICE))
            self.assertTrue(type(event.device_seq) is int and 1 <= event.device_seq <= MAX_DEVICE_SEQ)
            self.assertTrue(STREAM_RE.match(event.stream_id) and TYPE_RE.match(event.type))
            payload = event.encrypted_payload
            self.assertTrue(0 < len(payload) <= MAX_PAYLOAD and len(payload) % 4 == 0 and B64_RE.match(payload))
            base64.b64decode(payload, validate=True)
        return checked

    @FUZZ
    @given(st.dictionaries(st.sampled_from(sorted(valid_event()) + ["ttl", "seq", "x"]), field_values, max_size=10))
    def test_arbitrary_fields(self, fields: Dict[str, Any]) -> None:
        """Random fields: a verdict, never an exception; accepted events are well-formed."""
        self.check(fields)

    @FUZZ
    @given(st.sampled_from(sorted(valid_event()) + ["ttl"]), field_values)
    def test_one_field_changed(self, name: str, value: Any) -> None:
        """A valid event with one field replaced: a verdict; accepted only if the new value is itself valid."""
        fields = valid_event()
        fields[name] = value
        self.check(fields)


class HandshakeFuzz(SynchronousTestCase):
    """ServerHandshake answers any hello/auth with a server_hello, an AuthRequest or a 1008 ProtocolError."""

    def setUp(self) -> None:
        self.key = crypto.signing_key_from_seed(bytes([0x22]) * 32)

    def protocol_error(self, e: ProtocolError) -> None:
        self.assertEqual(e.code, 1008)
        self.assertTrue(e.reason.isascii() and 0 < len(e.reason) <= 123, e.reason)

    @FUZZ
    @given(st.dictionaries(st.sampled_from(["client_ephemeral_pub", "nonce_c", "protocol_version", "x"]),
                           st.one_of(field_values, st.integers(-3, 5)), max_size=4))
    def test_client_hello_fields(self, fields: Dict[str, Any]) -> None:
        """Random client_hello fields: a server_hello of version 1 or 2, or a 1008 close."""
        hs = ServerHandshake(self.key)
        try:
            hello = hs.client_hello(fields)
        except ProtocolError as e:
            self.protocol_error(e)
            return
        self.assertIn(hello["protocol_version"], (1, 2))

    @SLOW
    @given(st.sampled_from([1, 2]), st.sampled_from(["user_id", "device_id", "client_signature", "nonce_c2",
                                                     "resume_from", "device_name", "device_type"]),
           st.one_of(field_values, st.just(None)), st.booleans())
    def test_client_auth_with_one_field_changed(self, version: int, name: str, value: Any, flip: bool) -> None:
        """A genuine client_auth with one field replaced (or its signature bit-flipped): AuthRequest only if still genuine, else 1008."""
        identity = Identity.generate()
        client: Any = V1Handshake(identity, DEVICE) if version == 1 else V2Handshake(identity, DEVICE, pins={})
        server = ServerHandshake(self.key)
        hello = server.client_hello(client.client_hello()["payload"])
        auth = dict(client.on_server_hello(hello)["payload"])
        genuine = dict(auth)
        auth[name] = value
        if flip:
            sig = bytearray(bytes.fromhex(genuine["client_signature"]))
            sig[0] ^= 1
            auth["client_signature"] = sig.hex()
        try:
            result = server.client_auth(auth)
        except ProtocolError as e:
            self.protocol_error(e)
            return
        self.assertIsInstance(result, AuthRequest)
        self.assertFalse(flip, "a flipped signature was accepted")
        for key in ("user_id", "device_id", "client_signature"):
            self.assertEqual(str(auth[key]).lower(), str(genuine[key]).lower(), "{} changed yet accepted".format(key))
        self.assertEqual((result.user_id, result.device_id, result.protocol_version),
                         (identity.user_id, DEVICE, version))
