"""
Message parsing (PROTOCOL.md preamble, §2) and event validation (§6 steps 1,
2 and the freshness part of 4).
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.protocol import wire
from pocketbridge.protocol.events import TTL_GRACE_MS, Verdict, check_event
from pocketbridge.protocol.wire import Malformed, int_in, is_int, parse_json, parse_message

USER = "d04ab232742bb4ab3a1368bd4615e4e6d0224ab71a016baf8520a332c9778737"
DEVICE = "0b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b"
OTHER_USER = "a09aa5f47a6759802ff955f8dc2d2a14a5c99d23be97f864127ff9383455a4f0"
OTHER_DEVICE = "11111111-2222-4333-8444-555555555555"
EVENT_ID = "01890a5d-ac96-774b-bcce-b302099a8057"
NOW = 1_700_000_000_000
MAX_PAYLOAD = 64


def nested_arrays(depth: int, leaf: str = "") -> bytes:
    """``depth`` nested JSON arrays around ``leaf``."""
    return ("[" * depth + leaf + "]" * depth).encode()


class ParseJsonTests(SynchronousTestCase):
    """The JSON rules of the preamble: what makes a message malformed."""

    def test_nan_and_infinity_malformed(self) -> None:
        """NaN, Infinity, -Infinity and a number overflowing to infinity are malformed."""
        for bad in (b'{"a":NaN}', b'{"a":Infinity}', b'{"a":-Infinity}', b'{"a":1e400}'):
            self.assertRaises(Malformed, parse_json, bad)

    def test_depth_64_accepted(self) -> None:
        """A document nested exactly 64 deep is accepted, with or without a value in the innermost level."""
        for leaf in ("", '"x"', "1", "null"):
            value = parse_json(nested_arrays(64, leaf))
            for _ in range(63):
                value = value[0]
            self.assertEqual(value, [json.loads(leaf)] if leaf else [])

    def test_depth_65_malformed(self) -> None:
        """A document nested 65 deep is malformed."""
        self.assertRaises(Malformed, parse_json, nested_arrays(65))
        self.assertRaises(Malformed, parse_json, nested_arrays(65, "1"))

    def test_very_deep_document_malformed(self) -> None:
        """A document nested 100 000 deep is malformed, not a crash of the parser."""
        self.assertRaises(Malformed, parse_message, b'{"type":"x","payload":' + nested_arrays(100_000) + b"}")

    def test_envelope_depth_counts_the_envelope(self) -> None:
        """An envelope nested 64 deep in all (envelope and payload included) is accepted; 65 is malformed."""

        def envelope(levels: int) -> bytes:
            return b'{"type":"event","payload":' + b'{"a":' * levels + b"{}" + b"}" * levels + b"}"

        # envelope (depth 1), payload and 61 nested objects (2..63), innermost {} (64)
        self.assertEqual(parse_message(envelope(62))[0], "event")
        self.assertRaises(Malformed, parse_message, envelope(63))

    def test_lone_surrogates_malformed(self) -> None:
        """An escaped lone high or low surrogate, or a raw UTF-8-encoded surrogate, is malformed."""
        for bad in (b'{"type":"\\ud800"}', b'{"type":"x","a":"\\udc00x"}', b'{"type":"x","a":"\xed\xa0\x80"}'):
            self.assertRaises(Malformed, parse_json, bad)

    def test_surrogate_pair_accepted(self) -> None:
        """An escaped surrogate pair is a valid character, not malformed."""
        self.assertEqual(parse_json(b'"\\ud83d\\ude00"'), "\U0001F600")

    def test_invalid_utf8_and_garbage_malformed(self) -> None:
        """Invalid UTF-8, truncated JSON and an empty frame are malformed."""
        for bad in (b"\xff\xfe", b'{"type":', b"", b"{'type':'x'}"):
            self.assertRaises(Malformed, parse_json, bad)

    def test_huge_integer_is_not_an_integer(self) -> None:
        """An integer literal beyond 64 bits does not come back as a protocol integer."""
        value = parse_json(b'{"n":123456789012345678901234567890}')["n"]
        self.assertFalse(is_int(value))


class ParseMessageTests(SynchronousTestCase):
    """The envelope rules of §2."""

    def test_non_objects_malformed(self) -> None:
        """A JSON array, string, number, null or boolean is not a message."""
        for bad in (b"[]", b'"event"', b"5", b"null", b"true", b'[{"type":"event"}]'):
            self.assertRaises(Malformed, parse_message, bad)

    def test_type_must_be_a_string(self) -> None:
        """A missing, null, numeric or object ``type`` is malformed."""
        for bad in (b'{"payload":{}}', b'{"type":null}', b'{"type":5}', b'{"type":{"a":1}}', b'{"type":["event"]}'):
            self.assertRaises(Malformed, parse_message, bad)

    def test_payload_object_supplies_fields(self) -> None:
        """When ``payload`` is an object its fields are used, not the top level's."""
        msg_type, fields = parse_message(b'{"type":"ack","payload":{"device_seq":5},"device_seq":9}')
        self.assertEqual((msg_type, fields), ("ack", {"device_seq": 5}))

    def test_flat_message_uses_top_level(self) -> None:
        """A flat client_hello (no payload object) is read from the top level."""
        msg_type, fields = parse_message(b'{"type":"client_hello","nonce_c":"aa"}')
        self.assertEqual((msg_type, fields["nonce_c"]), ("client_hello", "aa"))

    def test_non_object_payload_falls_back_to_top_level(self) -> None:
        """A payload that is a string or an array is ignored in favour of the top-level fields."""
        for payload in (b'"x"', b"[1]", b"null", b"3"):
            _, fields = parse_message(b'{"type":"ping","payload":' + payload + b',"limit":3}')
            self.assertEqual(fields["limit"], 3)

    def test_payload_type_ignored(self) -> None:
        """The top-level type decides even when payload.type says otherwise."""
        msg_type, fields = parse_message(b'{"type":"ack","payload":{"type":"event","device_seq":1}}')
        self.assertEqual((msg_type, fields["device_seq"]), ("ack", 1))

    def test_encode_uses_envelope(self) -> None:
        """Server messages are serialized as {"type", "payload"}."""
        self.assertEqual(json.loads(wire.encode("pong", {"timestamp": 5})), {"type": "pong", "payload": {"timestamp": 5}})


class IntegerTests(SynchronousTestCase):
    """"An integer is a JSON number with no fraction and no exponent"."""

    def test_only_json_integers_are_integers(self) -> None:
        """5 is an integer; true, false, 5.0, 5e0, "5" and null are not."""
        self.assertTrue(is_int(parse_json(b"5")))
        for text in (b"true", b"false", b"5.0", b"5e0", b'"5"', b"null"):
            value = parse_json(text)
            self.assertFalse(is_int(value), text)
            self.assertIsNone(int_in(value, 0, 10), text)

    def test_int_in_bounds(self) -> None:
        """int_in accepts both bounds and refuses one past either."""
        self.assertEqual((int_in(1, 1, 3), int_in(3, 1, 3)), (1, 3))
        self.assertEqual((int_in(0, 1, 3), int_in(4, 1, 3)), (None, None))

    def test_uuid_and_hex_are_whole_string_matches(self) -> None:
        """A UUID or hex64 followed by a newline is not a UUID or hex64."""
        self.assertTrue(wire.is_uuid(DEVICE.upper()))
        self.assertFalse(wire.is_uuid(DEVICE + "\n"))
        self.assertFalse(wire.is_hex(USER + "\n", wire.HEX64_RE))


def event(**changes: Any) -> Dict[str, Any]:
    """A valid event payload of the session (USER, DEVICE), with ``changes`` applied; None deletes a field."""
    fields: Dict[str, Any] = {
        "event_id": EVENT_ID,
        "user_id": USER,
        "device_id": DEVICE,
        "device_seq": 5,
        "stream_id": "clipboard:main",
        "stream_seq": 0,
        "type": "clipboard:text",
        "encrypted_payload": "QUJD",
    }
    for key, value in changes.items():
        if value is _DELETE:
            fields.pop(key, None)
        else:
            fields[key] = value
    return fields


_DELETE = object()


def check(fields: Dict[str, Any], max_payload: int = MAX_PAYLOAD, now: int = NOW) -> Any:
    return check_event(fields, USER, DEVICE, max_payload, now)


class OwnershipTests(SynchronousTestCase):
    """§6 step 1: events of another user or device are ignored without an ack."""

    def test_other_user_not_owner(self) -> None:
        """An event naming another user_id is not_owner."""
        self.assertEqual(check(event(user_id=OTHER_USER)).verdict, Verdict.NOT_OWNER)

    def test_non_string_user_not_owner(self) -> None:
        """A numeric user_id is not the session user."""
        self.assertEqual(check(event(user_id=5)).verdict, Verdict.NOT_OWNER)

    def test_missing_or_empty_user_means_session_user(self) -> None:
        """A missing, null or empty user_id is the session user: the event is accepted."""
        for value in (_DELETE, None, ""):
            result = check(event(user_id=value))
            self.assertEqual(result.verdict, Verdict.ACCEPT)
            assert result.event is not None
            self.assertEqual(result.event.user_id, USER)

    def test_other_device_not_owner(self) -> None:
        """An event of another device_id (a v1 re-upload) is not_owner."""
        self.assertEqual(check(event(device_id=OTHER_DEVICE)).verdict, Verdict.NOT_OWNER)

    def test_missing_device_not_owner(self) -> None:
        """An event with no device_id is not the session's device."""
        self.assertEqual(check(event(device_id=_DELETE)).verdict, Verdict.NOT_OWNER)

    def test_ownership_before_syntax(self) -> None:
        """A broken event of another device is not_owner, not invalid and not no_device_seq."""
        broken = event(device_id=OTHER_DEVICE, device_seq="x", event_id="nope", stream_id="", encrypted_payload="!")
        self.assertEqual(check(broken).verdict, Verdict.NOT_OWNER)
        self.assertEqual(check(event(user_id=OTHER_USER, device_seq=None)).verdict, Verdict.NOT_OWNER)

    def test_not_owner_counts_payload_bytes(self) -> None:
        """An ignored event still reports its payload size (it counts toward byte limits)."""
        result = check(event(device_id=OTHER_DEVICE, encrypted_payload="QUJD" * 4))
        self.assertEqual((result.verdict, result.payload_size), (Verdict.NOT_OWNER, 16))

    def test_uppercase_ids_are_the_session(self) -> None:
        """Uppercase user_id, device_id and event_id match the session and come out lowercase."""
        result = check(event(user_id=USER.upper(), device_id=DEVICE.upper(), event_id=EVENT_ID.upper()))
        self.assertEqual(result.verdict, Verdict.ACCEPT)
        assert result.event is not None
        self.assertEqual(
            (result.event.user_id, result.event.device_id, result.event.event_id, result.event_id),
            (USER, DEVICE, EVENT_ID, EVENT_ID),
        )


class DeviceSeqTests(SynchronousTestCase):
    """device_seq: an integer 1 … 2^53−1, or the event cannot be acked."""

    def test_bounds_accepted(self) -> None:
        """device_seq 1 and 2^53−1 are accepted and carried."""
        for value in (1, 2**53 - 1):
            result = check(event(device_seq=value))
            self.assertEqual((result.verdict, result.device_seq), (Verdict.ACCEPT, value))

    def test_out_of_range_or_not_integer_cannot_be_acked(self) -> None:
        """0, −1, 2^53, 5.0, true, "5", null and a missing device_seq are ignored without an ack."""
        for value in (0, -1, 2**53, 5.0, True, "5", None, _DELETE):
            result = check(event(device_seq=value))
            self.assertEqual(result.verdict, Verdict.NO_SEQ, repr(value))
            self.assertIsNone(result.device_seq)

    def test_stream_seq_ignored(self) -> None:
        """Any stream_seq on input (here 99 or a string) does not affect the verdict."""
        for value in (99, "x", _DELETE):
            self.assertEqual(check(event(stream_seq=value)).verdict, Verdict.ACCEPT)


class SyntaxTests(SynchronousTestCase):
    """§6 step 2: each table rule, each verdict (v1: acked and dropped)."""

    def assertInvalid(self, fields: Dict[str, Any], **kw: Any) -> None:
        result = check(fields, **kw)
        self.assertEqual(result.verdict, Verdict.INVALID, repr(fields))
        # It can be acked: the device_seq is known.
        self.assertEqual(result.device_seq, fields["device_seq"])

    def assertAccepted(self, fields: Dict[str, Any], **kw: Any) -> None:
        self.assertEqual(check(fields, **kw).verdict, Verdict.ACCEPT, repr(fields))

    def test_event_id_must_be_uuid(self) -> None:
        """A missing, numeric or non-UUID event_id is invalid; a string one is echoed for the ack."""
        for value in (_DELETE, 5, "", "not-a-uuid", EVENT_ID[:-1], EVENT_ID + "0"):
            self.assertInvalid(event(event_id=value))
        self.assertEqual(check(event(event_id="nope")).event_id, "nope")
        self.assertIsNone(check(event(event_id=5)).event_id)

    def test_invalid_event_echoes_lowercase_event_id(self) -> None:
        """An invalid event with an uppercase UUID event_id reports it lowercased (ids are echoed lowercase)."""
        result = check(event(event_id=EVENT_ID.upper(), stream_id=""))
        self.assertEqual((result.verdict, result.event_id), (Verdict.INVALID, EVENT_ID))

    def test_any_uuid_version_accepted(self) -> None:
        """UUIDs of any version (v4, v7, nil-like) are accepted."""
        for value in ("6f1c1e7a-0c1b-4d6e-9a1b-2c3d4e5f6a7b", EVENT_ID, "00000000-0000-0000-0000-000000000000"):
            self.assertAccepted(event(event_id=value))

    def test_device_id_must_be_uuid(self) -> None:
        """A session whose device_id is not a UUID cannot pass an event naming that device."""
        result = check_event(event(device_id="laptop"), USER, "laptop", MAX_PAYLOAD, NOW)
        self.assertEqual(result.verdict, Verdict.INVALID)

    def test_stream_id_rule(self) -> None:
        """stream_id is 1–256 of [A-Za-z0-9:_-]; empty, 257 long, spaces, dots and non-strings are invalid."""
        for value in ("clipboard:main", "files:main:" + EVENT_ID, "a", "x" * 256, "A-Z_0:9"):
            self.assertAccepted(event(stream_id=value))
        for value in ("", "x" * 257, "a b", "a.b", "é", 5, None, _DELETE):
            self.assertInvalid(event(stream_id=value))

    def test_type_rule(self) -> None:
        """type is 1–64 of [A-Za-z0-9:_-]; empty, 65 long or with other characters is invalid."""
        for value in ("clipboard:text", "file:chunk", "t" * 64):
            self.assertAccepted(event(type=value))
        for value in ("", "t" * 65, "a/b", "a b", 1, _DELETE):
            self.assertInvalid(event(type=value))

    def test_trailing_newline_never_passes_a_pattern(self) -> None:
        """A trailing newline makes event_id, stream_id, type and encrypted_payload invalid (whole-string patterns)."""
        cases = {
            "event_id": EVENT_ID + "\n",
            "stream_id": "clipboard:main\n",
            "type": "clipboard:text\n",
            "encrypted_payload": "QUJDRA=\n",  # length 8, so only the pattern can refuse it
        }
        accepted = [name for name, value in cases.items() if check(event(**{name: value})).verdict is Verdict.ACCEPT]
        self.assertEqual(accepted, [])

    def test_padded_base64_accepted(self) -> None:
        """Padded standard base64 with 0, 1 or 2 '=' and '+' '/' is accepted."""
        for value in ("QUJD", "QUI=", "QQ==", "ab+/", "QUJDRA=="):
            self.assertAccepted(event(encrypted_payload=value))

    def test_bad_base64_invalid(self) -> None:
        """Unpadded, over-padded, inner '=', url-safe, whitespace or empty payloads are invalid."""
        for value in ("QUJ", "QUJDR", "Q===", "QQ=A", "=QQQ", "ab-_", "QU JD", "QUJD\n", " QUJD", "", "====", 5, None, _DELETE):
            self.assertInvalid(event(encrypted_payload=value))

    def test_payload_length_limit(self) -> None:
        """A payload of exactly max_payload_bytes characters is accepted; 4 more is invalid."""
        self.assertAccepted(event(encrypted_payload="A" * MAX_PAYLOAD))
        self.assertInvalid(event(encrypted_payload="A" * (MAX_PAYLOAD + 4)))

    def test_ttl_null_or_absent(self) -> None:
        """ttl null or absent means no expiry."""
        for value in (None, _DELETE):
            result = check(event(ttl=value))
            assert result.event is not None
            self.assertIsNone(result.event.ttl)

    def test_ttl_must_be_integer(self) -> None:
        """ttl 5.0, true, "5" or an object is invalid."""
        for value in (float(NOW + 1000), True, str(NOW + 1000), {"ms": 1}):
            self.assertInvalid(event(ttl=value))

    def test_ttl_future_kept(self) -> None:
        """A future absolute ttl (ms) is carried unchanged."""
        result = check(event(ttl=NOW + 60_000))
        assert result.event is not None
        self.assertEqual(result.event.ttl, NOW + 60_000)

    def test_ttl_past_with_grace(self) -> None:
        """A ttl up to 5 minutes in the past is accepted; one ms older is invalid."""
        self.assertAccepted(event(ttl=NOW - 1))
        self.assertAccepted(event(ttl=NOW - TTL_GRACE_MS))
        self.assertInvalid(event(ttl=NOW - TTL_GRACE_MS - 1))

    def test_ttl_as_duration_is_past(self) -> None:
        """A ttl written as a duration (e.g. 3600000) is an absolute time in 1970 and so invalid."""
        self.assertInvalid(event(ttl=3_600_000))

    def test_accepted_event_fields(self) -> None:
        """An accepted event carries exactly its fields, the session ids and its payload size."""
        result = check(event(ttl=NOW + 1, extra="dropped"))
        assert result.event is not None
        ev = result.event
        self.assertEqual(
            (ev.user_id, ev.device_id, ev.event_id, ev.device_seq, ev.stream_id, ev.type, ev.encrypted_payload, ev.ttl),
            (USER, DEVICE, EVENT_ID, 5, "clipboard:main", "clipboard:text", "QUJD", NOW + 1),
        )
        self.assertEqual((result.payload_size, ev.payload_size), (4, 4))


# ---------------------------------------------------------------- properties

_uuids = st.uuids().map(str) | st.uuids().map(lambda u: str(u).upper())
_names = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789:_-", min_size=1)
_b64 = st.binary(min_size=1, max_size=48).map(lambda b: base64.b64encode(b).decode())


class PropertyTests(SynchronousTestCase):
    """Properties over generated inputs."""

    @settings(max_examples=150, deadline=None)
    @given(
        event_id=_uuids,
        device_seq=st.integers(1, 2**53 - 1),
        stream_id=_names.filter(lambda s: len(s) <= 256),
        etype=_names.filter(lambda s: len(s) <= 64),
        payload=_b64,
        ttl=st.none() | st.integers(NOW - TTL_GRACE_MS, 2**62),
        user_case=st.sampled_from([str.lower, str.upper]),
    )
    def test_valid_events_round_trip(
        self, event_id: str, device_seq: int, stream_id: str, etype: str, payload: str, ttl: Any, user_case: Any
    ) -> None:
        """Any valid-shaped event, sent as JSON, is accepted with its fields intact and ids lowercased."""
        fields = {
            "event_id": event_id,
            "user_id": user_case(USER),
            "device_id": user_case(DEVICE),
            "device_seq": device_seq,
            "stream_id": stream_id,
            "stream_seq": 0,
            "type": etype,
            "encrypted_payload": payload,
            "ttl": ttl,
        }
        msg_type, parsed = parse_message(orjson.dumps({"type": "event", "payload": fields}))
        result = check_event(parsed, USER, DEVICE, MAX_PAYLOAD, NOW)
        self.assertEqual((msg_type, result.verdict), ("event", Verdict.ACCEPT))
        assert result.event is not None
        self.assertEqual(
            (result.event.event_id, result.event.device_seq, result.event.stream_id, result.event.type,
             result.event.encrypted_payload, result.event.ttl, result.event.user_id, result.event.device_id),
            (event_id.lower(), device_seq, stream_id, etype, payload, ttl, USER, DEVICE),
        )

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_random_bytes_only_malformed(self, data: bytes) -> None:
        """Arbitrary bytes either parse to (str, dict) or raise Malformed, never anything else."""
        try:
            msg_type, fields = parse_message(data)
        except Malformed:
            return
        self.assertIsInstance(msg_type, str)
        self.assertIsInstance(fields, dict)

    @settings(max_examples=150, deadline=None)
    @given(
        st.dictionaries(
            st.text(max_size=8),
            st.recursive(
                st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
                lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                max_leaves=10,
            ),
            max_size=6,
        )
    )
    def test_check_event_never_raises(self, payload: Dict[str, Any]) -> None:
        """check_event returns a verdict for any decoded payload and never raises."""
        result = check_event(payload, USER, DEVICE, MAX_PAYLOAD, NOW)
        self.assertIn(result.verdict, list(Verdict))
