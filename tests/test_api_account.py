"""
Tests of the account routes (API.md §3 "User" and "Events over HTTP"):
profiles (signed and legacy with the v1 body signature), account deletion
and ``GET /api/events``.

Every test starts a real ``twistd pocketbridge`` process (``tests.harness``)
on SQLite and on PostgreSQL and drives it with the project's SDK.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from pocketbridge.server.api.jsstringify import stringify
from pocketbridge.client import Client, ConnectionClosed, Identity
from pocketbridge.client.rest import RestClient, RestResponse
from tests.class_servers import class_server
from tests.harness import PostgresMixin, ServerProcess, SQLiteMixin

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

TIMEOUT = 10.0
ISO_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
RELAY_FIELDS = {"event_id", "user_id", "device_id", "device_seq", "stream_id", "stream_seq", "type",
                "encrypted_payload", "created_at", "seq"}
PROFILE_FIELDS = {"user_id", "display_name", "email", "avatar_url", "preferences", "onboarding_completed",
                  "created_at", "updated_at"}


def now_ms() -> int:
    """Wall-clock ms (the server runs on this host)."""
    return int(time.time() * 1000)


def sleep(seconds: float) -> "Deferred[None]":
    """A Deferred that fires after ``seconds`` of real time."""
    return deferLater(reactor, seconds, lambda: None)


def b64(n: int) -> str:
    """Padded base64 of ``n`` random bytes (a valid encrypted_payload)."""
    return base64.b64encode(os.urandom(n)).decode("ascii")


def v1_signed(identity: Identity, fields: Dict[str, Any], subject: Optional[str] = None,
              ts: Optional[int] = None) -> Dict[str, Any]:
    """``fields`` plus the v1 body signature a web client adds (subject: JSON.stringify(fields) by default)."""
    ts = now_ms() if ts is None else ts
    x = stringify(fields) if subject is None else subject
    digest = hashlib.sha256((identity.user_id + str(ts) + x).encode("utf-8")).hexdigest()
    sig = identity.signing_key.sign(digest.encode("ascii")).signature.hex()
    return dict(fields, signature=sig, timestamp=ts)


class AccountIntegration(_Base):
    """Profile, deletion and events routes against a real server; mixed with a backend and TestCase below."""

    backend: str

    async def start(self, args: Sequence[str] = ()) -> ServerProcess:
        """A healthy server on this class's backend, shared with the class's other tests (tests.class_servers)."""
        return await class_server(self, args=args)

    async def device(self, server: ServerProcess, identity: Optional[Identity] = None,
                     device_id: Optional[str] = None) -> Tuple[Client, RestClient]:
        """A connected device of ``identity`` (new user when None) and a REST client signing as it."""
        identity = identity or Identity.generate()
        client = Client(reactor, server.ws_url, identity, device_id=device_id)
        self.addCleanup(client.close)
        await client.connect()
        return client, RestClient(reactor, server.http_url, identity, client.device_id)

    @staticmethod
    def legacy(server: ServerProcess, identity: Identity) -> Tuple[RestClient, Dict[str, str]]:
        """An unsigned client and the X-User-ID header of ``identity``."""
        return RestClient(reactor, server.http_url), {"X-User-ID": identity.user_id}

    def assertValidation(self, r: RestResponse, field: str) -> None:
        """400 VALIDATION_ERROR naming ``field``."""
        self.assertEqual((r.status, r.json.get("code"), r.json.get("field")), (400, "VALIDATION_ERROR", field), r)

    # ------------------------------------------------------------ profile

    async def test_profile_lifecycle(self) -> None:
        """No profile is 404; POST creates and updates it; null and "" clear; onboarding-complete sets the flag."""
        server = await self.start()
        _, rest = await self.device(server)
        missing = await rest.get("/api/user/profile")
        self.assertEqual((missing.status, missing.json["code"]), (404, "NOT_FOUND"))

        empty = await rest.post("/api/user/profile", {})
        self.assertEqual(empty.status, 200, empty)
        self.assertEqual(empty.json["success"], True)
        p = empty.json["profile"]
        self.assertEqual(set(p), PROFILE_FIELDS)
        self.assertEqual((p["user_id"], p["display_name"], p["email"], p["avatar_url"], p["preferences"],
                          p["onboarding_completed"]), (rest.identity.user_id, None, None, None, {}, False))
        self.assertRegex(p["created_at"], ISO_RE)
        self.assertRegex(p["updated_at"], ISO_RE)

        prefs = {"theme": "dark", "shortcuts": {"paste": "ctrl+v"}, "n": 1.5}
        updated = await rest.post("/api/user/profile",
                                  {"display_name": "Zoë", "email": "zoe@example.org", "preferences": prefs})
        self.assertEqual(updated.status, 200, updated)
        got = await rest.get("/api/user/profile")
        self.assertEqual(got.status, 200)
        p = got.json["profile"]
        self.assertEqual((p["display_name"], p["email"], p["preferences"]), ("Zoë", "zoe@example.org", prefs))
        self.assertEqual(p["created_at"], empty.json["profile"]["created_at"])
        self.assertEqual(got.json, {"profile": updated.json["profile"]})

        # Omitted fields stay; null clears the name; "" clears the email.
        cleared = await rest.post("/api/user/profile", {"display_name": None, "email": ""})
        p = cleared.json["profile"]
        self.assertEqual((p["display_name"], p["email"], p["preferences"]), (None, None, prefs))

        done = await rest.post("/api/user/profile/onboarding-complete")
        self.assertEqual((done.status, done.json), (200, {"success": True}))
        self.assertIs((await rest.get("/api/user/profile")).json["profile"]["onboarding_completed"], True)
        v1 = await rest.get("/api/v1/user/profile")
        self.assertEqual(v1.status, 200)

    async def test_profile_validation(self) -> None:
        """Each field rule of the profile update is enforced with 400 VALIDATION_ERROR naming the field; nothing is changed."""
        server = await self.start()
        _, rest = await self.device(server)
        self.assertEqual((await rest.post("/api/user/profile", {"display_name": "x" * 100})).status, 200)
        self.assertValidation(await rest.post("/api/user/profile", {"display_name": "x" * 101}), "display_name")
        self.assertValidation(await rest.post("/api/user/profile", {"display_name": 5}), "display_name")
        for bad in ("no-at-sign", "a@b", "a b@c.d", "@b.c", 7, ("a" * 245) + "@example.org"):
            self.assertValidation(await rest.post("/api/user/profile", {"email": bad}), "email")
        ok_email = ("a" * 242) + "@example.org"
        self.assertEqual(len(ok_email), 254)
        self.assertEqual((await rest.post("/api/user/profile", {"email": ok_email})).status, 200)
        for bad in ([], "x", None, 1):
            self.assertValidation(await rest.post("/api/user/profile", {"preferences": bad}), "preferences")
        filler = 4096 - len('{"k":""}')
        self.assertEqual((await rest.post("/api/user/profile", {"preferences": {"k": "x" * filler}})).status, 200)
        self.assertValidation(await rest.post("/api/user/profile", {"preferences": {"k": "x" * (filler + 1)}}),
                              "preferences")
        self.assertValidation(await rest.post("/api/user/profile", raw_body=b"[1]"), "body")
        bad_json = await rest.post("/api/user/profile", raw_body=b'{"display_name": "\\ud800"}')
        self.assertEqual((bad_json.status, bad_json.json["code"]), (400, "BAD_JSON"))
        p = (await rest.get("/api/user/profile")).json["profile"]
        self.assertEqual((p["display_name"], p["email"], p["preferences"]), ("x" * 100, ok_email, {"k": "x" * filler}))

    async def test_signed_requests_ignore_body_signature(self) -> None:
        """Under PB-Ed25519 a bogus signature/timestamp in the body is ignored."""
        server = await self.start()
        _, rest = await self.device(server)
        r = await rest.post("/api/user/profile", {"display_name": "A", "signature": "zz", "timestamp": "old"})
        self.assertEqual((r.status, r.json["profile"]["display_name"]), (200, "A"))

    async def test_legacy_profile_needs_body_signature(self) -> None:
        """With X-User-ID a correct v1 body signature is accepted once; missing → 401 AUTH_REQUIRED; wrong, stale or replayed → 401 AUTH_INVALID."""
        server = await self.start(args=["--legacy-clients"])
        identity = Identity.generate()
        client, headers = self.legacy(server, identity)
        fields = {"display_name": "Ann \"A\" Ö", "preferences": {"z": 1e21, "a": [0.1, None]}, "email": None}

        missing = await client.post("/api/user/profile", fields, headers=headers)
        self.assertEqual((missing.status, missing.json["code"]), (401, "AUTH_REQUIRED"))
        self.assertEqual((await client.get("/api/user/profile", headers=headers)).status, 404)

        wrong_key = v1_signed(Identity.generate(), fields)
        r = await client.post("/api/user/profile", wrong_key, headers=headers)
        self.assertEqual((r.status, r.json["code"]), (401, "AUTH_INVALID"))
        tampered = dict(v1_signed(identity, fields), display_name="Mallory")
        r = await client.post("/api/user/profile", tampered, headers=headers)
        self.assertEqual((r.status, r.json["code"]), (401, "AUTH_INVALID"))
        # Members re-ordered after signing: X no longer matches.
        signed = v1_signed(identity, fields)
        reordered = {k: signed[k] for k in ("email", "display_name", "preferences", "signature", "timestamp")}
        r = await client.post("/api/user/profile", reordered, headers=headers)
        self.assertEqual((r.status, r.json["code"]), (401, "AUTH_INVALID"))
        stale = await client.post("/api/user/profile", v1_signed(identity, fields, ts=now_ms() - 6 * 60_000), headers=headers)
        self.assertEqual((stale.status, stale.json["code"]), (401, "AUTH_INVALID"))
        future = await client.post("/api/user/profile", v1_signed(identity, fields, ts=now_ms() + 60_000), headers=headers)
        self.assertEqual((future.status, future.json["code"]), (401, "AUTH_INVALID"))
        self.assertValidation(await client.post("/api/user/profile", dict(signed, timestamp=1.5), headers=headers), "timestamp")
        self.assertValidation(await client.post("/api/user/profile", dict(signed, signature="ab"), headers=headers), "signature")
        self.assertEqual((await client.get("/api/user/profile", headers=headers)).status, 404)

        ok = await client.post("/api/user/profile", signed, headers=headers)
        self.assertEqual(ok.status, 200, ok)
        self.assertEqual(ok.json["profile"]["display_name"], fields["display_name"])
        self.assertEqual(ok.json["profile"]["preferences"], fields["preferences"])
        replay = await client.post("/api/user/profile", signed, headers=headers)
        self.assertEqual((replay.status, replay.json["code"]), (401, "AUTH_INVALID"))

        # Onboarding: X is the literal "onboarding_complete".
        no_sig = await client.post("/api/user/profile/onboarding-complete", {}, headers=headers)
        self.assertEqual(no_sig.status, 401)
        wrong_subject = v1_signed(identity, {}, subject="{}")
        self.assertEqual((await client.post("/api/user/profile/onboarding-complete", wrong_subject, headers=headers)).status, 401)
        done = await client.post("/api/user/profile/onboarding-complete",
                                 v1_signed(identity, {}, subject="onboarding_complete"), headers=headers)
        self.assertEqual((done.status, done.json), (200, {"success": True}))
        got = await client.get("/api/user/profile", headers=headers)
        self.assertIs(got.json["profile"]["onboarding_completed"], True)

    async def test_legacy_profile_refused_without_flag(self) -> None:
        """Without --legacy-clients the profile routes answer X-User-ID with 401 AUTH_REQUIRED."""
        server = await self.start()
        identity = Identity.generate()
        client, headers = self.legacy(server, identity)
        r = await client.get("/api/user/profile", headers=headers)
        self.assertEqual((r.status, r.json["code"]), (401, "AUTH_REQUIRED"))
        r = await client.post("/api/user/profile", v1_signed(identity, {}), headers=headers)
        self.assertEqual((r.status, r.json["code"]), (401, "AUTH_REQUIRED"))

    # ------------------------------------------------------------ deletion

    async def test_delete_account(self) -> None:
        """DELETE /api/user removes devices, events, profile and pairing records, closes every socket 4003, and the key starts afresh."""
        server = await self.start(args=["--legacy-clients"])
        identity = Identity.generate()
        a, rest = await self.device(server, identity)
        b, _ = await self.device(server, identity)
        for i in range(3):
            await a.send_event(stream_id="clipboard:main", type="clipboard:text", encrypted_payload=b64(16))
        await b.send_event(stream_id="clipboard:main", type="clipboard:text", encrypted_payload=b64(16))
        for _ in range(3):
            await b.next_event(TIMEOUT)  # received and acked: b's delivery cursor moves past them
        self.assertEqual((await rest.post("/api/user/profile", {"display_name": "Gone"})).status, 200)
        code = "{:06d}".format(int.from_bytes(os.urandom(4), "big") % 1_000_000)
        self.assertEqual((await rest.post("/api/pairing/store", {"code": code, "data": {"k": 1}})).status, 200)

        # Legacy header auth may not delete an account.
        legacy = await RestClient(reactor, server.http_url).delete("/api/user", headers={"X-User-ID": identity.user_id})
        self.assertEqual((legacy.status, legacy.json["code"]), (401, "AUTH_REQUIRED"))

        deleted = await rest.delete("/api/user")
        self.assertEqual((deleted.status, deleted.json), (200, {"success": True, "deleted": {"devices": 2, "events": 4}}))
        for client in (a, b):
            code_reason = await client.closed
            self.assertEqual(code_reason[0], 4003)
        # The signing device is gone, so the same request cannot be made again.
        again = await rest.delete("/api/user")
        self.assertEqual(again.status, 401)
        lookup = await RestClient(reactor, server.http_url).get("/api/pairing/lookup/" + code)
        self.assertEqual(lookup.status, 404)

        # The same key (and even the same device id) starts a new, empty account.
        fresh = Client(reactor, server.ws_url, identity, device_id=a.device_id)
        self.addCleanup(fresh.close)
        est = await fresh.connect()
        self.assertEqual(est["last_ack_device_seq"], 0)
        rest2 = RestClient(reactor, server.http_url, identity, fresh.device_id)
        page = await rest2.get("/api/events")
        self.assertEqual((page.status, page.json), (200, {"events": [], "next_after_seq": 0, "has_more": False}))
        self.assertEqual((await rest2.get("/api/user/profile")).status, 404)
        fresh_b = Client(reactor, server.ws_url, identity, device_id=b.device_id)
        self.addCleanup(fresh_b.close)
        self.assertEqual((await fresh_b.connect())["last_ack_device_seq"], 0)
        ack = await fresh.send_event(stream_id="clipboard:main", type="clipboard:text", encrypted_payload=b64(8))
        self.assertEqual((ack["seq"], ack["stream_seq"]), (1, 1))
        relayed = await fresh_b.next_event(TIMEOUT)
        self.assertEqual((relayed["seq"], relayed["event_id"]), (1, ack["event_id"]))

    async def test_writer_refuses_events_after_deletion(self) -> None:
        """A socket that keeps sending right after the deletion is closed 4003 and nothing it sent survives."""
        server = await self.start()
        identity = Identity.generate()
        a, rest = await self.device(server, identity)
        pending = [a.send_event(stream_id="s", type="t", encrypted_payload=b64(8)) for _ in range(20)]
        deleted = await rest.delete("/api/user")
        self.assertEqual(deleted.status, 200)
        for d in pending:
            d.addErrback(lambda f: f.trap(ConnectionClosed))
        self.assertEqual((await a.closed)[0], 4003)
        fresh, rest2 = await self.device(server, identity)
        page = await rest2.get("/api/events")
        self.assertEqual(page.json["events"], [])

    # ------------------------------------------------------------ events over HTTP

    async def test_events_paging(self) -> None:
        """Pages follow seq order with next_after_seq/has_more, include the caller's own events, and validate their arguments."""
        server = await self.start()
        identity = Identity.generate()
        a, rest = await self.device(server, identity)
        b, _ = await self.device(server, identity)
        sent: List[Dict[str, Any]] = []
        for i in range(7):
            sender = a if i % 2 == 0 else b
            payload = b64(12)
            ttl = now_ms() + 3_600_000 if i == 3 else None
            ack = await sender.send_event(stream_id="clipboard:main", type="clipboard:text", encrypted_payload=payload,
                                          ttl=ttl)
            sent.append({"seq": ack["seq"], "device_id": sender.device_id, "payload": payload, "ttl": ttl,
                         "event_id": ack["event_id"]})

        seen: List[Dict[str, Any]] = []
        after = 0
        pages = []
        while True:
            r = await rest.get("/api/events?after_seq={}&limit=3".format(after))
            self.assertEqual(r.status, 200, r)
            pages.append([e["seq"] for e in r.json["events"]])
            seen.extend(r.json["events"])
            if r.json["events"]:
                self.assertEqual(r.json["next_after_seq"], r.json["events"][-1]["seq"])
            after = r.json["next_after_seq"]
            if not r.json["has_more"]:
                break
        self.assertEqual(pages, [[1, 2, 3], [4, 5, 6], [7]])
        for want, got in zip(sent, seen):
            self.assertEqual(set(got), RELAY_FIELDS | ({"ttl"} if want["ttl"] else set()))
            self.assertEqual((got["seq"], got["device_id"], got["encrypted_payload"], got["event_id"], got["user_id"]),
                             (want["seq"], want["device_id"], want["payload"], want["event_id"], identity.user_id))
        end = await rest.get("/api/events?after_seq=7")
        self.assertEqual(end.json, {"events": [], "next_after_seq": 7, "has_more": False})
        default = await rest.get("/api/events")
        self.assertEqual(([e["seq"] for e in default.json["events"]], default.json["has_more"]), (list(range(1, 8)), False))
        clamped = await rest.get("/api/events?limit=0")
        self.assertEqual([e["seq"] for e in clamped.json["events"]], [1])
        big = await rest.get("/api/events?limit=5000&after_seq=2")
        self.assertEqual([e["seq"] for e in big.json["events"]], [3, 4, 5, 6, 7])
        for bad in ("after_seq=-1", "after_seq=abc", "after_seq=1.5", "limit=x"):
            r = await rest.get("/api/events?" + bad)
            self.assertEqual((r.status, r.json["code"]), (400, "VALIDATION_ERROR"), bad)
        other = await self.device(server)
        self.assertEqual((await other[1].get("/api/events")).json["events"], [], "another user's events leaked")

    async def test_events_skip_expired(self) -> None:
        """Events whose ttl has passed are not returned, and do not make has_more true."""
        server = await self.start()
        a, rest = await self.device(server)
        ttl = now_ms() + 3000
        await a.send_event(stream_id="s", type="t", encrypted_payload=b64(8))
        await a.send_event(stream_id="s", type="t", encrypted_payload=b64(8), ttl=ttl)
        await a.send_event(stream_id="s", type="t", encrypted_payload=b64(8))
        await a.send_event(stream_id="s", type="t", encrypted_payload=b64(8), ttl=ttl)
        before = await rest.get("/api/events")
        self.assertLess(now_ms(), ttl, "too slow to observe the events before they expire")
        self.assertEqual([e["seq"] for e in before.json["events"]], [1, 2, 3, 4])
        await sleep(max(0.0, (ttl - now_ms()) / 1000.0) + 0.2)
        r = await rest.get("/api/events?limit=1")
        self.assertEqual(([e["seq"] for e in r.json["events"]], r.json["has_more"]), ([1], True))
        r = await rest.get("/api/events?after_seq=1&limit=1")
        self.assertEqual(([e["seq"] for e in r.json["events"]], r.json["has_more"]), ([3], False))

    async def test_events_page_stops_before_8_mib(self) -> None:
        """A page stops before 8 MiB of payload but always holds at least one event."""
        server = await self.start()
        a, rest = await self.device(server)
        mib = 1024 * 1024
        sizes = [9 * mib, 3 * mib, 3 * mib, 3 * mib]  # characters of base64
        for size in sizes:
            await a.send_event(stream_id="files:main", type="file:chunk", encrypted_payload="A" * size, timeout=60)
        pages = []
        after = 0
        while True:
            r = await rest.get("/api/events?after_seq={}".format(after))
            self.assertEqual(r.status, 200)
            pages.append([(e["seq"], len(e["encrypted_payload"])) for e in r.json["events"]])
            after = r.json["next_after_seq"]
            if not r.json["has_more"]:
                break
        self.assertEqual(pages, [[(1, 9 * mib)], [(2, 3 * mib), (3, 3 * mib)], [(4, 3 * mib)]])

    async def test_events_need_signed_auth(self) -> None:
        """GET /api/events refuses X-User-ID even with --legacy-clients."""
        server = await self.start(args=["--legacy-clients"])
        identity = Identity.generate()
        await self.device(server, identity)
        r = await RestClient(reactor, server.http_url).get("/api/events", headers={"X-User-ID": identity.user_id})
        self.assertEqual((r.status, r.json["code"]), (401, "AUTH_REQUIRED"))


class AccountSQLiteTests(AccountIntegration, SQLiteMixin, TestCase):
    """Account routes on SQLite."""


class AccountPostgresTests(AccountIntegration, PostgresMixin, TestCase):
    """Account routes on PostgreSQL."""
