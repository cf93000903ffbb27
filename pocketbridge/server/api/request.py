"""
What happens to an HTTP request before any route sees it, apart from the
route plumbing in ``pocketbridge.server.api.http`` (which re-exports every
name here): the 64 KiB body limit, enforced while the body is still being
read, and the masking of request targets for log lines, so that pairing
codes and query secrets never reach a log.
"""

from __future__ import annotations

import re
import uuid
from typing import Optional

import orjson
from twisted.web.server import Request

from pocketbridge.server import metrics

MAX_BODY = 64 * 1024
PAIRING_PATH_RE = re.compile(r"^(/+api(?:/+v1)?/+pairing/+(?:lookup|v2))/+[^/?]+", re.IGNORECASE)
CODE_LIKE_RE = re.compile(r"(?<![0-9A-Za-z])[0-9]{6}(?![0-9A-Za-z])")
# Query parameters whose values may appear in logs: small integers and flags, never secrets.
LOGGABLE_QUERY = frozenset({"wait", "limit", "after_seq", "include_revoked"})
LOGGABLE_VALUE_RE = re.compile(r"^[0-9A-Za-z]{0,18}\Z")


def redact_path(path: str) -> str:
    """The request path with pairing codes (and anything shaped like one) replaced by ``******`` (for logs)."""
    return CODE_LIKE_RE.sub("******", PAIRING_PATH_RE.sub(r"\1/******", path))


def redact_target(target: str) -> str:
    """
    A request target as logs may show it: ``redact_path`` of the path, and
    in the query string every value (and every name) masked as ``***``
    except the values of ``LOGGABLE_QUERY`` (secrets such as the v2
    ``token`` never reach a log line).
    """
    path, sep, query = target.partition("?")
    out = redact_path(path)
    if not sep:
        return out
    parts = []
    for item in query.split("&"):
        name, eq, value = item.partition("=")
        if name not in LOGGABLE_QUERY:
            parts.append("***")
        elif eq and not LOGGABLE_VALUE_RE.match(value):
            parts.append(name + "=***")
        else:
            parts.append(item)
    return out + "?" + "&".join(parts)


class LimitedRequest(Request):
    """
    A Request that refuses bodies over 64 KiB with 413 before reading them:
    from Content-Length at once, and for chunked bodies as soon as the limit is
    passed (then the connection is closed).
    """

    max_body = MAX_BODY
    _too_large = False
    _body_seen = 0

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self.max_body:
            self._refuse()
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._body_seen += len(data)
        if self._body_seen > self.max_body:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._too_large:
            return
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self._too_large = True
        metrics.HTTP_REQUESTS.labels(route="(body)", status="413").inc()
        body = orjson.dumps({"error": "Request body larger than 64 KiB", "code": "PAYLOAD_TOO_LARGE"})
        rid = uuid.uuid4().hex
        head = (
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Content-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"X-Request-ID: " + rid.encode() + b"\r\n"
            b"X-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\n"
            b"Referrer-Policy: no-referrer\r\nCache-Control: no-store\r\n"
            b"Connection: close\r\n\r\n"
        )
        transport = self.channel.transport
        if transport is not None:
            transport.write(head + body)
            transport.loseConnection()
