"""
Parsing and encoding of protocol messages (PROTOCOL.md preamble, §2, §8).

Pure functions: bytes in, typed values out. ``ProtocolError`` carries the close
code and reason the gateway sends when a rule is broken.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, Optional, Tuple, TypeGuard

import orjson

MAX_DEPTH = 64
UUID_RE = re.compile(r"^[0-9A-Fa-f]{8}(-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}\Z")
HEX64_RE = re.compile(r"^[0-9A-Fa-f]{64}\Z")
HEX128_RE = re.compile(r"^[0-9A-Fa-f]{128}\Z")
HEX130_RE = re.compile(r"^[0-9A-Fa-f]{130}\Z")
# A pairing code (API.md §2): six ASCII digits. A v2 mailbox token: 64 lowercase hex digits.
PAIRING_CODE_RE = re.compile(r"^[0-9]{6}\Z")
TOKEN_RE = re.compile(r"^[0-9a-f]{64}\Z")


class ProtocolError(Exception):
    """A rule was broken; close the connection with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class Malformed(ValueError):
    """The bytes are not a JSON document the protocol accepts."""


def _depth_ok(value: Any) -> bool:
    # Iterative walk: a recursive one could itself hit Python's limit.
    # Depth counts containers: [[1]] is 2 deep.
    stack = [(value, 1)]
    children: Iterable[Any]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        if d > MAX_DEPTH:
            return False
        stack.extend((x, d + 1) for x in children if isinstance(x, (dict, list)))
    return True


def parse_json(data: bytes) -> Any:
    """
    Parse UTF-8 JSON by the protocol's rules.

    NaN/Infinity, lone surrogates, invalid UTF-8 and nesting deeper than 64
    raise ``Malformed``. Integers beyond 64 bits come back as floats and so
    are never accepted as integers.
    """
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise Malformed(str(e)) from None
    if not _depth_ok(value):
        raise Malformed("nesting deeper than 64")
    return value


def parse_message(data: bytes) -> Tuple[str, Dict[str, Any]]:
    """
    Split a client message into (type, fields).

    Fields come from ``payload`` when it is an object, otherwise from the top
    level (PROTOCOL.md §2). Raises ``Malformed`` for anything that is not an
    object with a string ``type``.
    """
    value = parse_json(data)
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise Malformed("not an object with a string type")
    payload = value.get("payload")
    fields = payload if isinstance(payload, dict) else value
    return value["type"], fields


def is_int(value: Any) -> bool:
    """True for a JSON integer (not a bool, not a float)."""
    return type(value) is int


def int_in(value: Any, low: int, high: int) -> Optional[int]:
    """``value`` if it is an integer within [low, high], else None."""
    if type(value) is int and low <= value <= high:
        return value
    return None


def is_uuid(value: Any) -> TypeGuard[str]:
    """True for a UUID string in either case."""
    return isinstance(value, str) and UUID_RE.match(value) is not None


def is_hex(value: Any, pattern: "re.Pattern[str]") -> TypeGuard[str]:
    """True when ``value`` is a string matching the hex pattern."""
    return isinstance(value, str) and pattern.match(value) is not None


def encode(msg_type: str, payload: Dict[str, Any]) -> bytes:
    """Serialize a server message in the envelope of §2."""
    return orjson.dumps({"type": msg_type, "payload": payload})


def dumps(value: Any) -> bytes:
    """Serialize any JSON value."""
    return orjson.dumps(value)
