"""
Integration tests of the devices routes (API.md §3 "Devices"): the device
list, one device, rename, revocation (signed and the legacy soft kind),
connection status and presence.

Every test starts a real ``twistd pocketbridge`` process (``tests.harness``),
registers devices with WebSocket handshakes of the SDK's ``Client`` and calls
the REST API with the SDK's signed ``RestClient``; each class runs once on
SQLite and once on PostgreSQL.

Presence changes when the server's side of a socket has closed, which can be
a moment after the client saw the close; tests wait for that with a watcher
device's ``device_status_changed`` notice, or poll with a deadline.
"""

from __future__ import annotations

import base64
import os
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from pocketbridge.client import Client, ConnectionClosed, Identity
from pocketbridge.client.rest import RestClient, RestResponse
from tests.class_servers import class_server
from tests.harness import (
    PostgresMixin,
    ServerProcess,
    SQLiteMixin,
    create_database,
    redis_url,
    require_postgres,
    require_redis,
    start_server,
)
from tests.redisctl import RedisAdmin

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

TIMEOUT = 10.0  # seconds any expected message or state may take
DEVICE_FIELDS = {"device_id", "device_name", "device_type", "is_online", "is_current", "last_seen",
                 "registered_at", "created_at"}


def now_ms() -> int:
    """Wall-clock ms (the server runs on this host and uses the same clock)."""
    return int(time.time() * 1000)


def sleep(seconds: float) -> Any:
    """A Deferred that fires after ``seconds`` of real time."""
    return deferLater(reactor, seconds, lambda: None)


def b64(n: int = 24) -> str:
    """A valid ``encrypted_payload``."""
    return base64.b64encode(os.urandom(n)).decode("ascii")


def close_code(client: Client, timeout: float = TIMEOUT) -> Any:
    """A Deferred of the code the client's socket closes with (fails after ``timeout`` s)."""
    d = client.closed
    d.addTimeout(timeout, reactor)
    return d.addCallback(lambda info: info[0])


def by_id(devices: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The device views of a listing, keyed by device_id."""
    return {d["device_id"]: d for d in devices}


def notices(client: Client, msg_type: str) -> List[Dict[str, Any]]:
    """The payloads of the ``msg_type`` messages the client received so far."""
    return [m["payload"] for m in client.messages if isinstance(m, dict) and m.get("type") == msg_type]


class _DeviceTestBase(_Base):
    """Helpers shared by the device test classes; mixed with a backend and TestCase."""

    backend: str
    server_args: Sequence[str] = ()
    # One server for the class's tests (tests.class_servers); a class whose
    # tests poll the REST API in loops sets False: they would share the
    # per-IP request budget.
    share_server = True

    async def start(self, args: Optional[Sequence[str]] = None) -> ServerProcess:
        """A healthy server on this class's backend (see ``share_server``)."""
        args = self.server_args if args is None else args
        if self.share_server:
            return await class_server(self, args=args)
        return await start_server(self, args=args)

    async def online(self, server: ServerProcess, identity: Identity, **kwargs: Any) -> Client:
        """A connected (registered) device of ``identity``, closed after the test."""
        kwargs.setdefault("device_id", str(uuid.uuid4()))
        client = Client(reactor, server.ws_url, identity, **kwargs)
        self.addCleanup(client.close)
        await client.connect()
        return client

    async def registered(self, server: ServerProcess, identity: Identity, **kwargs: Any) -> Client:
        """A device that registered with one handshake and is offline again (also on the server's side)."""
        client = await self.online(server, identity, **kwargs)
        await client.close()
        rc = self.rest(server, client)

        async def offline() -> bool:
            resp = await rc.get("/api/connection-status?deviceId=" + client.device_id)
            return resp.status == 200 and resp.json["connected"] is False

        await self.until(offline, "the server to see the socket closed")
        return client

    def rest(self, server: ServerProcess, client: Client) -> RestClient:
        """A REST client signing as ``client``'s device."""
        return RestClient(reactor, server.http_url, client.identity, client.device_id)

    def legacy(self, server: ServerProcess) -> RestClient:
        """An unsigned REST client (legacy callers add X-User-ID themselves)."""
        return RestClient(reactor, server.http_url)

    async def until(self, check: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
        """Poll the async ``check`` until it returns something true; fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            result = await check()
            if result:
                return result
            if time.monotonic() > deadline:
                self.fail("timed out waiting for " + what)
            await sleep(0.05)

    async def wait_status(self, watcher: Client, device_id: str, online: bool) -> Dict[str, Any]:
        """The ``device_status_changed`` of ``device_id`` with ``is_online`` = online that ``watcher`` gets."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            for p in notices(watcher, "device_status_changed"):
                if p.get("device_id") == device_id and p.get("is_online") is online:
                    return p
            left = deadline - time.monotonic()
            if left <= 0:
                self.fail("no device_status_changed {} for {}".format(online, device_id))
            try:
                await watcher.wait_for("device_status_changed", timeout=left, since=None)
            except Exception:
                pass

    async def listing(self, rc: RestClient, query: str = "") -> Dict[str, Any]:
        """GET /api/devices (200 expected)."""
        resp = await rc.get("/api/devices" + query)
        self.assertEqual(resp.status, 200, resp)
        body: Dict[str, Any] = resp.json
        return body

    def assertError(self, resp: RestResponse, status: int, code: str, field: Optional[str] = None) -> None:
        """``resp`` is the JSON error ``code`` with ``status`` (and ``field``)."""
        self.assertEqual(resp.status, status, resp)
        self.assertEqual(resp.json.get("code"), code, resp)
        self.assertIsInstance(resp.json.get("error"), str)
        if field is not None:
            self.assertEqual(resp.json.get("field"), field, resp)

    async def assert_refused_4003(self, server: ServerProcess, identity: Identity, device_id: str) -> None:
        """A new handshake of the device is closed with 4003."""
        client = Client(reactor, server.ws_url, identity, device_id=device_id)
        self.addCleanup(client.close)
        try:
            await client.connect()
        except ConnectionClosed as e:
            self.assertEqual(e.code, 4003, e)
        else:
            self.fail("the handshake of a revoked device succeeded")


class DeviceReadTests(_DeviceTestBase):
    """Listing and reading devices."""

    async def test_list_fields_current_online_and_order(self) -> None:
        """The list holds the user's devices with every field, is_current for the signer, online ones first, then by last_seen descending."""
        server = await self.start()
        user = Identity.generate()
        t0 = now_ms()
        old = await self.registered(server, user, device_name="Old Phone", device_type="mobile")
        await sleep(0.05)
        newer = await self.registered(server, user, device_type="tablet")  # no name
        await sleep(0.05)
        signer = await self.online(server, user, device_name="Laptop", device_type="desktop")
        other = await self.online(server, user, device_name="Desk", device_type="weird-type")
        t1 = now_ms()
        stranger = await self.online(server, Identity.generate())
        body = await self.listing(self.rest(server, signer))
        t2 = now_ms()

        self.assertEqual(body["user_id"], user.user_id)
        self.assertEqual(body["count"], 4)
        self.assertIs(body["is_empty"], False)
        devices = body["devices"]
        self.assertEqual(len(devices), 4)
        self.assertNotIn(stranger.device_id, by_id(devices))
        for d in devices:
            self.assertEqual(set(d), DEVICE_FIELDS, d)
            self.assertEqual(d["registered_at"], d["created_at"])
            self.assertTrue(t0 <= d["created_at"] <= t1, d)
        # Online first (both "seen now"), then the offline ones, most recently seen first.
        self.assertEqual({d["device_id"] for d in devices[:2]}, {signer.device_id, other.device_id})
        self.assertEqual([d["device_id"] for d in devices[2:]], [newer.device_id, old.device_id])
        self.assertEqual([d["is_online"] for d in devices], [True, True, False, False])
        self.assertEqual([d["device_id"] for d in devices if d["is_current"]], [signer.device_id])
        last_seen = [d["last_seen"] for d in devices]
        self.assertEqual(last_seen[2:], sorted(last_seen[2:], reverse=True))
        self.assertTrue(all(t1 <= s <= t2 for s in last_seen[:2]), last_seen)
        views = by_id(devices)
        self.assertEqual((views[old.device_id]["device_name"], views[old.device_id]["device_type"]),
                         ("Old Phone", "mobile"))
        self.assertEqual((views[newer.device_id]["device_name"], views[newer.device_id]["device_type"]),
                         (None, "tablet"))
        self.assertEqual(views[other.device_id]["device_type"], "unknown")

        # The same answer at /api/v1; and a device that goes offline moves behind the online one.
        await other.close()

        async def other_offline() -> Any:
            views = (await self.listing(self.rest(server, signer), "")).get("devices")
            return views if views[1]["device_id"] == other.device_id and not views[1]["is_online"] else None

        devices = await self.until(other_offline, "the closed device to be listed offline")
        self.assertEqual([d["device_id"] for d in devices], [signer.device_id, other.device_id, newer.device_id, old.device_id])
        v1 = await self.rest(server, signer).get("/api/v1/devices")
        self.assertEqual(v1.status, 200)
        self.assertEqual([d["device_id"] for d in v1.json["devices"]], [d["device_id"] for d in devices])

    async def test_include_revoked_lists_tombstones(self) -> None:
        """A revoked device is left out of the list and GET one, unless include_revoked=1, which shows it with revoked_at."""
        server = await self.start()
        user = Identity.generate()
        signer = await self.online(server, user)
        victim = await self.registered(server, user, device_name="Gone")
        rc = self.rest(server, signer)
        t0 = now_ms()
        self.assertEqual((await rc.delete("/api/devices/" + victim.device_id)).status, 200)
        t1 = now_ms()

        plain = await self.listing(rc)
        self.assertEqual([d["device_id"] for d in plain["devices"]], [signer.device_id])
        self.assertEqual(plain["count"], 1)
        self.assertNotIn("revoked_at", plain["devices"][0])

        full = await self.listing(rc, "?include_revoked=1")
        self.assertEqual(full["count"], 2)
        views = by_id(full["devices"])
        self.assertIsNone(views[signer.device_id]["revoked_at"])
        self.assertTrue(t0 <= views[victim.device_id]["revoked_at"] <= t1, views[victim.device_id])
        self.assertIs(views[victim.device_id]["is_online"], False)
        self.assertEqual(views[victim.device_id]["device_name"], "Gone")

        self.assertError(await rc.get("/api/devices/" + victim.device_id), 404, "NOT_FOUND")
        one = await rc.get("/api/devices/" + victim.device_id + "?include_revoked=1")
        self.assertEqual(one.status, 200, one)
        self.assertEqual(one.json["revoked_at"], views[victim.device_id]["revoked_at"])
        self.assertError(await rc.get("/api/devices?include_revoked=maybe"), 400, "VALIDATION_ERROR", "include_revoked")

    async def test_get_one_device(self) -> None:
        """GET /api/devices/{id} answers the same view as the list for the caller's devices, and 404 for unknown, malformed or other users' ids."""
        server = await self.start()
        user = Identity.generate()
        signer = await self.online(server, user, device_name="Mine")
        other = await self.registered(server, user, device_name="Other", device_type="web")
        stranger = await self.online(server, Identity.generate())
        rc = self.rest(server, signer)

        own = await rc.get("/api/devices/" + signer.device_id)
        self.assertEqual(own.status, 200, own)
        self.assertEqual(set(own.json), DEVICE_FIELDS)
        self.assertEqual((own.json["device_id"], own.json["is_current"], own.json["is_online"]),
                         (signer.device_id, True, True))
        two = await rc.get("/api/v1/devices/" + other.device_id.upper())
        self.assertEqual(two.status, 200, two)
        listed = by_id((await self.listing(rc))["devices"])[other.device_id]
        self.assertEqual(two.json, listed)
        self.assertEqual((two.json["device_name"], two.json["device_type"], two.json["is_current"],
                          two.json["is_online"]), ("Other", "web", False, False))

        self.assertError(await rc.get("/api/devices/" + str(uuid.uuid4())), 404, "NOT_FOUND")
        self.assertError(await rc.get("/api/devices/not-a-device"), 404, "NOT_FOUND")
        self.assertError(await rc.get("/api/devices/" + stranger.device_id), 404, "NOT_FOUND")


class RenameTests(_DeviceTestBase):
    """POST /api/devices/{id}/rename."""

    share_server = False

    async def test_rename_trims_and_accepts_unicode_letters_and_numbers(self) -> None:
        """A valid name is trimmed, stored and listed; letters and numbers of any script, spaces, '-' and '_' are allowed, 50 code points at most."""
        server = await self.start()
        user = Identity.generate()
        signer = await self.online(server, user, device_name="Old")
        other = await self.registered(server, user)
        rc = self.rest(server, signer)
        path = "/api/devices/" + other.device_id + "/rename"

        resp = await rc.post(path, {"device_name": "  Café Laptop-2_ü \t"})
        self.assertEqual(resp.status, 200, resp)
        self.assertEqual(resp.json, {"success": True, "device_id": other.device_id, "device_name": "Café Laptop-2_ü"})
        self.assertEqual(by_id((await self.listing(rc))["devices"])[other.device_id]["device_name"], "Café Laptop-2_ü")

        for name in ("東京 ٣ Ωmega", "x" * 50, "é" * 50):
            resp = await rc.post(path, {"device_name": name})
            self.assertEqual((resp.status, resp.json.get("device_name")), (200, name), resp)
        # Its own current name is not a conflict; neither is another case.
        own = "/api/devices/" + signer.device_id + "/rename"
        self.assertEqual((await rc.post(own, {"device_name": "Old"})).status, 200)
        self.assertEqual((await rc.post(path, {"device_name": "OLD"})).status, 200)
        view = (await rc.get("/api/devices/" + other.device_id)).json
        self.assertEqual(view["device_name"], "OLD")

    async def test_rename_conflict(self) -> None:
        """A name another non-revoked device of the user has exactly answers 409 CONFLICT and changes nothing; a revoked device's name or another user's is free."""
        server = await self.start()
        user = Identity.generate()
        signer = await self.online(server, user, device_name="Laptop")
        other = await self.registered(server, user, device_name="Phone")
        gone = await self.registered(server, user, device_name="Tablet")
        await self.online(server, Identity.generate(), device_name="Desktop")
        rc = self.rest(server, signer)
        path = "/api/devices/" + other.device_id + "/rename"

        self.assertError(await rc.post(path, {"device_name": "Laptop"}), 409, "CONFLICT")
        self.assertError(await rc.post(path, {"device_name": "  Laptop "}), 409, "CONFLICT")
        self.assertEqual(by_id((await self.listing(rc))["devices"])[other.device_id]["device_name"], "Phone")

        self.assertEqual((await rc.delete("/api/devices/" + gone.device_id)).status, 200)
        self.assertEqual((await rc.post(path, {"device_name": "Tablet"})).status, 200)
        self.assertEqual((await rc.post(path, {"device_name": "Desktop"})).status, 200)

    async def test_concurrent_renames_to_one_name(self) -> None:
        """Of concurrent renames of several devices to one name exactly one succeeds; the others answer 409 and keep their names."""
        server = await self.start()
        user = Identity.generate()
        signer = await self.online(server, user, device_name="Signer")
        others = [await self.registered(server, user, device_name="D{}".format(i)) for i in range(6)]
        rc = self.rest(server, signer)
        results = await gatherResults([
            Deferred.fromCoroutine(rc.post("/api/devices/" + d.device_id + "/rename", {"device_name": "Same"}))
            for d in others
        ], consumeErrors=True)
        self.assertEqual(sorted(r.status for r in results), [200] + [409] * 5, results)
        names = {d["device_id"]: d["device_name"] for d in (await self.listing(rc))["devices"]}
        winner = [d.device_id for d, r in zip(others, results) if r.status == 200][0]
        self.assertEqual(names, dict({signer.device_id: "Signer", winner: "Same"}, **{
            d.device_id: "D{}".format(i) for i, d in enumerate(others) if d.device_id != winner}))

    async def test_rename_validation(self) -> None:
        """An emoji, 51 code points, an empty or blank name, a non-string or a missing name answer 400 VALIDATION_ERROR on device_name; a non-object body on body."""
        server = await self.start()
        user = Identity.generate()
        signer = await self.online(server, user, device_name="Laptop")
        rc = self.rest(server, signer)
        path = "/api/devices/" + signer.device_id + "/rename"

        for bad in ({"device_name": "Laptop 💻"}, {"device_name": "x" * 51}, {"device_name": ""},
                    {"device_name": "   "}, {"device_name": 5}, {"device_name": None}, {},
                    {"device_name": "semi;colon"}, {"device_name": "tab\tinside"}, {"device_name": "dot.name"}):
            self.assertError(await rc.post(path, bad), 400, "VALIDATION_ERROR", "device_name")
        self.assertError(await rc.post(path, ["Laptop"]), 400, "VALIDATION_ERROR", "body")
        self.assertError(await rc.request("POST", path, raw_body=b"{nope"), 400, "BAD_JSON")
        self.assertEqual((await rc.get("/api/devices/" + signer.device_id)).json["device_name"], "Laptop")

    async def test_rename_unknown_revoked_or_foreign_device(self) -> None:
        """Renaming an unknown device, a revoked one or another user's answers 404 and renames nothing."""
        server = await self.start()
        user = Identity.generate()
        signer = await self.online(server, user)
        gone = await self.registered(server, user, device_name="Gone")
        stranger_id = Identity.generate()
        stranger = await self.online(server, stranger_id, device_name="Theirs")
        rc = self.rest(server, signer)
        self.assertEqual((await rc.delete("/api/devices/" + gone.device_id)).status, 200)

        for device_id in (str(uuid.uuid4()), gone.device_id, stranger.device_id, "nope"):
            self.assertError(await rc.post("/api/devices/" + device_id + "/rename", {"device_name": "Mine"}),
                             404, "NOT_FOUND")
        theirs = await self.rest(server, stranger).get("/api/devices/" + stranger.device_id)
        self.assertEqual(theirs.json["device_name"], "Theirs")
        full = by_id((await self.listing(rc, "?include_revoked=1"))["devices"])
        self.assertEqual(full[gone.device_id]["device_name"], "Gone")


class RevokeTests(_DeviceTestBase):
    """DELETE /api/devices/{id} with a signed request."""

    async def test_revoke_closes_live_socket_and_refuses_the_device(self) -> None:
        """Revocation sends device_revoked then closes the device's socket 4003 within 1 s, tells the others it went offline, and refuses its handshakes (4003) and signed requests (403)."""
        server = await self.start()
        user = Identity.generate()
        signer = await self.online(server, user)
        watcher = await self.online(server, user)
        victim = await self.online(server, user, device_name="Victim", device_type="mobile")
        victim_rest = self.rest(server, victim)
        self.assertEqual((await victim_rest.get("/api/devices")).status, 200)
        closed_at: List[float] = []
        closed = victim.closed
        closed.addTimeout(TIMEOUT, reactor)
        closed.addCallback(lambda info: (closed_at.append(time.monotonic()), info)[1])

        t0 = time.monotonic()
        resp = await self.rest(server, signer).delete("/api/devices/" + victim.device_id)
        self.assertEqual(resp.status, 200, resp)
        self.assertIs(resp.json["success"], True)
        self.assertIsInstance(resp.json["message"], str)
        code, _ = await closed
        self.assertEqual(code, 4003)
        self.assertLess(closed_at[0] - t0, 1.0, "the revoked socket took too long to close")
        types = [m.get("type") for m in victim.messages if isinstance(m, dict)]
        self.assertIn("device_revoked", types)
        revoked = notices(victim, "device_revoked")[0]
        self.assertEqual(revoked["device_id"], victim.device_id)
        self.assertIsInstance(revoked["reason"], str)
        self.assertIsInstance(revoked["timestamp"], int)

        offline = await self.wait_status(watcher, victim.device_id, False)
        self.assertEqual((offline["user_id"], offline["device_name"], offline["device_type"]),
                         (user.user_id, "Victim", "mobile"))
        self.assertEqual(notices(signer, "device_revoked"), [])
        self.assertEqual(notices(watcher, "device_revoked"), [])

        await self.assert_refused_4003(server, user, victim.device_id)
        self.assertError(await victim_rest.get("/api/devices"), 403, "DEVICE_REVOKED")
        # The other devices are untouched.
        self.assertEqual((await self.rest(server, watcher).get("/api/devices")).status, 200)
        again = await self.rest(server, signer).delete("/api/devices/" + victim.device_id)
        self.assertEqual(again.status, 200, again)
        self.assertIs(again.json["success"], True)

    async def test_revoked_device_events_stay_for_other_devices(self) -> None:
        """Events a device stored before its revocation are still caught up by a new device of the user."""
        server = await self.start()
        user = Identity.generate()
        signer = await self.online(server, user)
        victim = await self.online(server, user)
        acks = [await victim.send_event(stream_id="clipboard:main", type="clipboard:text", encrypted_payload=b64())
                for _ in range(3)]
        self.assertEqual((await self.rest(server, signer).delete("/api/devices/" + victim.device_id)).status, 200)
        self.assertEqual(await close_code(victim), 4003)

        fresh = await self.online(server, user)
        events = await fresh.catch_up(limit=100, timeout=TIMEOUT)
        self.assertEqual([(e["device_id"], e["seq"]) for e in events],
                         [(victim.device_id, a["seq"]) for a in acks])

    async def test_revoke_unknown_or_foreign_device_is_404(self) -> None:
        """Revoking an unknown id or another user's device answers 404 and leaves that device connected and usable."""
        server = await self.start()
        user = Identity.generate()
        signer = await self.online(server, user)
        stranger = await self.online(server, Identity.generate())
        rc = self.rest(server, signer)
        for device_id in (str(uuid.uuid4()), stranger.device_id, "not-a-uuid"):
            self.assertError(await rc.delete("/api/devices/" + device_id), 404, "NOT_FOUND")
        self.assertEqual((await self.rest(server, stranger).get("/api/devices")).status, 200)
        mark = len(stranger.messages)
        stranger.send_raw({"type": "ping", "payload": {}})
        await stranger.wait_for("pong", timeout=TIMEOUT, since=mark)
        self.assertIsNone(stranger.close_info)

    async def test_device_may_revoke_itself(self) -> None:
        """A device revoking itself gets 200, then its socket closes 4003 and its next signed request answers 403."""
        server = await self.start()
        user = Identity.generate()
        me = await self.online(server, user)
        rc = self.rest(server, me)
        resp = await rc.delete("/api/devices/" + me.device_id)
        self.assertEqual(resp.status, 200, resp)
        self.assertEqual(await close_code(me), 4003)
        self.assertError(await rc.get("/api/devices"), 403, "DEVICE_REVOKED")
        self.assertError(await rc.delete("/api/devices/" + me.device_id), 403, "DEVICE_REVOKED")


class LegacyDeviceTests(_DeviceTestBase):
    """The X-User-ID routes with --legacy-clients (API.md §1.2)."""

    server_args = ("--legacy-clients",)

    async def test_legacy_soft_revocation_lets_the_device_register_again(self) -> None:
        """A DELETE with X-User-ID closes the device's socket 4003 and removes it without a tombstone, so its next handshake registers it again."""
        server = await self.start()
        user = Identity.generate()
        watcher = await self.online(server, user)
        victim = await self.online(server, user, device_name="Browser", device_type="web")
        legacy = self.legacy(server)
        headers = {"X-User-ID": user.user_id}

        resp = await legacy.delete("/api/devices/" + victim.device_id, headers=headers)
        self.assertEqual(resp.status, 200, resp)
        self.assertIs(resp.json["success"], True)
        self.assertEqual(await close_code(victim), 4003)
        self.assertEqual(notices(victim, "device_revoked")[0]["device_id"], victim.device_id)
        await self.wait_status(watcher, victim.device_id, False)
        listed = await legacy.get("/api/devices?include_revoked=1", headers=headers)
        self.assertNotIn(victim.device_id, by_id(listed.json["devices"]))
        self.assertError(await legacy.delete("/api/devices/" + victim.device_id, headers=headers), 404, "NOT_FOUND")

        mark = len(watcher.messages)
        again = await self.online(server, user, device_id=victim.device_id, device_name="Browser 2")
        self.assertEqual(again.session["device_id"], victim.device_id)
        paired = await watcher.wait_for("device_paired", timeout=TIMEOUT, since=mark)
        self.assertEqual(paired["payload"]["device_id"], victim.device_id)
        view = by_id((await legacy.get("/api/devices", headers=headers)).json["devices"])[victim.device_id]
        self.assertEqual((view["device_name"], view["is_online"]), ("Browser 2", True))

    async def test_legacy_cannot_undo_a_signed_revocation(self) -> None:
        """A legacy DELETE of a device revoked by a signed request answers 200 but keeps the tombstone: the device is still refused 4003."""
        server = await self.start()
        user = Identity.generate()
        signer = await self.online(server, user)
        victim = await self.registered(server, user)
        self.assertEqual((await self.rest(server, signer).delete("/api/devices/" + victim.device_id)).status, 200)
        resp = await self.legacy(server).delete("/api/devices/" + victim.device_id, headers={"X-User-ID": user.user_id})
        self.assertEqual(resp.status, 200, resp)
        await self.assert_refused_4003(server, user, victim.device_id)

    async def test_legacy_list_and_rename(self) -> None:
        """With X-User-ID the list works (is_current from X-Device-ID, an unknown user's list is empty) and so does rename; GET one and presence still need a signature."""
        server = await self.start()
        user = Identity.generate()
        a = await self.online(server, user, device_name="A")
        b = await self.registered(server, user, device_name="B")
        legacy = self.legacy(server)
        headers = {"X-User-ID": user.user_id.upper()}

        body = (await legacy.get("/api/devices", headers=headers)).json
        self.assertEqual((body["user_id"], body["count"]), (user.user_id, 2))
        self.assertEqual([d["is_current"] for d in body["devices"]], [False, False])
        body = (await legacy.get("/api/devices", headers=dict(headers, **{"X-Device-ID": b.device_id.upper()}))).json
        self.assertEqual([d["device_id"] for d in body["devices"] if d["is_current"]], [b.device_id])

        empty = await legacy.get("/api/devices", headers={"X-User-ID": Identity.generate().user_id})
        self.assertEqual((empty.status, empty.json["devices"], empty.json["count"], empty.json["is_empty"]),
                         (200, [], 0, True))

        resp = await legacy.post("/api/devices/" + b.device_id + "/rename", {"device_name": "Renamed"}, headers=headers)
        self.assertEqual(resp.status, 200, resp)
        self.assertError(await legacy.post("/api/devices/" + b.device_id + "/rename", {"device_name": "A"},
                                           headers=headers), 409, "CONFLICT")
        self.assertEqual(by_id((await self.listing(self.rest(server, a)))["devices"])[b.device_id]["device_name"],
                         "Renamed")
        for path in ("/api/devices/" + b.device_id, "/api/presence", "/api/connection-status"):
            self.assertError(await legacy.get(path, headers=headers), 401, "AUTH_REQUIRED")


class NoLegacyTests(_DeviceTestBase):
    """Without --legacy-clients, X-User-ID is no credential."""

    async def test_x_user_id_without_flag_is_401(self) -> None:
        """Without --legacy-clients every devices route answers X-User-ID alone with 401 AUTH_REQUIRED and changes nothing."""
        server = await self.start()
        user = Identity.generate()
        device = await self.online(server, user, device_name="Kept")
        legacy = self.legacy(server)
        headers = {"X-User-ID": user.user_id, "X-Device-ID": device.device_id}
        for method, path, body in (
            ("GET", "/api/devices", None),
            ("POST", "/api/devices/" + device.device_id + "/rename", {"device_name": "Changed"}),
            ("DELETE", "/api/devices/" + device.device_id, None),
            ("GET", "/api/devices/" + device.device_id, None),
        ):
            self.assertError(await legacy.request(method, path, body, headers=headers), 401, "AUTH_REQUIRED")
        view = (await self.rest(server, device).get("/api/devices/" + device.device_id)).json
        self.assertEqual((view["device_name"], view["is_online"]), ("Kept", True))
        self.assertIsNone(device.close_info)


class LiveStatusTests(_DeviceTestBase):
    """GET /api/connection-status and GET /api/presence."""

    share_server = False

    async def test_connection_status_counts_sockets(self) -> None:
        """connection-status counts a device's sockets with connected_since = the earliest authentication, and reports it disconnected once they close."""
        server = await self.start()
        user = Identity.generate()
        signer = await self.registered(server, user)
        rc = self.rest(server, signer)
        device_id = str(uuid.uuid4())
        t0 = now_ms()
        first = await self.online(server, user, device_id=device_id)
        t1 = now_ms()
        await sleep(0.02)
        t2 = now_ms()
        second = await self.online(server, user, device_id=device_id)
        t3 = now_ms()

        resp = await rc.get("/api/connection-status?deviceId=" + device_id)
        self.assertEqual(resp.status, 200, resp)
        self.assertIs(resp.json["connected"], True)
        [entry] = resp.json["devices"]
        self.assertEqual((entry["device_id"], entry["connected"], entry["sockets"]), (device_id, True, 2))
        self.assertTrue(t0 <= entry["connected_since"] <= t1, (t0, entry, t1))

        everything = (await rc.get("/api/connection-status")).json
        self.assertIs(everything["connected"], True)
        self.assertEqual(by_id(everything["devices"]), {
            device_id: entry,
            signer.device_id: {"device_id": signer.device_id, "connected": False, "sockets": 0, "connected_since": None},
        })

        await first.close()

        async def one_left() -> Any:
            body = (await rc.get("/api/connection-status?deviceId=" + device_id)).json
            return body if body["devices"][0]["sockets"] == 1 else None

        entry = (await self.until(one_left, "one socket to remain"))["devices"][0]
        self.assertTrue(t2 <= entry["connected_since"] <= t3, (t2, entry, t3))
        await second.close()

        async def none_left() -> Any:
            body = (await rc.get("/api/connection-status?deviceId=" + device_id)).json
            return body if body["connected"] is False else None

        body = await self.until(none_left, "the device to be disconnected")
        self.assertEqual(body["devices"], [{"device_id": device_id, "connected": False, "sockets": 0,
                                            "connected_since": None}])
        self.assertIs((await rc.get("/api/connection-status")).json["connected"], False)

    async def test_connection_status_of_foreign_or_unknown_device_is_404(self) -> None:
        """connection-status for another user's device, an unknown or a revoked one answers 404."""
        server = await self.start()
        user = Identity.generate()
        signer = await self.online(server, user)
        gone = await self.registered(server, user)
        stranger = await self.online(server, Identity.generate())
        rc = self.rest(server, signer)
        self.assertEqual((await rc.delete("/api/devices/" + gone.device_id)).status, 200)
        for device_id in (stranger.device_id, str(uuid.uuid4()), gone.device_id, "x"):
            self.assertError(await rc.get("/api/connection-status?deviceId=" + device_id), 404, "NOT_FOUND")
        body = (await rc.get("/api/connection-status")).json
        self.assertEqual([d["device_id"] for d in body["devices"]], [signer.device_id])

    async def test_presence_counts(self) -> None:
        """presence lists the user's non-revoked devices with is_online and last_seen, and counts online and total devices."""
        server = await self.start()
        user = Identity.generate()
        signer = await self.online(server, user, device_name="One")
        watcher = await self.online(server, user, device_name="Two")
        leaving = await self.online(server, user, device_name="Three")
        gone = await self.registered(server, user, device_name="Four")
        offline = await self.registered(server, user, device_name="Five")
        await self.online(server, Identity.generate())
        rc = self.rest(server, signer)
        self.assertEqual((await rc.delete("/api/devices/" + gone.device_id)).status, 200)

        body = (await rc.get("/api/presence")).json
        self.assertEqual(body["user_id"], user.user_id)
        self.assertEqual((body["online_count"], body["total_count"]), (3, 4))
        for d in body["devices"]:
            self.assertEqual(set(d), {"device_id", "device_name", "is_online", "last_seen"})
        self.assertEqual({d["device_id"]: d["is_online"] for d in body["devices"]}, {
            signer.device_id: True, watcher.device_id: True, leaving.device_id: True, offline.device_id: False})
        self.assertEqual(by_id(body["devices"])[offline.device_id]["device_name"], "Five")

        t0 = now_ms()
        await leaving.close()
        await self.wait_status(watcher, leaving.device_id, False)
        body = (await rc.get("/api/presence")).json
        self.assertEqual((body["online_count"], body["total_count"]), (2, 4))
        self.assertIs(by_id(body["devices"])[leaving.device_id]["is_online"], False)

        # last_seen becomes the close time (written to storage just after the offline notice).
        async def closed_time() -> Any:
            body = (await rc.get("/api/presence")).json
            seen = by_id(body["devices"])[leaving.device_id]["last_seen"]
            return (body, seen) if seen >= t0 else None

        body, seen = await self.until(closed_time, "last_seen to become the close time")
        self.assertLessEqual(seen, now_ms())
        self.assertEqual([d["is_online"] for d in body["devices"]], [True, True, False, False])


class ClusterDeviceTests(_DeviceTestBase, TestCase):
    """The devices routes on two nodes sharing PostgreSQL and Redis."""

    backend = "postgresql"

    def setUp(self) -> None:
        require_postgres(self)
        require_redis(self)

    async def test_status_and_revocation_span_nodes(self) -> None:
        """A device with a socket on each node counts 2 sockets on either node; revoking it through one node closes both sockets 4003 within 1 s."""
        db = create_database(self)
        prefix = "pbtest:devices:{}:".format(secrets.token_hex(6))
        self.addCleanup(RedisAdmin(redis_url()).delete_prefix, prefix)
        args = ["--redis-prefix", prefix]
        a = await start_server(self, database_url=db.url, redis=True, args=args)
        b = await start_server(self, database_url=db.url, redis=True, args=args)
        user = Identity.generate()
        signer = await self.online(a, user)
        watcher = await self.online(b, user)
        device_id = str(uuid.uuid4())
        t0 = now_ms()
        on_a = await self.online(a, user, device_id=device_id)
        t1 = now_ms()
        on_b = await self.online(b, user, device_id=device_id)

        for node in (a, b):
            rc = RestClient(reactor, node.http_url, user, signer.device_id)
            status = (await rc.get("/api/connection-status?deviceId=" + device_id)).json
            self.assertEqual((status["connected"], status["devices"][0]["sockets"]), (True, 2), status)
            self.assertTrue(t0 <= status["devices"][0]["connected_since"] <= t1, status)
            listed = by_id((await rc.get("/api/devices")).json["devices"])
            self.assertEqual({k: v["is_online"] for k, v in listed.items()},
                             {signer.device_id: True, watcher.device_id: True, device_id: True})

        closes = [close_code(on_a, 1.0), close_code(on_b, 1.0)]
        resp = await self.rest(a, signer).delete("/api/devices/" + device_id)
        self.assertEqual(resp.status, 200, resp)
        self.assertEqual(await gatherResults(closes, consumeErrors=True), [4003, 4003])
        for client in (on_a, on_b):
            self.assertEqual(notices(client, "device_revoked")[0]["device_id"], device_id)
        await self.wait_status(watcher, device_id, False)
        await self.assert_refused_4003(b, user, device_id)
        presence = (await RestClient(reactor, b.http_url, user, watcher.device_id).get("/api/presence")).json
        self.assertEqual((presence["online_count"], presence["total_count"]), (2, 2))


# --------------------------------------------------------------------------
# Both backends


class DeviceReadTestsSQLite(DeviceReadTests, SQLiteMixin, TestCase):
    "DeviceReadTests on SQLite."


class DeviceReadTestsPostgres(DeviceReadTests, PostgresMixin, TestCase):
    "DeviceReadTests on PostgreSQL."


class RenameTestsSQLite(RenameTests, SQLiteMixin, TestCase):
    "RenameTests on SQLite."


class RenameTestsPostgres(RenameTests, PostgresMixin, TestCase):
    "RenameTests on PostgreSQL."


class RevokeTestsSQLite(RevokeTests, SQLiteMixin, TestCase):
    "RevokeTests on SQLite."


class RevokeTestsPostgres(RevokeTests, PostgresMixin, TestCase):
    "RevokeTests on PostgreSQL."


class LegacyDeviceTestsSQLite(LegacyDeviceTests, SQLiteMixin, TestCase):
    "LegacyDeviceTests on SQLite."


class LegacyDeviceTestsPostgres(LegacyDeviceTests, PostgresMixin, TestCase):
    "LegacyDeviceTests on PostgreSQL."


class NoLegacyTestsSQLite(NoLegacyTests, SQLiteMixin, TestCase):
    "NoLegacyTests on SQLite."


class NoLegacyTestsPostgres(NoLegacyTests, PostgresMixin, TestCase):
    "NoLegacyTests on PostgreSQL."


class LiveStatusTestsSQLite(LiveStatusTests, SQLiteMixin, TestCase):
    "LiveStatusTests on SQLite."


class LiveStatusTestsPostgres(LiveStatusTests, PostgresMixin, TestCase):
    "LiveStatusTests on PostgreSQL."
