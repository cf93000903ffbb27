"""
Behaviour every REST response shares (API.md §2): request ids, security
headers, HSTS, CORS, JSON errors (400/404/405/413/429), ``/health`` and
``/metrics``, against a real ``twistd pocketbridge`` process.

Most of this does not touch storage, so it runs on SQLite; what depends on a
signed route (bad JSON) and the health check also run on PostgreSQL.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from typing import TYPE_CHECKING

import orjson
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from pocketbridge.client import Client, Identity
from pocketbridge.client.rest import RestClient, RestResponse
from tests.class_servers import class_server
from tests.harness import PostgresMixin, ServerProcess, SQLiteMixin, free_port, start_server
from tests.test_api_auth import ADMIN_ENV, admin_headers, signed_client

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
CORS_HEADERS = ("Access-Control-Allow-Origin", "Access-Control-Allow-Methods", "Access-Control-Allow-Headers",
                "Access-Control-Max-Age", "Access-Control-Expose-Headers", "Access-Control-Allow-Credentials")
APP = "https://app.example"
OTHER_APP = "https://other.example"
KIB = 1024


class _Collect(Protocol):
    """Keeps every byte the server sends; ``done`` fires with them when the connection closes."""

    def __init__(self) -> None:
        self.data = b""
        self.done: "Deferred[bytes]" = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(self.data)


async def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Write ``data`` on a new TCP connection; everything received until the server closes it."""
    proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), _Collect())
    proto.transport.write(data)
    d = proto.done
    d.addTimeout(timeout, reactor, onTimeoutCancel=lambda *_: proto.transport.abortConnection())
    return await d


def anonymous(server: ServerProcess) -> RestClient:
    """A RestClient that signs nothing."""
    return RestClient(reactor, server.http_url)


class CommonHeaderTests(_Base):
    """Request ids and security headers (API.md §2)."""

    async def test_valid_request_id_echoed(self) -> None:
        """An X-Request-ID of up to 64 allowed characters comes back unchanged."""
        server = await class_server(self)
        for rid in ("abc", "A.b-c_9", "x" * 64):
            response = await anonymous(server).get("/health", headers={"X-Request-ID": rid})
            self.assertEqual(response.header("X-Request-ID"), rid)

    async def test_invalid_request_id_replaced(self) -> None:
        """An X-Request-ID that is too long or has other characters is replaced by a fresh valid one."""
        server = await class_server(self)
        for rid in ("x" * 65, "has space", "semi;colon", "ünï"):
            response = await anonymous(server).get("/health", headers={"X-Request-ID": rid})
            got = response.header("X-Request-ID")
            self.assertIsNotNone(got)
            assert got is not None
            self.assertNotEqual(got, rid)
            self.assertRegex(got, REQUEST_ID_RE)

    async def test_request_id_generated_when_absent(self) -> None:
        """Without X-Request-ID each response carries a new one."""
        server = await class_server(self)
        a = (await anonymous(server).get("/health")).header("X-Request-ID")
        b = (await anonymous(server).get("/health")).header("X-Request-ID")
        assert a is not None and b is not None
        self.assertRegex(a, REQUEST_ID_RE)
        self.assertNotEqual(a, b)

    async def test_security_headers_on_success_and_errors(self) -> None:
        """200, 401, 404 and 405 responses all carry the security headers and a request id."""
        server = await class_server(self)
        client = anonymous(server)
        responses = [
            await client.get("/health"),
            await client.get("/api/devices"),
            await client.get("/api/no-such-route"),
            await client.request("DELETE", "/health"),
        ]
        self.assertEqual([r.status for r in responses], [200, 401, 404, 405])
        for response in responses:
            for name, value in SECURITY_HEADERS.items():
                self.assertEqual(response.header(name), value, (response.status, name))
            self.assertIsNotNone(response.header("X-Request-ID"))
            self.assertIsNone(response.header("Strict-Transport-Security"))

    async def test_hsts_only_over_tls(self) -> None:
        """HSTS is sent when a trusted proxy says the request came over HTTPS, and not otherwise."""
        server = await class_server(self, args=["--trusted-proxies", "127.0.0.1"])
        client = anonymous(server)
        tls = await client.get("/health", headers={"X-Forwarded-Proto": "https"})
        self.assertEqual(tls.header("Strict-Transport-Security"), "max-age=31536000")
        error = await client.get("/api/devices", headers={"X-Forwarded-Proto": "https"})
        self.assertEqual(error.header("Strict-Transport-Security"), "max-age=31536000")
        plain = await client.get("/health", headers={"X-Forwarded-Proto": "http"})
        self.assertIsNone(plain.header("Strict-Transport-Security"))
        self.assertIsNone((await client.get("/health")).header("Strict-Transport-Security"))

    async def test_forwarded_proto_from_untrusted_peer_ignored(self) -> None:
        """X-Forwarded-Proto: https from a peer that is not a trusted proxy does not turn on HSTS."""
        server = await class_server(self)
        response = await anonymous(server).get("/health", headers={"X-Forwarded-Proto": "https"})
        self.assertIsNone(response.header("Strict-Transport-Security"))


class CorsTests(_Base):
    """CORS (API.md §2)."""

    def assertNoCors(self, response: RestResponse) -> None:
        """No CORS header at all."""
        for name in CORS_HEADERS:
            self.assertIsNone(response.header(name), name)

    async def test_no_cors_when_unset(self) -> None:
        """Without CORS_ORIGIN no response carries CORS headers, preflight included."""
        server = await class_server(self)
        client = anonymous(server)
        self.assertNoCors(await client.get("/health", headers={"Origin": APP}))
        preflight = await client.request("OPTIONS", "/api/devices", headers={
            "Origin": APP, "Access-Control-Request-Method": "GET"})
        self.assertNoCors(preflight)

    async def test_allowed_origin_reflected(self) -> None:
        """An allowed origin is reflected with Vary and Expose-Headers, on success and on errors, never with credentials."""
        server = await class_server(self, env={"CORS_ORIGIN": "{}, {}".format(OTHER_APP, APP)})
        client = anonymous(server)
        for response in (await client.get("/health", headers={"Origin": APP}),
                         await client.get("/api/devices", headers={"Origin": APP})):
            self.assertEqual(response.header("Access-Control-Allow-Origin"), APP)
            self.assertEqual(response.header("Vary"), "Origin")
            self.assertEqual(response.header("Access-Control-Expose-Headers"), "Retry-After, X-Request-ID")
            self.assertIsNone(response.header("Access-Control-Allow-Credentials"))

    async def test_disallowed_origin_gets_nothing(self) -> None:
        """An origin not in CORS_ORIGIN gets no CORS headers, on requests and preflights."""
        server = await class_server(self, env={"CORS_ORIGIN": APP})
        client = anonymous(server)
        self.assertNoCors(await client.get("/health", headers={"Origin": OTHER_APP}))
        self.assertNoCors(await client.request("OPTIONS", "/api/devices", headers={
            "Origin": OTHER_APP, "Access-Control-Request-Method": "GET"}))

    async def test_star_allows_any_origin(self) -> None:
        """CORS_ORIGIN=* reflects whatever origin asks (not a literal *)."""
        server = await class_server(self, env={"CORS_ORIGIN": "*"})
        for origin in (APP, "http://localhost:5173"):
            response = await anonymous(server).get("/health", headers={"Origin": origin})
            self.assertEqual(response.header("Access-Control-Allow-Origin"), origin)
            self.assertIsNone(response.header("Access-Control-Allow-Credentials"))

    async def test_preflight(self) -> None:
        """A preflight from an allowed origin answers 204 with the methods, headers and max-age."""
        server = await class_server(self, env={"CORS_ORIGIN": APP})
        for path in ("/api/devices", "/api/devices/{}/rename".format(uuid.uuid4()), "/admin/stats"):
            response = await anonymous(server).request("OPTIONS", path, headers={
                "Origin": APP, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            self.assertEqual(response.status, 204, path)
            self.assertEqual(response.body, b"")
            self.assertEqual(response.header("Access-Control-Allow-Origin"), APP)
            self.assertEqual(response.header("Access-Control-Allow-Methods"), "GET, POST, PUT, DELETE")
            self.assertEqual(response.header("Access-Control-Allow-Headers"),
                             "Authorization, Content-Type, X-User-ID, X-Device-ID, X-Request-ID")
            self.assertEqual(response.header("Access-Control-Max-Age"), "600")
            self.assertEqual(response.header("Vary"), "Origin")
            self.assertIsNone(response.header("Access-Control-Allow-Credentials"))


class ErrorTests(_Base):
    """JSON errors of API.md §2."""

    async def test_unknown_route_404_json(self) -> None:
        """An unknown path gets 404 with the JSON error body."""
        server = await class_server(self)
        for path in ("/api/nope", "/api/v1/nope", "/nope", "/admin/nope"):
            response = await anonymous(server).get(path)
            self.assertEqual(response.status, 404, path)
            self.assertEqual(response.json, {"error": response.json["error"], "code": "NOT_FOUND"})
            self.assertEqual(response.header("Content-Type"), "application/json; charset=utf-8")

    async def test_wrong_method_405_with_allow(self) -> None:
        """A known path with another method gets 405 METHOD_NOT_ALLOWED and Allow listing its methods."""
        server = await class_server(self)
        client = anonymous(server)
        health = await client.request("DELETE", "/health")
        self.assertEqual((health.status, health.json["code"]), (405, "METHOD_NOT_ALLOWED"))
        self.assertEqual(health.header("Allow"), "GET")
        device = await client.request("PUT", "/api/devices/{}".format(uuid.uuid4()))
        self.assertEqual((device.status, device.json["code"]), (405, "METHOD_NOT_ALLOWED"))
        self.assertEqual(device.header("Allow"), "DELETE, GET")
        drain = await client.get("/admin/drain")
        self.assertEqual((drain.status, drain.header("Allow")), (405, "POST"))

    async def test_payload_too_large_by_content_length(self) -> None:
        """A Content-Length over 64 KiB gets 413 at once, without the body being sent, and the connection is closed."""
        server = await class_server(self)
        request = (
            "POST /api/devices/{}/rename HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n".format(uuid.uuid4(), 64 * KIB + 1)
        ).encode("ascii")
        answer = await raw_exchange(server.port, request)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:200])
        self.assertEqual(orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["code"], "PAYLOAD_TOO_LARGE")
        self.assertIn(b"X-Request-ID: ", answer)
        self.assertIn(b"X-Content-Type-Options: nosniff", answer)

    async def test_payload_too_large_chunked(self) -> None:
        """A chunked body gets 413 as soon as it passes 64 KiB, and the connection is closed."""
        server = await class_server(self)
        head = (
            "POST /api/devices/{}/rename HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".format(uuid.uuid4())
        ).encode("ascii")
        # Exactly 64 KiB in four chunks, then one byte more; the request never ends.
        chunks = b"".join(b"4000\r\n" + b"a" * (16 * KIB) + b"\r\n" for _ in range(4)) + b"1\r\nb"
        answer = await raw_exchange(server.port, head + chunks)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:200])
        self.assertEqual(orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["code"], "PAYLOAD_TOO_LARGE")

    async def test_body_of_64_kib_accepted(self) -> None:
        """A body of exactly 64 KiB is read and handled (here: refused 401 for lack of credentials, not 413)."""
        server = await class_server(self)
        body = b" " * (64 * KIB - 2) + b"{}"
        response = await anonymous(server).request("POST", "/api/devices/{}/rename".format(uuid.uuid4()),
                                                   raw_body=body)
        self.assertEqual((response.status, response.json["code"]), (401, "AUTH_REQUIRED"))

    async def test_rate_limited_after_budget(self) -> None:
        """Past the per-IP budget requests get 429 RATE_LIMITED with Retry-After; /health and /metrics stay open."""
        server = await start_server(self, args=["--rest-requests-per-minute", "5"], env=ADMIN_ENV)
        client = anonymous(server)
        statuses = [(await client.get("/admin/stats", headers=admin_headers())).status for _ in range(5)]
        self.assertEqual(statuses, [200] * 5)
        limited = await client.get("/admin/stats", headers=admin_headers())
        self.assertEqual((limited.status, limited.json["code"]), (429, "RATE_LIMITED"))
        retry = limited.header("Retry-After")
        assert retry is not None
        self.assertRegex(retry, r"^[1-9][0-9]*$")
        self.assertLessEqual(int(retry), 60)
        # Every route shares the budget (an unauthenticated one too) ...
        self.assertEqual((await client.get("/api/devices")).status, 429)
        # ... but the health check and metrics do not count.
        for _ in range(10):
            self.assertEqual((await client.get("/health")).status, 200)
        self.assertEqual((await client.get("/metrics")).status, 200)


class BadJsonTests(_Base):
    """400 BAD_JSON (API.md §2) on a signed route that reads a JSON body."""

    async def test_bad_json_bodies(self) -> None:
        """Invalid JSON, NaN/Infinity, nesting deeper than 64 and a lone surrogate get 400 BAD_JSON."""
        server = await class_server(self)
        rest = await signed_client(server)
        path = "/api/devices/{}/rename".format(rest.device_id)
        bodies = [
            b'{"device_name":',
            b"not json",
            b'{"device_name": NaN}',
            b'{"device_name": Infinity}',
            b'{"device_name": -Infinity}',
            b'{"device_name":"x","a":' + b"[" * 64 + b"]" * 64 + b"}",
            b'{"device_name":"\\ud800"}',
            b'{"device_name":"\xff"}',
        ]
        for body in bodies:
            response = await rest.request("POST", path, raw_body=body)
            self.assertEqual((response.status, response.json and response.json["code"]), (400, "BAD_JSON"), body[:40])
        # Nesting of exactly 64 parses (and the rename then succeeds).
        ok = b'{"device_name":"Laptop","a":' + b"[" * 63 + b"]" * 63 + b"}"
        response = await rest.request("POST", path, raw_body=ok)
        self.assertEqual(response.status, 200, response)

    async def test_body_not_an_object(self) -> None:
        """A JSON body that is not an object gets 400 VALIDATION_ERROR with field body."""
        server = await class_server(self)
        rest = await signed_client(server)
        response = await rest.request("POST", "/api/devices/{}/rename".format(rest.device_id), raw_body=b"[1]")
        self.assertEqual(response.json, {"error": response.json["error"], "code": "VALIDATION_ERROR", "field": "body"})


class HealthTests(_Base):
    """``/health`` and ``/api/health`` (API.md §3)."""

    async def test_health_shape(self) -> None:
        """/health answers 200 with status, version, node id, uptime and services; /api/health and /api/v1/health too."""
        server = await class_server(self)
        bodies = []
        for path in ("/health", "/api/health", "/api/v1/health"):
            response = await anonymous(server).get(path)
            self.assertEqual(response.status, 200, path)
            bodies.append(response.json)
        body = bodies[0]
        self.assertEqual(set(body), {"status", "version", "node_id", "uptime_s", "services"})
        self.assertEqual(body["status"], "ok")
        self.assertIsInstance(body["version"], str)
        self.assertIsInstance(body["node_id"], str)
        self.assertIs(type(body["uptime_s"]), int)
        self.assertGreaterEqual(body["uptime_s"], 0)
        self.assertEqual(body["services"], {"database": "ok", "bus": "embedded"})
        for other in bodies[1:]:
            self.assertEqual({k: v for k, v in other.items() if k != "uptime_s"},
                             {k: v for k, v in body.items() if k != "uptime_s"})


class MetricsTests(_Base):
    """``/metrics`` (API.md §3)."""

    async def test_metrics_exposition(self) -> None:
        """/metrics shows request counts by route and status, handshakes and stored events."""
        server = await start_server(self)
        await anonymous(server).get("/health")
        await anonymous(server).get("/api/devices")
        client = Client(reactor, server.ws_url, Identity.generate())
        await client.connect()
        await client.send_event("clipboard:main", "clipboard:text", "aGVsbG8=", timeout=10)
        await client.close()
        response = await anonymous(server).get("/metrics")
        self.assertEqual(response.status, 200)
        self.assertTrue((response.header("Content-Type") or "").startswith("text/plain"))
        text = response.body.decode("utf-8")
        self.assertRegex(text, r'pocketbridge_http_requests_total\{route="/health",status="200"\} [1-9]')
        self.assertRegex(text, r'pocketbridge_http_requests_total\{route="/api/devices",status="401"\} [1-9]')
        self.assertRegex(text, r'pocketbridge_handshakes_total\{result="ok"\} [1-9]')
        self.assertRegex(text, r"pocketbridge_events_stored_total [1-9]")
        names = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
        self.assertTrue(names)
        ours = {n for n in names if n.startswith("pocketbridge_")}
        self.assertGreaterEqual(len(ours), 10)

    async def test_metrics_listen_moves_metrics(self) -> None:
        """With --metrics-listen, /metrics is served there and the main port answers 404."""
        port = free_port()
        server = await start_server(self, args=["--metrics-listen", "tcp:{}:interface=127.0.0.1".format(port)])
        main = await anonymous(server).get("/metrics")
        self.assertEqual((main.status, main.json["code"]), (404, "NOT_FOUND"))
        response = await treq.get("http://127.0.0.1:{}/metrics".format(port), persistent=False)
        text = (await treq.content(response)).decode("utf-8")
        self.assertEqual(response.code, 200)
        self.assertIn("pocketbridge_http_requests_total", text)
        other = await treq.get("http://127.0.0.1:{}/health".format(port), persistent=False)
        await treq.content(other)
        self.assertEqual(other.code, 404)

    async def test_metrics_listen_on_a_unix_socket(self) -> None:
        """--metrics-listen unix:PATH serves /metrics (a UNIX peer has no host; it used to crash the request)."""
        directory = tempfile.mkdtemp(prefix="pb-unix-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "metrics.sock")
        await start_server(self, args=["--metrics-listen", "unix:{}".format(path)])

        class ToSocket:
            def endpointForURI(self, uri: object) -> UNIXClientEndpoint:
                return UNIXClientEndpoint(reactor, path)

        response = await Agent.usingEndpointFactory(reactor, ToSocket()).request(b"GET", b"http://metrics/metrics")
        text = (await readBody(response)).decode("utf-8")
        self.assertEqual(response.code, 200)
        self.assertIn("pocketbridge_http_requests_total", text)


class CommonHeaderTestsSQLite(CommonHeaderTests, SQLiteMixin, TestCase):
    """Request ids and security headers on SQLite."""


class CorsTestsSQLite(CorsTests, SQLiteMixin, TestCase):
    """CORS on SQLite."""


class ErrorTestsSQLite(ErrorTests, SQLiteMixin, TestCase):
    """Errors on SQLite."""


class ErrorTestsPostgres(ErrorTests, PostgresMixin, TestCase):
    """Errors on PostgreSQL."""


class BadJsonTestsSQLite(BadJsonTests, SQLiteMixin, TestCase):
    """Bad JSON on SQLite."""


class BadJsonTestsPostgres(BadJsonTests, PostgresMixin, TestCase):
    """Bad JSON on PostgreSQL."""


class HealthTestsSQLite(HealthTests, SQLiteMixin, TestCase):
    """Health on SQLite."""


class HealthTestsPostgres(HealthTests, PostgresMixin, TestCase):
    """Health on PostgreSQL."""


class MetricsTestsPostgres(MetricsTests, PostgresMixin, TestCase):
    """Metrics on PostgreSQL."""
