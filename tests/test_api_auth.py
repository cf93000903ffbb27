"""
REST authentication (API.md §1): the PB-Ed25519 signing recipe and its
vector as unit tests, then every check of a signed request, the legacy
``X-User-ID`` header and the ``/api/v1`` alias against a real server (SQLite
and PostgreSQL), driven by the SDK's ``RestClient``.

Also the helpers the other REST test modules share (registering a device,
the admin key).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import TYPE_CHECKING, Dict, Optional, Tuple

from nacl.signing import SigningKey
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pocketbridge.server.api.auth import parse_authorization, signed_message
from pocketbridge.client import Client, Identity
from pocketbridge.client.rest import RestClient, RestResponse, authorization
from tests.class_servers import class_server
from tests.harness import PostgresMixin, ServerProcess, SQLiteMixin

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

#: An admin key of the minimum length (32 characters).
ADMIN_KEY = "test-admin-key-0123456789abcdefgh"
ADMIN_ENV = {"ADMIN_API_KEY": ADMIN_KEY}

# PROTOCOL.md §13 and API.md §1.1.
VECTOR_SEED = bytes([0x11]) * 32
VECTOR_USER = "d04ab232742bb4ab3a1368bd4615e4e6d0224ab71a016baf8520a332c9778737"
VECTOR_DEVICE = "0b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b"
VECTOR_PATH = "/api/devices/0b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b/rename"
VECTOR_BODY = b'{"device_name":"Laptop"}'
VECTOR_TS = "1771000000000"
VECTOR_HASH = "ed4dace921a2766b70f69ca19bbed9d2db950bb7c96a7f859cda84da6c2c8357"
VECTOR_SIG = (
    "fee54ce89586743de2c8ad46e349121a3d6e4aa5e9e39d5582328b7847dbc38e"
    "974fb4f66aa7d63fd7cc944d500dacde10b5d661c60e6e16d307ba3d8bd52d0e"
)

MINUTE_MS = 60 * 1000


def now_ms() -> int:
    """Wall-clock ms (the server runs on this host and reads the same clock)."""
    return int(time.time() * 1000)


async def register_device(server: ServerProcess, identity: Optional[Identity] = None,
                          device_id: Optional[str] = None) -> Tuple[Identity, str]:
    """A device made usable for REST by one WebSocket handshake (then closed)."""
    identity = identity or Identity.generate()
    client = Client(reactor, server.ws_url, identity, device_id=device_id or str(uuid.uuid4()))
    await client.connect()
    await client.close()
    return identity, client.device_id


async def signed_client(server: ServerProcess) -> RestClient:
    """A RestClient signing as a freshly registered device of a new user."""
    identity, device_id = await register_device(server)
    return RestClient(reactor, server.http_url, identity, device_id)


def admin_client(server: ServerProcess) -> RestClient:
    """A RestClient that sends nothing but what the caller puts in ``headers``."""
    return RestClient(reactor, server.http_url)


def admin_headers(key: str = ADMIN_KEY) -> Dict[str, str]:
    """The admin bearer header."""
    return {"Authorization": "Bearer " + key}


async def admin_post(server: ServerProcess, path: str) -> RestResponse:
    """POST an admin route with the right key."""
    return await admin_client(server).request("POST", path, headers=admin_headers())


# ---------------------------------------------------------------- unit tests


class SigningVectorTests(SynchronousTestCase):
    """The signed bytes and signature of API.md §1.1."""

    def test_vector_hash_and_signature(self) -> None:
        """The §1.1 vector: SHA-256 of the signed bytes and the Ed25519 signature match."""
        key = SigningKey(VECTOR_SEED)
        self.assertEqual(key.verify_key.encode().hex(), VECTOR_USER)
        message = signed_message("POST", VECTOR_PATH, VECTOR_TS, VECTOR_USER, VECTOR_DEVICE, VECTOR_BODY)
        self.assertEqual(hashlib.sha256(message).hexdigest(), VECTOR_HASH)
        self.assertEqual(key.sign(message).signature.hex(), VECTOR_SIG)

    def test_signed_bytes_layout(self) -> None:
        """The signature covers the prefix, method upper-cased, path, ts, user, device and the body hash, NUL-separated."""
        message = signed_message("post", "/p?q=1", "5", "u", "d", b"")
        self.assertEqual(message, b"\x00".join([
            b"pocketbridge/2 rest", b"POST", b"/p?q=1", b"5", b"u", b"d",
            hashlib.sha256(b"").hexdigest().encode("ascii"),
        ]))

    def test_sdk_header_verifies_with_the_vector(self) -> None:
        """The SDK's Authorization header for the vector request carries the vector signature."""
        identity = Identity(SigningKey(VECTOR_SEED))
        header = authorization(identity, VECTOR_DEVICE, "POST", VECTOR_PATH, VECTOR_BODY, int(VECTOR_TS))
        self.assertEqual(header, "PB-Ed25519 user={}, device={}, ts={}, sig={}".format(
            VECTOR_USER, VECTOR_DEVICE, VECTOR_TS, VECTOR_SIG))


def _header(*parts: str) -> str:
    return "PB-Ed25519 " + ",".join(parts)


U = "user=" + VECTOR_USER
D = "device=" + VECTOR_DEVICE
T = "ts=" + VECTOR_TS
S = "sig=" + VECTOR_SIG


class ParseAuthorizationTests(SynchronousTestCase):
    """``parse_authorization`` accepts exactly the §1.1 grammar."""

    def test_parameters_in_any_order(self) -> None:
        """The four parameters are accepted in any order."""
        want = {"user": VECTOR_USER, "device": VECTOR_DEVICE, "ts": VECTOR_TS, "sig": VECTOR_SIG}
        self.assertEqual(parse_authorization(_header(U, D, T, S)), want)
        self.assertEqual(parse_authorization(_header(S, T, D, U)), want)
        self.assertEqual(parse_authorization(_header(D, S, U, T)), want)

    def test_optional_spaces_around_commas(self) -> None:
        """No space, one space or several spaces around the commas are all accepted."""
        for sep in (",", ", ", " , ", ",   "):
            value = "PB-Ed25519 " + sep.join([U, D, T, S])
            self.assertIsNotNone(parse_authorization(value), sep)

    def test_duplicate_parameter_rejected(self) -> None:
        """A parameter given twice (even with the same value) makes the header invalid."""
        self.assertIsNone(parse_authorization(_header(U, D, T, S, T)))
        self.assertIsNone(parse_authorization(_header(U, U, D, T, S)))

    def test_missing_parameter_rejected(self) -> None:
        """Each of the four parameters is required."""
        for drop in range(4):
            parts = [U, D, T, S]
            del parts[drop]
            self.assertIsNone(parse_authorization(_header(*parts)), parts)

    def test_unknown_parameter_rejected(self) -> None:
        """A fifth, unknown parameter makes the header invalid."""
        self.assertIsNone(parse_authorization(_header(U, D, T, S, "nonce=1")))

    def test_ts_must_be_1_to_16_digits(self) -> None:
        """ts with a sign, a decimal point, letters, nothing or 17 digits is rejected."""
        for ts in ("-1", "+1", "1.5", "12a", "0x10", "", "1" * 17, "１２"):
            self.assertIsNone(parse_authorization(_header(U, D, "ts=" + ts, S)), ts)
        self.assertIsNotNone(parse_authorization(_header(U, D, "ts=" + "9" * 16, S)))

    def test_quoted_values_rejected(self) -> None:
        """Values are unquoted."""
        self.assertIsNone(parse_authorization(_header(U, D, 'ts="{}"'.format(VECTOR_TS), S)))

    def test_malformed_values_rejected(self) -> None:
        """user must be hex64, device a UUID and sig hex128."""
        self.assertIsNone(parse_authorization(_header("user=" + VECTOR_USER[:-1], D, T, S)))
        self.assertIsNone(parse_authorization(_header(U, "device=laptop", T, S)))
        self.assertIsNone(parse_authorization(_header(U, D, T, "sig=" + VECTOR_SIG[:-2])))

    def test_other_schemes_rejected(self) -> None:
        """Another scheme name, or none, is not a PB-Ed25519 header."""
        body = ", ".join([U, D, T, S])
        for scheme in ("Bearer ", "pb-ed25519 ", "PB-Ed25519", ""):
            self.assertIsNone(parse_authorization(scheme + body), scheme)


# ---------------------------------------------------------------- against a server


class SignedRequestTests(_Base):
    """PB-Ed25519 checks of API.md §1.1 on a real server."""

    async def server(self) -> ServerProcess:
        """A server with the admin key set."""
        return await class_server(self, env=ADMIN_ENV)

    def assertAuthInvalid(self, response: RestResponse) -> None:
        """The §2 error of a failed PB-Ed25519 check."""
        self.assertEqual((response.status, response.json["code"]), (401, "AUTH_INVALID"), response)
        self.assertEqual(set(response.json), {"error", "code"})

    async def test_valid_signed_request(self) -> None:
        """A correctly signed request of a registered device gets 200 and is answered for that user."""
        server = await self.server()
        rest = await signed_client(server)
        response = await rest.get("/api/devices")
        self.assertEqual(response.status, 200, response)
        self.assertEqual(response.json["user_id"], rest.identity.user_id)

    async def test_forged_signature(self) -> None:
        """A signature made with another key is refused 401 AUTH_INVALID."""
        server = await self.server()
        rest = await signed_client(server)
        forger = Identity.generate()
        message = signed_message("GET", "/api/devices", str(now_ms()), rest.identity.user_id, rest.device_id, b"")
        sig = forger.signing_key.sign(message).signature.hex()
        header = "PB-Ed25519 user={}, device={}, ts={}, sig={}".format(
            rest.identity.user_id, rest.device_id, message.split(b"\x00")[3].decode(), sig)
        self.assertAuthInvalid(await rest.get("/api/devices", sign=False, headers={"Authorization": header}))

    async def test_ts_six_minutes_old(self) -> None:
        """A request signed 6 minutes ago is refused."""
        server = await self.server()
        rest = await signed_client(server)
        self.assertAuthInvalid(await rest.get("/api/devices", ts_ms=now_ms() - 6 * MINUTE_MS))

    async def test_ts_six_minutes_ahead(self) -> None:
        """A request dated 6 minutes in the future is refused."""
        server = await self.server()
        rest = await signed_client(server)
        self.assertAuthInvalid(await rest.get("/api/devices", ts_ms=now_ms() + 6 * MINUTE_MS))

    async def test_ts_four_minutes_off_accepted(self) -> None:
        """Clocks 4 minutes apart, either way, are within the window."""
        server = await self.server()
        rest = await signed_client(server)
        self.assertEqual((await rest.get("/api/devices", ts_ms=now_ms() - 4 * MINUTE_MS)).status, 200)
        self.assertEqual((await rest.get("/api/devices", ts_ms=now_ms() + 4 * MINUTE_MS)).status, 200)

    async def test_replayed_request(self) -> None:
        """The same signed request sent twice is accepted once; the replay gets 401."""
        server = await self.server()
        rest = await signed_client(server)
        ts = now_ms()
        first = await rest.get("/api/devices", ts_ms=ts)
        self.assertEqual(first.status, 200, first)
        self.assertAuthInvalid(await rest.get("/api/devices", ts_ms=ts))
        # Re-signed with a new ts, the same request is fine.
        self.assertEqual((await rest.get("/api/devices", ts_ms=ts + 1)).status, 200)

    async def test_signature_over_another_path(self) -> None:
        """A signature made for one path does not authorise another path or query string."""
        server = await self.server()
        rest = await signed_client(server)
        header = authorization(rest.identity, rest.device_id, "GET", "/api/presence", b"")
        self.assertAuthInvalid(await rest.get("/api/devices", sign=False, headers={"Authorization": header}))
        header = authorization(rest.identity, rest.device_id, "GET", "/api/devices", b"")
        self.assertAuthInvalid(await rest.get("/api/devices?include_revoked=1", sign=False,
                                              headers={"Authorization": header}))

    async def test_signature_over_another_method(self) -> None:
        """A signature made for GET does not authorise a DELETE of the same path."""
        server = await self.server()
        rest = await signed_client(server)
        path = "/api/devices/" + rest.device_id
        header = authorization(rest.identity, rest.device_id, "GET", path, b"")
        self.assertAuthInvalid(await rest.request("DELETE", path, sign=False, headers={"Authorization": header}))

    async def test_signature_over_another_body(self) -> None:
        """A signature over one body does not authorise another body."""
        server = await self.server()
        rest = await signed_client(server)
        path = "/api/devices/{}/rename".format(rest.device_id)
        header = authorization(rest.identity, rest.device_id, "POST", path, b'{"device_name":"Laptop"}')
        response = await rest.request("POST", path, raw_body=b'{"device_name":"Phone"}', sign=False,
                                      headers={"Authorization": header})
        self.assertAuthInvalid(response)

    async def test_other_users_device(self) -> None:
        """User B's valid signature naming user A's device id is refused: that pair is not registered."""
        server = await self.server()
        _, device_a = await register_device(server)
        user_b, _ = await register_device(server)
        rest = RestClient(reactor, server.http_url, user_b, device_a)
        self.assertAuthInvalid(await rest.get("/api/devices"))

    async def test_unregistered_device(self) -> None:
        """A device that never completed a handshake cannot use REST, even for a known user."""
        server = await self.server()
        identity, _ = await register_device(server)
        self.assertAuthInvalid(await RestClient(reactor, server.http_url, identity, str(uuid.uuid4())).get("/api/devices"))
        self.assertAuthInvalid(await RestClient(reactor, server.http_url, Identity.generate(),
                                                str(uuid.uuid4())).get("/api/devices"))

    async def test_revoked_device(self) -> None:
        """After an admin revocation the device's signed requests get 403 DEVICE_REVOKED."""
        server = await self.server()
        rest = await signed_client(server)
        revoked = await admin_post(server, "/admin/users/{}/devices/{}/revoke".format(rest.identity.user_id,
                                                                                     rest.device_id))
        self.assertEqual(revoked.status, 200, revoked)
        response = await rest.get("/api/devices")
        self.assertEqual((response.status, response.json["code"]), (403, "DEVICE_REVOKED"), response)

    async def test_v1_alias_authenticates_identically(self) -> None:
        """/api/v1/X answers as /api/X: 200 when signed (over the v1 path), 401 when not."""
        server = await self.server()
        rest = await signed_client(server)
        ok = await rest.get("/api/v1/devices")
        self.assertEqual(ok.status, 200, ok)
        self.assertEqual(ok.json["user_id"], rest.identity.user_id)
        # The signature covers the path as sent: one over /api/devices does not fit /api/v1/devices.
        header = authorization(rest.identity, rest.device_id, "GET", "/api/devices", b"")
        self.assertAuthInvalid(await rest.get("/api/v1/devices", sign=False, headers={"Authorization": header}))
        unsigned = await rest.get("/api/v1/devices", sign=False)
        self.assertEqual((unsigned.status, unsigned.json["code"]), (401, "AUTH_REQUIRED"))

    async def test_no_credentials(self) -> None:
        """A request without credentials gets 401 AUTH_REQUIRED."""
        server = await self.server()
        response = await RestClient(reactor, server.http_url).get("/api/devices")
        self.assertEqual((response.status, response.json["code"]), (401, "AUTH_REQUIRED"))


class LegacyHeaderTests(_Base):
    """``X-User-ID`` (API.md §1.2) is off by default and limited to the legacy routes."""

    async def test_x_user_id_refused_without_flag(self) -> None:
        """Without --legacy-clients, X-User-ID on a legacy route gets 401 AUTH_REQUIRED."""
        server = await class_server(self)
        identity, device_id = await register_device(server)
        response = await RestClient(reactor, server.http_url).get(
            "/api/devices", headers={"X-User-ID": identity.user_id, "X-Device-ID": device_id})
        self.assertEqual((response.status, response.json["code"]), (401, "AUTH_REQUIRED"), response)

    async def test_x_user_id_accepted_on_legacy_route_with_flag(self) -> None:
        """With --legacy-clients, X-User-ID authorises GET /api/devices for that user."""
        server = await class_server(self, args=["--legacy-clients"])
        identity, _ = await register_device(server)
        response = await RestClient(reactor, server.http_url).get("/api/devices",
                                                                 headers={"X-User-ID": identity.user_id})
        self.assertEqual(response.status, 200, response)
        self.assertEqual(response.json["user_id"], identity.user_id)

    async def test_x_user_id_refused_on_other_routes_with_flag(self) -> None:
        """With --legacy-clients, X-User-ID on a route outside the legacy table still gets 401 AUTH_REQUIRED."""
        server = await class_server(self, args=["--legacy-clients"])
        identity, device_id = await register_device(server)
        client = RestClient(reactor, server.http_url)
        for path in ("/api/events", "/api/presence", "/api/devices/" + device_id, "/api/connection-status"):
            response = await client.get(path, headers={"X-User-ID": identity.user_id})
            self.assertEqual((response.status, response.json["code"]), (401, "AUTH_REQUIRED"), path)

    async def test_signed_header_wins_over_x_user_id(self) -> None:
        """With PB-Ed25519 present X-User-ID is ignored: the signer is the caller, and a bad signature is not rescued."""
        server = await class_server(self, args=["--legacy-clients"])
        rest = await signed_client(server)
        other, _ = await register_device(server)
        response = await rest.get("/api/devices", headers={"X-User-ID": other.user_id})
        self.assertEqual(response.status, 200, response)
        self.assertEqual(response.json["user_id"], rest.identity.user_id)
        stale = await rest.get("/api/devices", ts_ms=now_ms() - 10 * MINUTE_MS, headers={"X-User-ID": other.user_id})
        self.assertEqual((stale.status, stale.json["code"]), (401, "AUTH_INVALID"), stale)


class SignedRequestTestsSQLite(SignedRequestTests, SQLiteMixin, TestCase):
    """Signed requests on SQLite."""


class SignedRequestTestsPostgres(SignedRequestTests, PostgresMixin, TestCase):
    """Signed requests on PostgreSQL."""


class LegacyHeaderTestsPostgres(LegacyHeaderTests, PostgresMixin, TestCase):
    """Legacy header auth on PostgreSQL."""
