"""
Unit tests of ``pocketbridge.server.api.jsstringify`` and of the v1 body signature
built on it (API.md §3, User). Every expected string was produced by
Node.js (``JSON.stringify(JSON.parse(input))``, ``Date.prototype.toISOString``,
``crypto.sign``), so these tests pin the server to what browsers produce.
"""

from __future__ import annotations

import orjson
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.protocol import crypto
from pocketbridge.server.api.account import ONBOARDING_SUBJECT, body_signature_message, profile_subject
from pocketbridge.server.api.jsstringify import number_to_string, stringify, to_iso_string
from pocketbridge.protocol.wire import parse_json

# PROTOCOL.md §13: the user key with seed 11×32.
USER_ID = "d04ab232742bb4ab3a1368bd4615e4e6d0224ab71a016baf8520a332c9778737"


def js(text: str) -> str:
    """``JSON.stringify(JSON.parse(text))`` as this module computes it."""
    return stringify(parse_json(text.encode("utf-8")))


class StringifyTests(SynchronousTestCase):
    """JSON.stringify of parsed JSON, compared with Node.js output."""

    def test_members_keep_received_order(self) -> None:
        """Object members come out in the order they were received, compact, nested objects included."""
        self.assertEqual(
            js('{"display_name":"Ann","email":"a@b.co","preferences":{"theme":"dark","n":1.50}}'),
            '{"display_name":"Ann","email":"a@b.co","preferences":{"theme":"dark","n":1.5}}',
        )
        self.assertEqual(
            js('{"b":[],"a":{},"c":[null,true,false,{"x":[]}],"\u00e9":"\\ud83d\\ude00"}'),
            '{"b":[],"a":{},"c":[null,true,false,{"x":[]}],"\u00e9":"\U0001F600"}',
        )

    def test_duplicate_member_keeps_first_position_last_value(self) -> None:
        """A repeated member sits where it first appeared with its last value, as JSON.parse leaves it."""
        self.assertEqual(js('{"a":1,"b":2,"a":3}'), '{"a":3,"b":2}')

    def test_string_escapes(self) -> None:
        """Quote, backslash and the five short escapes; other controls as lowercase \\u00xx; DEL, U+2028/9, '/' and non-ASCII raw."""
        source = '"quote\\" backslash\\\\ slash/ \\b\\f\\n\\r\\t \\u0000\\u0001\\u001f \\u007f \u00e9 \u4e2d \U0001F600 \\u2028\\u2029"'
        expected = (
            '"quote\\" backslash\\\\ slash/ \\b\\f\\n\\r\\t \\u0000\\u0001\\u001f \x7f \u00e9 \u4e2d \U0001F600 \u2028\u2029"'
        )
        self.assertEqual(js(source), expected)

    def test_numbers(self) -> None:
        """Number::toString: shortest round-trip digits, exponent form from 1e21 and below 1e-6, -0 as 0."""
        source = (
            "[1e21, 1e20, 123456789012345678901, 1e-7, 0.000001, 0.0000012345, 1.5e-10, 5e-324,"
            " 1.7976931348623157e308, 0.1, 0.30000000000000004, 100.0, -0.0, -0, 2.5e+25,"
            " 1152921504606846976, 9007199254740993, -1e-7, 123.456, 1e0, 4.35, 0.5]"
        )
        expected = (
            "[1e+21,100000000000000000000,123456789012345680000,1e-7,0.000001,0.0000012345,1.5e-10,5e-324,"
            "1.7976931348623157e+308,0.1,0.30000000000000004,100,0,0,2.5e+25,"
            "1152921504606847000,9007199254740992,-1e-7,123.456,1,4.35,0.5]"
        )
        self.assertEqual(js(source), expected)

    def test_number_to_string_directly(self) -> None:
        """Number::toString of doubles at the format boundaries."""
        cases = {
            1e21: "1e+21", 999999999999999900000.0: "999999999999999900000", 1.5e21: "1.5e+21",
            1e-6: "0.000001", 1e-7: "1e-7", 1.25e-7: "1.25e-7", 123.0: "123", -2.5: "-2.5",
            float("nan"): "NaN", float("inf"): "Infinity", -float("inf"): "-Infinity",
        }
        for value, expected in cases.items():
            self.assertEqual(number_to_string(value), expected, value)

    def test_non_finite_numbers_become_null(self) -> None:
        """Values JSON cannot hold are written as null, as JSON.stringify does."""
        self.assertEqual(stringify([float("nan"), float("inf"), 10**400]), "[null,null,null]")

    def test_refuses_other_types(self) -> None:
        """Anything that cannot come out of a JSON parser is refused."""
        self.assertRaises(TypeError, stringify, {1: 2})
        self.assertRaises(TypeError, stringify, object())


class IsoStringTests(SynchronousTestCase):
    """Date.prototype.toISOString of ms timestamps."""

    def test_iso_strings(self) -> None:
        """UTC, milliseconds always present, Z suffix."""
        self.assertEqual(to_iso_string(1771063200000), "2026-02-14T10:00:00.000Z")
        self.assertEqual(to_iso_string(1771063200123), "2026-02-14T10:00:00.123Z")
        self.assertEqual(to_iso_string(0), "1970-01-01T00:00:00.000Z")


class BodySignatureTests(SynchronousTestCase):
    """The v1 profile body signature, against a vector made with Node.js crypto."""

    BODY = (
        '{"display_name":"Zo\u00eb \\"Z\\"","preferences":{"theme":"dark","ratio":1e21,"tiny":1.5e-7},'
        '"email":null,"signature":"x","timestamp":1}'
    )

    def test_profile_subject_and_digest(self) -> None:
        """X drops signature and timestamp and keeps order; the signed text is the hex SHA-256 Node computes."""
        body = parse_json(self.BODY.encode("utf-8"))
        subject = profile_subject(body)
        self.assertEqual(
            subject, '{"display_name":"Zo\u00eb \\"Z\\"","preferences":{"theme":"dark","ratio":1e+21,"tiny":1.5e-7},"email":null}'
        )
        self.assertEqual(
            body_signature_message(USER_ID, 1771000000000, subject),
            b"a08aa926f688fba4dd4fd8de1e13d6fd0d35d1441a4d9ca354a4b6ab42d97f33",
        )
        self.assertEqual(
            body_signature_message(USER_ID, 1771000000000, ONBOARDING_SUBJECT),
            b"5d7f2a0877de016d6e3b0011e5d4c49ad215f0e561199fc6c9c35671eb941689",
        )

    def test_node_signature_verifies(self) -> None:
        """A signature Node.js made with the seed-11 key verifies over our message, and not over another."""
        sig = bytes.fromhex(
            "8df96f134e0a8154a8996018ac48388223f20d3b5bfa66b0e5a8bbd148685023"
            "b30eac88f0cda6ee91ab12a778fee4f547d5aab020258f081030a52f89b84506"
        )
        body = orjson.loads(self.BODY.encode("utf-8"))
        message = body_signature_message(USER_ID, 1771000000000, profile_subject(body))
        self.assertTrue(crypto.verify_ed25519(bytes.fromhex(USER_ID), message, sig))
        other = body_signature_message(USER_ID, 1771000000001, profile_subject(body))
        self.assertFalse(crypto.verify_ed25519(bytes.fromhex(USER_ID), other, sig))
