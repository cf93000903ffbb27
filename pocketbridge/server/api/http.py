"""
The REST plumbing shared by every route (API.md §2): JSON errors, request ids,
security headers, CORS, the per-IP request budget, body parsing, and the
``Api.route`` decorator that puts a handler behind all of that. The body-size
limit and the log redaction of request targets are in ``api/request.py``.

Every answer of the Klein app goes through ``Api._guard``: the routes, the
router's own refusals (unknown path, wrong method; the router never
redirects) and URLs Klein cannot decode. Request log lines carry the path with
pairing codes masked and every query value masked but a few harmless ones.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, List, Optional, Tuple

import orjson
from klein.resource import KleinResource
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from pocketbridge.server import metrics

from pocketbridge.protocol import wire
from pocketbridge.server.api.request import (
    CODE_LIKE_RE,
    LOGGABLE_QUERY,
    LOGGABLE_VALUE_RE,
    MAX_BODY,
    PAIRING_PATH_RE,
    LimitedRequest,
    redact_path,
    redact_target,
)
from pocketbridge.server.storage import StorageUnavailable

if TYPE_CHECKING:
    from klein import Klein

    from pocketbridge.server.api.auth import Authenticator
    from pocketbridge.server.context import Node

log = Logger()

# The body limit and log redaction live in ``request``; callers keep importing them from here.
__all__ = [
    "CODE_LIKE_RE", "CORS_HEADERS", "CORS_METHODS", "LOGGABLE_QUERY", "LOGGABLE_VALUE_RE", "MAX_BODY",
    "PAIRING_PATH_RE", "REQUEST_ID_RE", "Api", "ApiError", "ApiResource", "LimitedRequest", "Raw", "body_object",
    "parse_body", "query_arg", "query_int", "redact_path", "redact_target",
]

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")
CORS_METHODS = b"GET, POST, PUT, DELETE"
CORS_HEADERS = b"Authorization, Content-Type, X-User-ID, X-Device-ID, X-Request-ID"


class Raw:
    """A non-JSON response body."""

    def __init__(self, content_type: str, data: bytes) -> None:
        self.content_type = content_type
        self.data = data


class ApiError(Exception):
    """An expected failure: becomes ``{"error": message, "code": code}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, field: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}


def _origin_allowed(origins: Tuple[str, ...], origin: Optional[str]) -> bool:
    if not origin or not origins:
        return False
    return "*" in origins or origin in origins


class Api:
    """Registers routes on a Klein app with the common behaviour of API.md §2."""

    def __init__(self, app: Klein, node: Node, auth: Authenticator) -> None:
        self.app = app
        self.node = node
        self.auth = auth
        s = node.settings
        self.cors_origins = tuple(o.strip() for o in (s.cors_origin or "").split(",") if o.strip())
        # The router never answers by itself: no redirects (a "//" or a trailing
        # slash is a 404 like any unknown path), every refusal through _guard.
        app.url_map.strict_slashes = True  # only redirects for rules that end in "/": there are none
        app.url_map.merge_slashes = False
        app.url_map.redirect_defaults = False
        app.handle_errors(NotFound)(self._not_found)
        app.handle_errors(MethodNotAllowed)(self._not_allowed)
        app.handle_errors(HTTPException)(self._not_found)  # a redirect or anything else the router raises
        # URLs Klein cannot decode (non-UTF-8 path or Host) are refused before its routing.
        app.resource = lambda: ApiResource(app, self)  # type: ignore[method-assign]  # on this app only

    # ---------------------------------------------------------------- helpers

    def client_ip(self, request: Any) -> str:
        """The client address by PROTOCOL.md §12."""
        from pocketbridge.server.gateway.admission import client_ip, peer_host

        forwarded = request.getHeader(b"x-forwarded-for")
        return client_ip(peer_host(request.getClientAddress()), forwarded.decode("latin-1") if forwarded else None,
                         self.node.trusted_proxies)

    def is_tls(self, request: Any) -> bool:
        """True when the request came over TLS, directly or via a trusted proxy."""
        if request.isSecure():
            return True
        from pocketbridge.server.gateway.admission import peer_host

        peer = peer_host(request.getClientAddress())
        proto = request.getHeader(b"x-forwarded-proto")
        return peer in self.node.trusted_proxies and proto == b"https"

    def common_headers(self, request: Any) -> None:
        """Request id, security headers and CORS on every response."""
        rid = request.getHeader(b"x-request-id")
        rid_s = rid.decode("latin-1") if rid else ""
        if not REQUEST_ID_RE.match(rid_s):
            rid_s = uuid.uuid4().hex
        request.request_id = rid_s
        request.setHeader(b"X-Request-ID", rid_s.encode("ascii"))
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"X-Frame-Options", b"DENY")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        request.setHeader(b"Cache-Control", b"no-store")
        if self.is_tls(request):
            request.setHeader(b"Strict-Transport-Security", b"max-age=31536000")
        origin = request.getHeader(b"origin")
        origin_s = origin.decode("latin-1") if origin else None
        if _origin_allowed(self.cors_origins, origin_s):
            assert origin is not None
            request.setHeader(b"Access-Control-Allow-Origin", origin)
            request.setHeader(b"Vary", b"Origin")
            request.setHeader(b"Access-Control-Expose-Headers", b"Retry-After, X-Request-ID")

    def respond(self, request: Any, status: int, body: Any, route: str) -> bytes:
        """Serialize ``body`` as the JSON response (204 has no body)."""
        metrics.HTTP_REQUESTS.labels(route=route, status=str(status)).inc()
        request.setResponseCode(status)
        if status == 204:
            return b""
        if isinstance(body, Raw):
            request.setHeader(b"Content-Type", body.content_type.encode("ascii"))
            return body.data
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return orjson.dumps(body)

    def error(self, request: Any, e: ApiError, route: str) -> bytes:
        """The JSON error body of API.md §2."""
        for k, v in e.headers.items():
            request.setHeader(k.encode("ascii"), v.encode("ascii"))
        body: Dict[str, Any] = {"error": e.message, "code": e.code}
        if e.field is not None:
            body["field"] = e.field
        return self.respond(request, e.status, body, route)

    def _preflight(self, request: Any) -> Optional[bytes]:
        if request.method != b"OPTIONS":
            return None
        origin = request.getHeader(b"origin")
        if origin is not None and _origin_allowed(self.cors_origins, origin.decode("latin-1")):
            request.setHeader(b"Access-Control-Allow-Methods", CORS_METHODS)
            request.setHeader(b"Access-Control-Allow-Headers", CORS_HEADERS)
            request.setHeader(b"Access-Control-Max-Age", b"600")
        return self.respond(request, 204, None, "(preflight)")

    def _not_found(self, request: Any, failure: Any) -> Any:
        return self.refuse(request, ApiError(404, "NOT_FOUND", "Not found"), "(unknown)")

    def _not_allowed(self, request: Any, failure: Any) -> Any:
        allowed = sorted(set(getattr(failure.value, "valid_methods", None) or []) - {"HEAD", "OPTIONS"})
        return self.refuse(
            request, ApiError(405, "METHOD_NOT_ALLOWED", "Method not allowed", headers={"Allow": ", ".join(allowed)}),
            "(method)",
        )

    def refuse(self, request: Any, error: ApiError, route: str) -> Any:
        """Answer ``error`` through the wrapper (a CORS preflight gets its 204 instead)."""
        if request.method == b"OPTIONS":
            self.common_headers(request)
            return self._preflight(request)

        async def fail() -> Tuple[int, Any]:
            raise error

        return Deferred.fromCoroutine(self._guard(request, route, True, fail))

    # ---------------------------------------------------------------- routes

    def route(
        self, path: str, methods: List[str], auth: str = "signed", name: Optional[str] = None,
        rate_limited: bool = True,
    ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
        """
        Register an async handler ``fn(request, caller, **url_args) -> (status, body)``.

        ``auth``: ``none``, ``signed`` (PB-Ed25519), ``signed_or_legacy``
        (X-User-ID also, with --legacy-clients) or ``admin``. ``/api/X``
        paths are also served at ``/api/v1/X``.
        """
        paths = [path]
        if path.startswith("/api/"):
            paths.append("/api/v1/" + path[len("/api/"):])
        route_name = name or path

        def register(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            def handler(request: Any, **kwargs: Any) -> "Deferred[bytes]":
                async def work() -> Tuple[int, Any]:
                    caller = await self.auth.authenticate(request, auth)
                    return await fn(request, caller, **kwargs)  # type: ignore[no-any-return]

                return Deferred.fromCoroutine(self._guard(request, route_name, rate_limited, work))

            for i, p in enumerate(paths):
                self.app.route(p, methods=methods, endpoint="{}#{}#{}".format(route_name, ",".join(methods), i))(handler)
            return fn

        return register

    async def _guard(self, request: Any, route: str, rate_limited: bool,
                     work: Callable[[], Awaitable[Tuple[int, Any]]]) -> bytes:
        """
        Common headers, the per-IP budget, then ``work()``; its answer, or the
        JSON error. A request whose client went away (Klein cancels it) ends
        here quietly: not a storage failure, not a bug.
        """
        self.common_headers(request)
        started = time.perf_counter()
        gone: List[Any] = []  # the connection was lost before the answer
        request.notifyFinish().addErrback(gone.append)
        try:
            if rate_limited:
                per_min = self.node.settings.rest_requests_per_minute
                wait = await self.node.limits.take("rest_ip", self.client_ip(request), per_min / 60.0, per_min)
                if wait > 0:
                    metrics.LIMIT_HITS.labels(limit="rest_per_ip").inc()
                    raise ApiError(429, "RATE_LIMITED", "Too many requests",
                                   headers={"Retry-After": str(max(1, int(wait + 0.999)))})
            status, body = await work()
            return self.respond(request, status, body, route)
        except ApiError as e:
            return self.error(request, e, route)
        except StorageUnavailable:
            return self.error(request, ApiError(503, "UNAVAILABLE", "Storage unavailable", headers={"Retry-After": "5"}), route)
        except CancelledError:
            if not gone:
                log.failure("bug in {route} (request {rid}): cancelled", route=route,
                            rid=getattr(request, "request_id", "-"))
                return self.error(request, ApiError(500, "INTERNAL", "Internal error"), route)
            metrics.HTTP_REQUESTS.labels(route=route, status="499").inc()  # the client closed the request
            raise
        except Exception:
            log.failure("bug in {route} (request {rid})", route=route, rid=getattr(request, "request_id", "-"))
            return self.error(request, ApiError(500, "INTERNAL", "Internal error"), route)
        finally:
            log.debug("{method} {path} {ms:.1f} ms", method=request.method.decode("ascii", "replace"),
                      path=redact_target(request.uri.decode("latin-1")), ms=(time.perf_counter() - started) * 1000)


class ApiResource(KleinResource):
    """
    Klein's resource, except that a URL it cannot decode (a path or Host that
    is not UTF-8) is answered through the API wrapper instead of Klein's
    plain-text 400 and its logged traceback.
    """

    def __init__(self, app: Any, api: Api) -> None:
        super().__init__(app)
        self.api = api

    def render(self, request: Any) -> Any:
        try:
            request.getRequestHostname().decode("utf-8")
            b"/".join(request.prepath + request.postpath).decode("utf-8")
        except UnicodeDecodeError:
            d = self.api.refuse(request, ApiError(400, "VALIDATION_ERROR", "URL is not valid UTF-8", field="path"),
                                "(url)")
            if isinstance(d, bytes):
                return d
            finished: List[Any] = []
            request.notifyFinish().addBoth(finished.append)

            def write(body: bytes) -> None:
                if not finished:
                    request.write(body)
                    request.finish()

            d.addCallback(write)
            d.addErrback(lambda f: None if f.check(CancelledError) else log.failure("answering a bad URL", f))
            return NOT_DONE_YET
        return super().render(request)


def parse_body(request: Any, required: bool = True) -> Any:
    """The request body as JSON by the protocol's rules; 400 BAD_JSON when it does not parse."""
    request.content.seek(0)
    raw = request.content.read()
    if not raw.strip():
        if required:
            raise ApiError(400, "BAD_JSON", "Request body must be JSON")
        return {}
    try:
        return wire.parse_json(raw)
    except wire.Malformed:
        raise ApiError(400, "BAD_JSON", "Request body is not valid JSON") from None


def body_object(request: Any) -> Dict[str, Any]:
    """The body as a JSON object (400 VALIDATION_ERROR with field ``body`` otherwise)."""
    value = parse_body(request)
    if not isinstance(value, dict):
        raise ApiError(400, "VALIDATION_ERROR", "Body must be a JSON object", field="body")
    return value


def query_arg(request: Any, name: str) -> Optional[str]:
    """One query-string argument as text, or None."""
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    return values[0].decode("utf-8", "replace")


def query_int(request: Any, name: str, default: int, low: int, high: Optional[int] = None, clamp: bool = True) -> int:
    """An integer query argument; 400 when present and not an integer ≥ low."""
    raw = query_arg(request, name)
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"-?[0-9]{1,18}", raw):
        raise ApiError(400, "VALIDATION_ERROR", "{} must be an integer".format(name), field=name)
    value = int(raw)
    if value < low:
        if not clamp:
            raise ApiError(400, "VALIDATION_ERROR", "{} must be >= {}".format(name, low), field=name)
        value = low
    if high is not None and value > high:
        value = high
    return value
