"""
A small REST client for the PocketBridge HTTP API with PB-Ed25519 signing
(API.md §1.1). Used by the CLI, the tests and the benchmark.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import orjson
import treq
from twisted.web.http_headers import Headers

from pocketbridge.protocol.crypto import signed_message


def authorization(identity: Any, device_id: str, method: str, path: str, body: bytes, ts_ms: Optional[int] = None) -> str:
    """The ``Authorization`` header value for one request (path = path and query as sent)."""
    ts = str(int(time.time() * 1000) if ts_ms is None else ts_ms)
    message = signed_message(method, path, ts, identity.user_id, device_id, body)
    sig = identity.signing_key.sign(message).signature.hex()
    return "PB-Ed25519 user={}, device={}, ts={}, sig={}".format(identity.user_id, device_id, ts, sig)


class RestResponse:
    """Status, headers and the decoded JSON body (None when empty or not JSON)."""

    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        try:
            self.json: Any = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            self.json = None

    def header(self, name: str) -> Optional[str]:
        """One response header as text."""
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def __repr__(self) -> str:
        return "<RestResponse {} {!r}>".format(self.status, self.body[:200])


class RestClient:
    """Signs requests as one device of a user. ``base_url`` like ``http://127.0.0.1:3001``."""

    def __init__(self, reactor: Any, base_url: str, identity: Any = None, device_id: Optional[str] = None) -> None:
        self.reactor = reactor
        self.base_url = base_url.rstrip("/")
        self.identity = identity
        self.device_id = device_id

    async def request(
        self, method: str, path: str, body: Any = None, *, raw_body: Optional[bytes] = None,
        sign: bool = True, ts_ms: Optional[int] = None, headers: Optional[Mapping[str, str]] = None,
    ) -> RestResponse:
        """Send one request; ``body`` is JSON-encoded unless ``raw_body`` is given."""
        data = raw_body if raw_body is not None else (orjson.dumps(body) if body is not None else b"")
        h: Dict[Union[bytes, str], List[Union[bytes, str]]] = {"Content-Type": ["application/json"]}
        if sign and self.identity is not None and self.device_id is not None:
            h["Authorization"] = [authorization(self.identity, self.device_id, method, path, data, ts_ms)]
        for k, v in (headers or {}).items():
            h[k] = [v]
        response = await treq.request(method, self.base_url + path, data=data or None, headers=h,
                                      reactor=self.reactor, persistent=False)
        content = await treq.content(response)
        return RestResponse(response.code, response.headers, content)

    async def get(self, path: str, **kw: Any) -> RestResponse:
        """GET ``path``."""
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body: Any = None, **kw: Any) -> RestResponse:
        """POST ``path`` with a JSON body."""
        return await self.request("POST", path, body, **kw)

    async def delete(self, path: str, **kw: Any) -> RestResponse:
        """DELETE ``path``."""
        return await self.request("DELETE", path, **kw)


def split(resp: RestResponse) -> Tuple[int, Any]:
    """(status, json) of a response."""
    return resp.status, resp.json
