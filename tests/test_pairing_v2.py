"""
Integration tests of pairing v2 (API.md "Pairing, v2"): the mailbox routes of
a real ``twistd pocketbridge`` process on SQLite and PostgreSQL, driven by
the SDK (``pocketbridge.client.pairing``: ``pair_new`` on the existing device
A, ``pair_join`` on the new device B) and, where a test needs one step at a
time, by ``RestClient`` with the SDK's sans-IO ``Pake``.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from pocketbridge.client import Client, DeviceKeys
from pocketbridge.client.pairing import (
    Pake,
    PairingBurned,
    PairingExpired,
    PairingFailed,
    PairingResult,
    PairingTimedOut,
    RateLimited,
    identity_bundle,
    open_bundle,
    pair_join,
    pair_new,
    seal_bundle,
)
from pocketbridge.client.payload import PayloadKey
from pocketbridge.client.rest import RestClient, RestResponse
from tests.class_servers import class_server, unique_code
from tests.harness import PostgresMixin, ServerProcess, SQLiteMixin, start_server

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

TIMEOUT = 10.0
MAILBOX = "/api/pairing/v2"
# The server shared by the tests of a class that neither spend nor measure a
# failure budget: budgets large enough that the failures of all of them
# together (wrong tokens, mistyped codes) never refuse a request.
SHARED_ARGS = ("--pairing-failures-per-ip", "1000000", "--pairing-failures-global", "1000000",
               "--rest-requests-per-minute", "1000000")


def sleep(seconds: float) -> "Deferred[None]":
    """A Deferred that fires after ``seconds`` of real time."""
    return deferLater(reactor, seconds, lambda: None)


def other_code(code: str) -> str:
    """A valid code that is not ``code``, nor any other code this process's tests chose."""
    while True:
        candidate = unique_code()
        if candidate != code:
            return candidate


class PairingV2Integration(_Base):
    """Pairing v2 against a real server; mixed with a backend and TestCase below."""

    backend: str

    async def start(self, args: Sequence[str] = (), env: Optional[Dict[str, str]] = None) -> ServerProcess:
        """A healthy server on this class's backend."""
        return await start_server(self, args=args, env=env)

    async def shared(self) -> ServerProcess:
        """
        The class's server (``SHARED_ARGS``), for a test that makes its own
        users and codes and asserts nothing about node-wide state: one twistd
        start for all of them instead of one each.
        """
        return await class_server(self, args=SHARED_ARGS)

    async def device(self, server: ServerProcess, keys: Optional[DeviceKeys] = None) -> Tuple[Client, RestClient, DeviceKeys]:
        """A connected v2 device (a new user's unless ``keys``) and a REST client signing as it."""
        keys = keys or DeviceKeys.generate(device_name="Laptop")
        client = Client.for_device(reactor, server.ws_url, keys)
        self.addCleanup(client.close)
        await client.connect()
        return client, RestClient(reactor, server.http_url, keys.identity, keys.device_id), keys

    @staticmethod
    def anonymous(server: ServerProcess) -> RestClient:
        """A client that signs nothing (device B before pairing)."""
        return RestClient(reactor, server.http_url)

    async def open_mailbox(self, rest: RestClient, code: Optional[str] = None) -> Tuple[str, Pake]:
        """A opens a mailbox step by step: (code, A's PAKE)."""
        code = code or unique_code()
        pake = Pake("A", code)
        resp = await rest.post(MAILBOX, {"code": code, "msg_a": pake.message})
        self.assertEqual(resp.status, 201, resp)
        return code, pake

    async def join(self, server: ServerProcess, code: str, password: Optional[str] = None) -> Tuple[RestResponse, Pake]:
        """B joins ``code`` step by step (its PAKE run with ``password``, default the code)."""
        pake = Pake("B", password or code)
        resp = await self.anonymous(server).post("{}/{}/join".format(MAILBOX, code), {"msg_b": pake.message})
        return resp, pake

    def mailbox_rows(self, server: ServerProcess) -> List[Tuple[Any, ...]]:
        """Every row of the pairing_v2 table, read directly from the database."""
        query = ("SELECT code_key, user_id, device_id, msg_a, msg_b, b_token_hash, sealed, state,"
                 " created_at, expires_at FROM pairing_v2")
        if self.backend == "sqlite":
            conn = sqlite3.connect(os.path.join(server.data_dir, "pocketbridge.sqlite3"))
            try:
                return [tuple(r) for r in conn.execute(query)]
            finally:
                conn.close()
        import psycopg2

        assert server.database_url is not None
        pg = psycopg2.connect(server.database_url)
        try:
            with pg.cursor() as cur:
                cur.execute(query)
                return [tuple(r) for r in cur.fetchall()]
        finally:
            pg.close()

    # ------------------------------------------------------------ the SDK end to end

    async def test_full_pairing_with_the_sdk(self) -> None:
        """A and B show the same verification string, B gets the user identity and signs in as the user, A hears pairing_complete and device_paired."""
        server = await self.shared()
        a_client, a_rest, a_keys = await self.device(server)
        mark = len(a_client.messages)
        shown: Dict[str, str] = {}
        joined: List["Deferred[Tuple[DeviceKeys, str]]"] = []

        def on_code(code: str) -> None:
            shown["code"] = code
            joined.append(Deferred.fromCoroutine(pair_join(
                reactor, server.http_url, code, device_name="Phone", device_type="mobile", timeout=TIMEOUT,
                on_verify=lambda v: shown.__setitem__("b", v))))

        result = await Deferred.fromCoroutine(pair_new(
            reactor, a_rest, a_keys, on_code=on_code, on_verify=lambda v: shown.__setitem__("a", v), timeout=TIMEOUT))
        b_keys, b_verification = await joined[0]

        self.assertIsInstance(result, PairingResult)
        self.assertEqual(result.code, shown["code"])
        self.assertRegex(result.code, r"^[0-9]{6}$")
        self.assertTrue(time.time() * 1000 < result.expires_at <= time.time() * 1000 + 300_000)
        self.assertRegex(result.verification, r"^[0-9A-HJKMNP-TV-Z]{5}-[0-9A-HJKMNP-TV-Z]{5}$")
        self.assertEqual({result.verification, b_verification, shown["a"], shown["b"]}, {result.verification})
        self.assertEqual(b_keys.identity, a_keys.identity)
        self.assertNotEqual(b_keys.device_id, a_keys.device_id)
        self.assertEqual((b_keys.device_name, b_keys.device_type), ("Phone", "mobile"))
        # A's pin of the server (from its v2 handshake) travelled inside the bundle.
        self.assertIsNotNone(a_keys.pinned_server_key(server.ws_url))
        self.assertEqual(b_keys.pinned_server_key(server.ws_url), a_keys.pinned_server_key(server.ws_url))

        notice = await a_client.wait_for("pairing_complete", timeout=TIMEOUT, since=mark)
        self.assertEqual((notice["payload"]["type"], notice["payload"]["code"]), ("pairing_complete", result.code))

        # B signs in as the user (the caller's step after pair_join) ...
        b_client = Client.for_device(reactor, server.ws_url, b_keys)
        self.addCleanup(b_client.close)
        session = await b_client.connect()
        self.assertEqual((session["device_id"], session["protocol_version"]), (b_keys.device_id, 2))
        paired = await a_client.wait_for("device_paired", timeout=TIMEOUT, since=mark)
        self.assertEqual((paired["payload"]["device_id"], paired["payload"]["device_name"]), (b_keys.device_id, "Phone"))
        # ... and the two share the payload key: what B seals, A opens.
        b_payload = PayloadKey.from_identity(b_keys.identity)
        await b_client.send_event("clipboard:main", "clipboard:text", b_payload.seal(b"from B", "clipboard:main", "clipboard:text"),
                                  timeout=TIMEOUT)
        event = await a_client.next_event(timeout=TIMEOUT)
        opened = PayloadKey.from_identity(a_keys.identity).open(event["encrypted_payload"], event["stream_id"], event["type"])
        self.assertEqual(opened, b"from B")
        devices = await a_rest.get("/api/devices")
        self.assertEqual({d["device_id"] for d in devices.json["devices"]}, {a_keys.device_id, b_keys.device_id})
        # The mailbox is gone once B fetched the bundle.
        self.assertEqual((await a_rest.get("{}/{}".format(MAILBOX, result.code))).status, 404)

    async def test_database_and_log_never_hold_the_code(self) -> None:
        """While B waits, no stored column equals the code and code_key is neither the code nor its plain hash; the log masks it; the row is gone afterwards."""
        server = await self.start(env={"LOG_LEVEL": "debug"})
        _, a_rest, a_keys = await self.device(server)
        code = "{:06d}".format(int.from_bytes(os.urandom(4), "big") % 900000 + 100000)
        seen: Dict[str, Any] = {}
        joined: List["Deferred[Tuple[DeviceKeys, str]]"] = []

        def on_code(c: str) -> None:
            joined.append(Deferred.fromCoroutine(pair_join(reactor, server.http_url, c, timeout=TIMEOUT)))

        def on_verify(v: str) -> None:
            seen["rows"] = self.mailbox_rows(server)  # B joined, A has not sealed yet

        await Deferred.fromCoroutine(pair_new(reactor, a_rest, a_keys, code=code, on_code=on_code,
                                              on_verify=on_verify, timeout=TIMEOUT))
        b_keys, _ = await joined[0]
        self.assertEqual(b_keys.identity, a_keys.identity)

        rows = seen["rows"]
        self.assertEqual(len(rows), 1)
        row = rows[0]
        self.assertEqual(row[7], "joined")
        for value in row:
            self.assertNotEqual(str(value), code)
        code_key = row[0]
        self.assertRegex(code_key, r"^[0-9a-f]{64}$")
        self.assertNotIn(code, code_key)
        for digest in (hashlib.sha256, hashlib.sha512, hashlib.sha1, hashlib.md5):
            self.assertNotEqual(code_key, digest(code.encode()).hexdigest())
        self.assertNotIn(a_keys.identity.seed_hex, repr(row))
        self.assertEqual(self.mailbox_rows(server), [])

        await server.stop()
        text = server.log_text() + server.stdout_text() + server.stderr_text()
        self.assertIn("/api/pairing/v2/******", text)
        self.assertIsNone(re.search(r"(?<![0-9])" + code + r"(?![0-9])", text), "the code is in the log")
        self.assertNotIn(a_keys.identity.seed_hex, text)

    # ------------------------------------------------------------ one route at a time

    async def test_second_join_burns_the_mailbox(self) -> None:
        """A second join answers 410; then A's GET, A's PUT and B's fetch all answer 410, and both SDK sides raise PairingBurned."""
        server = await self.shared()
        _, a_rest, a_keys = await self.device(server)
        answers: Dict[str, Any] = {}
        joined: List["Deferred[Tuple[DeviceKeys, str]]"] = []

        def on_code(code: str) -> None:
            answers["code"] = code
            joined.append(Deferred.fromCoroutine(pair_join(reactor, server.http_url, code, timeout=TIMEOUT)))

        async def on_verify(v: str) -> bool:
            # Someone else joins after B and before A seals.
            answers["second"], _ = await self.join(server, answers["code"])
            answers["get"] = await a_rest.get("{}/{}".format(MAILBOX, answers["code"]))
            return True

        a_failure = await self.assertFailure(
            Deferred.fromCoroutine(pair_new(reactor, a_rest, a_keys, on_code=on_code,
                                            on_verify=lambda v: Deferred.fromCoroutine(on_verify(v)), timeout=TIMEOUT)),
            PairingBurned)
        self.assertIn("burned", str(a_failure))
        await self.assertFailure(joined[0], PairingBurned)
        self.assertEqual((answers["second"].status, answers["second"].json["code"]), (410, "GONE"))
        self.assertEqual((answers["get"].status, answers["get"].json["code"]), (410, "GONE"))
        again, _ = await self.join(server, answers["code"])
        self.assertEqual(again.status, 410)

    async def test_long_poll_waits_then_wakes_on_join(self) -> None:
        """A's GET with wait=2 answers 204 after about 2 s; with wait=20 it answers 200 {msg_b} soon after B joins."""
        server = await self.shared()
        _, a_rest, _ = await self.device(server)
        code, _ = await self.open_mailbox(a_rest)
        path = "{}/{}".format(MAILBOX, code)

        started = time.monotonic()
        empty = await a_rest.get(path + "?wait=2")
        elapsed = time.monotonic() - started
        self.assertEqual((empty.status, empty.body), (204, b""))
        self.assertTrue(1.9 <= elapsed < 5.0, elapsed)
        self.assertEqual((await a_rest.get(path)).status, 204)  # wait defaults to 0

        started = time.monotonic()
        polling = Deferred.fromCoroutine(a_rest.get(path + "?wait=20"))
        await sleep(0.5)
        joined, b_pake = await self.join(server, code)
        self.assertEqual(joined.status, 200, joined)
        answer = await polling
        elapsed = time.monotonic() - started
        self.assertEqual((answer.status, answer.json), (200, {"msg_b": b_pake.message}))
        self.assertTrue(0.5 <= elapsed < 5.0, elapsed)
        # A may repeat it until the mailbox is deleted.
        self.assertEqual((await a_rest.get(path + "?wait=1")).json, {"msg_b": b_pake.message})

    async def test_sealed_fetch_checks_the_token(self) -> None:
        """A wrong or malformed token answers 404 without spending the bundle; the right token then gets it once, then 404."""
        server = await self.shared()
        _, a_rest, a_keys = await self.device(server)
        code, a_pake = await self.open_mailbox(a_rest)
        joined, b_pake = await self.join(server, code)
        self.assertEqual(joined.status, 200, joined)
        self.assertEqual(set(joined.json), {"msg_a", "b_token"})
        self.assertEqual(joined.json["msg_a"], a_pake.message)
        token = joined.json["b_token"]
        self.assertRegex(token, r"^[0-9a-f]{64}$")
        got = await a_rest.get("{}/{}".format(MAILBOX, code))
        a_derived = a_pake.finish(got.json["msg_b"])
        b_derived = b_pake.finish(joined.json["msg_a"])
        sealed = seal_bundle(a_derived.seal_key, identity_bundle(a_keys))
        self.assertEqual((await a_rest.request("PUT", "{}/{}/sealed".format(MAILBOX, code), {"sealed": sealed})).status, 204)

        anon = self.anonymous(server)
        fetch = "{}/{}/sealed?token=".format(MAILBOX, code)
        wrong = "0" * 64 if token != "0" * 64 else "1" * 64
        for bad in (wrong, token.upper(), token[:-1], ""):
            r = await anon.get(fetch + bad)
            self.assertEqual((r.status, r.json["code"]), (404, "NOT_FOUND"), bad)
        right = await anon.get(fetch + token)
        self.assertEqual((right.status, right.json), (200, {"sealed": sealed}))
        self.assertEqual(open_bundle(b_derived.seal_key, right.json["sealed"])["user_id"], a_keys.user_id)
        self.assertEqual((await anon.get(fetch + token)).status, 404)
        self.assertEqual((await a_rest.get("{}/{}".format(MAILBOX, code))).status, 404)

    async def test_put_sealed_before_join_or_twice_conflicts(self) -> None:
        """PUT sealed before B joined answers 409 CONFLICT; after the join 204; a second PUT 409."""
        server = await self.shared()
        _, a_rest, _ = await self.device(server)
        code, _ = await self.open_mailbox(a_rest)
        put = "{}/{}/sealed".format(MAILBOX, code)
        early = await a_rest.request("PUT", put, {"sealed": "AAAA"})
        self.assertEqual((early.status, early.json["code"]), (409, "CONFLICT"))
        joined, _ = await self.join(server, code)
        self.assertEqual(joined.status, 200)
        self.assertEqual((await a_rest.request("PUT", put, {"sealed": "AAAA"})).status, 204)
        twice = await a_rest.request("PUT", put, {"sealed": "BBBB"})
        self.assertEqual((twice.status, twice.json["code"]), (409, "CONFLICT"))
        fetched = await self.anonymous(server).get("{}/sealed?token={}".format(put.rsplit("/", 1)[0], joined.json["b_token"]))
        self.assertEqual(fetched.json, {"sealed": "AAAA"})

    async def test_other_user_cannot_see_the_mailbox(self) -> None:
        """Another user's GET and PUT of A's mailbox answer 404 and change nothing; another device of A's user may GET it."""
        server = await self.shared()
        _, a_rest, a_keys = await self.device(server)
        _, other_rest, _ = await self.device(server)
        code, _ = await self.open_mailbox(a_rest)
        path = "{}/{}".format(MAILBOX, code)
        joined, b_pake = await self.join(server, code)
        self.assertEqual(joined.status, 200)
        for resp in (await other_rest.get(path), await other_rest.get(path + "?wait=1"),
                     await other_rest.request("PUT", path + "/sealed", {"sealed": "AAAA"})):
            self.assertEqual((resp.status, resp.json["code"]), (404, "NOT_FOUND"))
        _, sibling_rest, _ = await self.device(server, a_keys.for_new_device("Desktop"))
        self.assertEqual((await sibling_rest.get(path)).json, {"msg_b": b_pake.message})
        unsigned = await self.anonymous(server).get(path)
        self.assertEqual(unsigned.status, 401)

    async def test_expired_mailbox_is_not_found(self) -> None:
        """A mailbox older than its TTL answers 404 to A's GET and PUT and to B's join and fetch."""
        server = await self.start(args=["--pairing-v2-ttl", "1"])
        _, a_rest, _ = await self.device(server)
        code, _ = await self.open_mailbox(a_rest)
        await deferLater(reactor, 1.3, lambda: None)
        path = "{}/{}".format(MAILBOX, code)
        joined, _ = await self.join(server, code)
        self.assertEqual((joined.status, joined.json["code"]), (404, "NOT_FOUND"))
        for resp in (await a_rest.get(path), await a_rest.request("PUT", path + "/sealed", {"sealed": "AAAA"}),
                     await self.anonymous(server).get(path + "/sealed?token=" + "0" * 64)):
            self.assertEqual((resp.status, resp.json["code"]), (404, "NOT_FOUND"))
        # The code is free again for a new mailbox.
        again = await a_rest.post(MAILBOX, {"code": code, "msg_a": Pake("A", code).message})
        self.assertEqual(again.status, 201)

    # ------------------------------------------------------------ guessing and mistakes

    async def test_guessing_codes_is_rate_limited(self) -> None:
        """After 5 failed joins from one IP every join answers 429 with Retry-After, the right code too, and pair_join raises RateLimited."""
        server = await self.start(args=["--pairing-failures-per-ip", "5"])
        _, a_rest, _ = await self.device(server)
        code, _ = await self.open_mailbox(a_rest)
        statuses = []
        blocked: Optional[RestResponse] = None
        for _ in range(20):
            resp, _ = await self.join(server, other_code(code))
            if resp.status == 429:
                blocked = resp
                break
            statuses.append(resp.status)
        self.assertEqual(statuses, [404] * 5)
        assert blocked is not None
        self.assertEqual(blocked.json["code"], "RATE_LIMITED")
        retry = blocked.header("Retry-After") or ""
        self.assertTrue(retry.isdigit() and 1 <= int(retry) <= 600, retry)

        right, _ = await self.join(server, code)
        self.assertEqual((right.status, right.json["code"]), (429, "RATE_LIMITED"))
        limited = await self.assertFailure(
            Deferred.fromCoroutine(pair_join(reactor, server.http_url, code, timeout=TIMEOUT)), RateLimited)
        self.assertTrue(1 <= limited.retry_after <= 600)
        self.assertIsInstance(limited, PairingFailed)
        # The refused joins did not touch A's mailbox.
        self.assertEqual((await a_rest.get("{}/{}".format(MAILBOX, code))).status, 204)

    async def test_creating_on_live_codes_is_rate_limited(self) -> None:
        """A create that hits another user's live code counts as a failure; over the budget creates answer 429, so they cannot probe for live codes."""
        server = await self.start(args=["--pairing-failures-per-ip", "2", "--trusted-proxies", "127.0.0.1"])
        _, alice, _ = await self.device(server)
        _, bob, _ = await self.device(server)
        code, _ = await self.open_mailbox(alice)
        # Alice's own code again is free (not counted), as for v1 store.
        for _ in range(3):
            self.assertEqual((await alice.post(MAILBOX, {"code": code, "msg_a": "AAAA"})).status, 409)
        probe = {"X-Forwarded-For": "198.51.100.20"}
        for _ in range(2):
            taken = await bob.post(MAILBOX, {"code": code, "msg_a": "AAAA"}, headers=probe)
            self.assertEqual((taken.status, taken.json["code"]), (409, "CONFLICT"))
        refused = await bob.post(MAILBOX, {"code": code, "msg_a": "AAAA"}, headers=probe)
        self.assertEqual((refused.status, refused.json["code"]), (429, "RATE_LIMITED"))
        self.assertIsNotNone(refused.header("Retry-After"))
        # The user's budget is spent too, from any address.
        elsewhere = await bob.post(MAILBOX, {"code": other_code(code), "msg_a": "AAAA"},
                                   headers={"X-Forwarded-For": "203.0.113.50"})
        self.assertEqual(elsewhere.status, 429)
        # Alice's mailbox is untouched.
        joined, _ = await self.join(server, code)
        self.assertEqual(joined.status, 200, joined)

    async def test_mistyped_code_fails_cleanly(self) -> None:
        """B with a mistyped code gets PairingExpired (a PairingFailed) at once; A, never joined, times out with PairingTimedOut."""
        server = await self.shared()
        _, a_rest, a_keys = await self.device(server)
        shown: List[str] = []
        a_run = Deferred.fromCoroutine(pair_new(reactor, a_rest, a_keys, on_code=shown.append, timeout=3))
        while not shown:
            await sleep(0.05)
        b_failure = await self.assertFailure(
            Deferred.fromCoroutine(pair_join(reactor, server.http_url, other_code(shown[0]), timeout=TIMEOUT)),
            PairingExpired)
        self.assertIsInstance(b_failure, PairingFailed)
        started = time.monotonic()
        await self.assertFailure(a_run, PairingTimedOut)
        self.assertLess(time.monotonic() - started, 5.0)

    async def test_wrong_password_cannot_open_the_bundle(self) -> None:
        """A device that joins A's mailbox with a PAKE run on another code sees another verification string, and the bundle does not open: 'codes do not match'."""
        server = await self.shared()
        _, a_rest, a_keys = await self.device(server)
        code = unique_code()
        shown: Dict[str, str] = {}
        a_run = Deferred.fromCoroutine(pair_new(
            reactor, a_rest, a_keys, code=code, on_verify=lambda v: shown.__setitem__("a", v), timeout=TIMEOUT))
        while (await a_rest.get("{}/{}".format(MAILBOX, code))).status == 404:
            await sleep(0.05)  # until A's mailbox is open
        joined, impostor = await self.join(server, code, password=other_code(code))
        self.assertEqual(joined.status, 200, joined)
        derived = impostor.finish(joined.json["msg_a"])
        await a_run  # A's user confirmed without comparing
        self.assertNotEqual(derived.verification, shown["a"])
        got = await self.anonymous(server).get("{}/{}/sealed?token={}&wait=5".format(MAILBOX, code, joined.json["b_token"]))
        self.assertEqual(got.status, 200)
        self.assertEqual(str(self.assertRaises(PairingFailed, open_bundle, derived.seal_key, got.json["sealed"])),
                         "codes do not match")

    async def test_refused_verification_sends_nothing(self) -> None:
        """When A's user refuses the verification string, pair_new raises PairingFailed and B never gets a bundle."""
        server = await self.shared()
        _, a_rest, a_keys = await self.device(server)
        joined: List["Deferred[Tuple[DeviceKeys, str]]"] = []

        def on_code(code: str) -> None:
            joined.append(Deferred.fromCoroutine(pair_join(reactor, server.http_url, code, timeout=3)))

        await self.assertFailure(
            Deferred.fromCoroutine(pair_new(reactor, a_rest, a_keys, on_code=on_code, on_verify=lambda v: False,
                                            timeout=TIMEOUT)),
            PairingFailed)
        await self.assertFailure(joined[0], PairingTimedOut)


class PairingV2SQLiteTests(PairingV2Integration, SQLiteMixin, TestCase):
    """Pairing v2 on SQLite."""


class PairingV2PostgresTests(PairingV2Integration, PostgresMixin, TestCase):
    """Pairing v2 on PostgreSQL."""
