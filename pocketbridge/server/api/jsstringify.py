"""
ECMAScript ``JSON.stringify`` for values that came out of a JSON parser.

v1 web clients sign their profile requests over ``JSON.stringify`` of the
request object (API.md §3, User), so the server must rebuild exactly the
text a browser would produce: members in the order they were received,
strings escaped as ECMA-262 QuoteJSONString does, numbers formatted by
Number::toString (shortest round-trip digits, exponent form from 1e21 up
and below 1e-6). Also ``Date.prototype.toISOString`` for the v1 time fields.
Pure functions; no I/O.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, List, Tuple

_SHORT_ESCAPES = {
    0x08: "\\b",
    0x09: "\\t",
    0x0A: "\\n",
    0x0C: "\\f",
    0x0D: "\\r",
    0x22: '\\"',
    0x5C: "\\\\",
}


def quote(text: str) -> str:
    """``text`` as a JSON string literal, as JSON.stringify writes it."""
    out: List[str] = ['"']
    for ch in text:
        code = ord(ch)
        short = _SHORT_ESCAPES.get(code)
        if short is not None:
            out.append(short)
        elif code < 0x20 or 0xD800 <= code <= 0xDFFF:
            # Controls, and (ES2019 well-formed stringify) lone surrogates.
            out.append("\\u{:04x}".format(code))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _shortest_digits(x: float) -> Tuple[str, int]:
    """
    (digits, n) for a finite x > 0: the shortest digit string s that
    round-trips, and n such that x = 0.s × 10^n (ECMA-262 Number::toString's
    k = len(digits) and n).
    """
    # repr() yields the shortest round-tripping decimal (correctly rounded), as
    # Number::toString requires.
    sign, digit_tuple, exponent = Decimal(repr(x)).as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(str(d) for d in digit_tuple).lstrip("0")
    stripped = digits.rstrip("0")
    exponent += len(digits) - len(stripped)
    return stripped, exponent + len(stripped)


def number_to_string(value: float) -> str:
    """ECMA-262 Number::toString(value) (radix 10)."""
    if value != value:
        return "NaN"
    if value == 0:
        return "0"  # +0 and -0
    if value < 0:
        return "-" + number_to_string(-value)
    if math.isinf(value):
        return "Infinity"
    s, n = _shortest_digits(value)
    k = len(s)
    if k <= n <= 21:
        return s + "0" * (n - k)
    if 0 < n <= 21:
        return s[:n] + "." + s[n:]
    if -6 < n <= 0:
        return "0." + "0" * (-n) + s
    e = n - 1
    exp = ("+" if e >= 0 else "-") + str(abs(e))
    if k == 1:
        return s + "e" + exp
    return s[0] + "." + s[1:] + "e" + exp


def _number(value: Any) -> str:
    if isinstance(value, int):
        # A JavaScript number is a double: big integers lose precision like in JS.
        if -(2**53) <= value <= 2**53:
            return str(value)
        try:
            value = float(value)
        except OverflowError:
            return "null"
    if math.isinf(value) or value != value:
        return "null"  # what JSON.stringify does with non-finite numbers
    return number_to_string(value)


def stringify(value: Any) -> str:
    """
    ``JSON.stringify(value)`` for dicts (in iteration order), lists, str,
    int, float, bool and None. Raises TypeError for anything else.
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, (int, float)):
        return _number(value)
    if isinstance(value, dict):
        parts = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError("object keys must be strings")
            parts.append(quote(key) + ":" + stringify(item))
        return "{" + ",".join(parts) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(stringify(item) for item in value) + "]"
    raise TypeError("cannot stringify {}".format(type(value).__name__))


def to_iso_string(ms: int) -> str:
    """``new Date(ms).toISOString()`` for ms since the epoch: ``2026-02-14T10:00:00.000Z``."""
    seconds, millis = divmod(int(ms), 1000)
    t = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seconds)
    return "{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}.{:03d}Z".format(
        t.year, t.month, t.day, t.hour, t.minute, t.second, millis)
