"""
REST hardening of issue 9 against a real ``twistd pocketbridge`` (items 6-10):
v1 codes stored only as a keyed hash, a replay cache that survives restarts,
every path through the API wrapper, no secret query parameter in the log, and
abandoned requests that are neither storage failures nor bugs.
"""

from __future__ import annotations

import os
import re
import sqlite3
from typing import TYPE_CHECKING, List, Sequence, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from pocketbridge.client import Client, DeviceKeys
from pocketbridge.client.pairing import Pake, new_code
from pocketbridge.client.rest import RestClient, authorization
from tests.harness import PostgresMixin, ServerProcess, SQLiteMixin, start_server
from tests.test_api_common import SECURITY_HEADERS, raw_exchange

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

# A bug, an unhandled error, a critical line or a storage failure in the server's log.
LOG_BAD_RE = re.compile(r".*(?:bug in|Unhandled|#critical\]|#error\]|storage \S+ failed).*")


def sleep(seconds: float) -> "Deferred[None]":
    """A Deferred that fires after ``seconds`` of real time."""
    return deferLater(reactor, seconds, lambda: None)


def db_values(server: ServerProcess, backend: str) -> List[Tuple[str, str]]:
    """(table, value as text) for every column of every row of every table."""
    out: List[Tuple[str, str]] = []
    if backend == "sqlite":
        conn = sqlite3.connect(os.path.join(server.data_dir, "pocketbridge.sqlite3"))
        try:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for t in tables:
                for row in conn.execute("SELECT * FROM " + t):
                    out.extend((t, str(v)) for v in row)
        finally:
            conn.close()
        return out
    import psycopg2

    assert server.database_url is not None
    pg = psycopg2.connect(server.database_url)
    try:
        with pg.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            for (t,) in cur.fetchall():
                cur.execute("SELECT * FROM " + t)
                for row in cur.fetchall():
                    out.extend((t, str(bytes(v)) if isinstance(v, memoryview) else str(v)) for v in row)
    finally:
        pg.close()
    return out


def parse_response(raw: bytes) -> Tuple[int, dict, bytes]:
    """(status, lower-cased headers, body) of one raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers, body


class _Hold(Protocol):
    """A connection that sends one request and is then aborted by the test."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def connectionMade(self) -> None:
        self.transport.write(self.data)


class Hardening(_Base):
    """Items 6-10 on a real server; mixed with a backend and TestCase below."""

    backend: str

    async def device(self, server: ServerProcess) -> Tuple[Client, RestClient, DeviceKeys]:
        """A connected v2 device of a new user and a REST client signing as it."""
        keys = DeviceKeys.generate()
        client = Client.for_device(reactor, server.ws_url, keys)
        self.addCleanup(client.close)
        await client.connect()
        return client, RestClient(reactor, server.http_url, keys.identity, keys.device_id), keys

    async def abandon(self, server: ServerProcess, request: str) -> None:
        """Send ``request`` on a new connection, wait 1.5 s, abort the connection, wait 1 s more."""
        proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port), _Hold(request.encode("latin-1")))
        await sleep(1.5)
        proto.transport.abortConnection()
        await sleep(1.0)

    # ------------------------------------------------------------ item 6

    async def test_v1_code_is_not_stored(self) -> None:
        """After a v1 store no database row holds the code, and the code is still redeemed once."""
        server = await start_server(self)
        _, rest, _ = await self.device(server)
        code = new_code()
        self.assertEqual((await rest.post("/api/pairing/store", {"code": code, "data": {"k": "v"}})).status, 200)
        holding = [(t, v) for t, v in db_values(server, self.backend) if code in v]
        self.assertEqual(holding, [])
        got = await RestClient(reactor, server.http_url).get("/api/pairing/lookup/" + code)
        self.assertEqual((got.status, got.json), (200, {"success": True, "data": {"k": "v"}}))
        self.assertEqual((await RestClient(reactor, server.http_url).get("/api/pairing/lookup/" + code)).status, 404)

    # ------------------------------------------------------------ item 7

    async def test_replay_refused_after_restart_and_kill(self) -> None:
        """A signed request accepted once is refused as a replay, and still refused after a restart and after kill -9."""
        server = await start_server(self)
        _, rest, _ = await self.device(server)
        header = {"Authorization": authorization(rest.identity, rest.device_id, "GET", "/api/devices", b"")}
        plain = RestClient(reactor, server.http_url)
        self.assertEqual((await plain.get("/api/devices", headers=header)).status, 200)
        self.assertEqual((await plain.get("/api/devices", headers=header)).status, 401)
        await server.restart()
        again = await plain.get("/api/devices", headers=header)
        self.assertEqual((again.status, again.json.get("code")), (401, "AUTH_INVALID"))
        # Accepted just before a kill -9: the entry was committed before the answer.
        header2 = {"Authorization": authorization(rest.identity, rest.device_id, "GET", "/api/devices", b"")}
        self.assertNotEqual(header2, header)
        self.assertEqual((await plain.get("/api/devices", headers=header2)).status, 200)
        await server.kill9()
        await server.start()
        self.assertEqual((await plain.get("/api/devices", headers=header2)).status, 401)
        # A fresh signature is fine.
        self.assertEqual((await rest.get("/api/devices")).status, 200)

    # ------------------------------------------------------------ item 8

    async def test_odd_paths_answer_json_with_security_headers(self) -> None:
        """'//', trailing slashes, dot segments, bad UTF-8 paths and Hosts get JSON errors with the security headers, no redirect, and the REST budget applies."""
        server = await start_server(self, args=["--rest-requests-per-minute", "8"])
        paths: Sequence[bytes] = (b"/api//devices", b"/api/devices/", b"/api/v1//devices", b"/api/./devices",
                                  b"/api/pairing//lookup/123456", b"/api/%ff", b"/api/devices%2f")
        for path in paths:
            raw = await raw_exchange(server.port, b"GET " + path + b" HTTP/1.1\r\nHost: evil.example\r\n"
                                     b"Connection: close\r\n\r\n")
            status, headers, body = parse_response(raw)
            self.assertIn(status, (400, 404), path)
            self.assertNotIn("location", headers, path)
            self.assertEqual(headers.get("content-type"), "application/json; charset=utf-8", path)
            for name, value in SECURITY_HEADERS.items():
                self.assertEqual(headers.get(name.lower()), value, (path, name))
            self.assertIn(b'"code"', body, path)
        bad_host = await raw_exchange(server.port, b"GET /api/devices HTTP/1.1\r\nHost: \xff\xfe\r\n"
                                      b"Connection: close\r\n\r\n")
        status, headers, _ = parse_response(bad_host)
        self.assertEqual((status, headers.get("content-type")), (400, "application/json; charset=utf-8"))
        # Eight requests per minute: the ninth odd path is refused by the budget.
        limited = parse_response(await raw_exchange(server.port, b"GET /api//x HTTP/1.1\r\nHost: a\r\n"
                                                    b"Connection: close\r\n\r\n"))
        self.assertEqual((limited[0], limited[1].get("retry-after") is not None), (429, True))
        await server.stop()
        self.assertEqual(LOG_BAD_RE.findall(server.log_text() + server.stderr_text()), [])

    # ------------------------------------------------------------ items 9 and 10

    async def test_no_token_in_debug_log_and_abandoned_polls_are_quiet(self) -> None:
        """At debug level the b_token never appears in the log; long-polls abandoned by A and B log no bug, no storage failure, no 503."""
        server = await start_server(self, env={"LOG_LEVEL": "debug"})
        _, a_rest, _ = await self.device(server)
        code = new_code()
        pake = Pake("A", code)
        self.assertEqual((await a_rest.post("/api/pairing/v2", {"code": code, "msg_a": pake.message})).status, 201)
        # A starts a 30 s long-poll for B's message and goes away.
        poll_path = "/api/pairing/v2/{}?wait=30".format(code)
        sig = authorization(a_rest.identity, a_rest.device_id, "GET", poll_path, b"")
        await self.abandon(server, "GET {} HTTP/1.1\r\nHost: a\r\nAuthorization: {}\r\n\r\n".format(poll_path, sig))
        joined = await RestClient(reactor, server.http_url).post(
            "/api/pairing/v2/{}/join".format(code), {"msg_b": Pake("B", code).message})
        self.assertEqual(joined.status, 200, joined)
        token = joined.json["b_token"]
        # B polls for the sealed bundle with its token (A has not sealed: 204 after the wait).
        polled = await RestClient(reactor, server.http_url).get(
            "/api/pairing/v2/{}/sealed?token={}&wait=1".format(code, token))
        self.assertEqual(polled.status, 204)
        # B starts a 30 s long-poll and goes away.
        await self.abandon(server, "GET /api/pairing/v2/{}/sealed?token={}&wait=30 HTTP/1.1\r\nHost: a\r\n\r\n"
                           .format(code, token))
        metrics = (await RestClient(reactor, server.http_url).get("/metrics")).body.decode()
        await server.stop()
        text = server.log_text() + server.stdout_text() + server.stderr_text()
        self.assertIn("/api/pairing/v2/******/sealed?", text)
        self.assertNotIn(token, text)
        self.assertEqual(LOG_BAD_RE.findall(text), [])
        self.assertNotIn('status="503"', metrics)


class HardeningSQLite(Hardening, SQLiteMixin, TestCase):
    """On SQLite (replay cache in the database file)."""


class HardeningPostgres(Hardening, PostgresMixin, TestCase):
    """On PostgreSQL without Redis (replay cache in the database)."""
