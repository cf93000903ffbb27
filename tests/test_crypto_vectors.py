"""
The handshake cryptography against PROTOCOL.md §13, and ``ServerHandshake``
(§4, §5) driven with the vector inputs.

Every expected value below is copied from PROTOCOL.md §13; a client written
from the document alone must interoperate with the server, so a mismatch here
is a wire incompatibility, not a detail.
"""

from __future__ import annotations

from typing import Any, Dict

from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.protocol import crypto
from pocketbridge.server.gateway.handshake import ServerHandshake
from pocketbridge.protocol.wire import ProtocolError

# Inputs (§13).
CLIENT_SEED = b"\x11" * 32
SERVER_SEED = b"\x22" * 32
CLIENT_SCALAR = b"\x33" * 32
SERVER_SCALAR = b"\x44" * 32
NONCE_C = "aa" * 32
NONCE_S = "bb" * 32
DEVICE_ID = "0b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b"

# Outputs (§13).
USER_ID = "d04ab232742bb4ab3a1368bd4615e4e6d0224ab71a016baf8520a332c9778737"
SERVER_IDENTITY_PUB = "a09aa5f47a6759802ff955f8dc2d2a14a5c99d23be97f864127ff9383455a4f0"
CLIENT_EPHEMERAL_PUB = (
    "0451a7580833898ea1b183cbd7350a4099078c6ef1c1e18e970cd7683035f25e7d"
    "0110522712b0b5a7cff081685486984a94e6831edac46e7360fa9d834a7a81a1"
)
SERVER_EPHEMERAL_PUB = (
    "045b36890dacbd7c9a96bb74a1ee28b3d2d75b72e09a20ef25cf8e6fd8a9f0350d"
    "0e14bed8d4682a34d83538bdff5b96e89a6666ec0db5745d02fa1210072df75a"
)
ECDH_X = "5238f9f956812e75918895390fa057a2063aa66d4d5eefbe6ecdcf78342d2922"
V1_SERVER_DIGEST = "a068eebbe98ecedd0a9f483f64e04b803ee816bc64656388199dcbafe6cfb52e"
V1_SERVER_SIGNATURE = (
    "8d3f8c4305d4f3af18a805bc815110d3f87151e2bd7be2bc3a01a1a1cc45f365"
    "78f06891604e9bcb0d8c19d18f7f3328db928277b86c3b62c299cb7823b1a802"
)
V1_CLIENT_DIGEST = "074f3ff11869553fb59d5eae107810251a690023e5b4d88ace5e9c937ca86156"
V1_CLIENT_SIGNATURE = (
    "9773580cda4e5c2c4f9710be51babaeec9042628636517e5cf40ee3799d9f8c7"
    "40cce32f3fbb60a1a0fe2e4e137e451eb31c3faa1586adb3c98fd0947c6c9a0c"
)
V2_TH = "a3fb4aad4c0fb8a6969a1228f98c30efd17356174a4efb7148d22b0905d736fd"
V2_SERVER_SIGNATURE = (
    "eca2b172d05bdf4319b94d5a4acc669e008a379e6af12219b6c1073316716a5d"
    "4bcf882982b002a005735d670ca32187a6a08ec09991ea55d763281d405eeb06"
)
V2_CLIENT_SIGNATURE = (
    "8c051204b9c634fe3ee6ed0537c24d3e79f14e70bb6e13c4cb405f50998a9f18"
    "763bdab93fcb5e086ced3666ec3136827bdec4198125905806ed72d961ca2d01"
)
K_C2S = "5f26cdef4a8eb32f3403686005e41c32ed81312d8fa99716ee793fad39a06dd3"
K_S2C = "f39c51b441eb96a7e3060717050f53939d2135a170bc76437e391cb2729b845b"
FIRST_FRAME_PLAINTEXT = (
    b'{"type":"session_established","payload":{"device_id":"0b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b",'
    b'"last_ack_device_seq":0}}'
)
FIRST_FRAME = (
    "827cae7f775868d25d2c1b9bd5786a40eaad0af98c5f88f1d206375b71daa48f90ef132e9b39b0223976c32ed79aadaa"
    "7afcc06ab879d6b751afb316ccbb23a48d359ee9b96915538d01a8f2cbf2bdc82ec575a97f294afcc9521b9c5998627"
    "3173c5a46b4aace8f8a025f2faaa237746890544a41eb921b0d1b005aaecd4d255061482ab7"
)


def _th() -> bytes:
    return crypto.v2_transcript(
        bytes.fromhex(CLIENT_EPHEMERAL_PUB),
        bytes.fromhex(NONCE_C),
        bytes.fromhex(SERVER_EPHEMERAL_PUB),
        bytes.fromhex(NONCE_S),
        bytes.fromhex(SERVER_IDENTITY_PUB),
    )


class VectorTests(SynchronousTestCase):
    """The pure functions of ``pocketbridge.protocol.crypto`` reproduce every §13 value."""

    def test_user_id(self) -> None:
        """The client seed 11×32 gives the §13 user_id."""
        self.assertEqual(crypto.public_hex(crypto.signing_key_from_seed(CLIENT_SEED)), USER_ID)

    def test_server_identity_pub(self) -> None:
        """The server seed 22×32 gives the §13 server_identity_pub."""
        self.assertEqual(crypto.public_hex(crypto.signing_key_from_seed(SERVER_SEED)), SERVER_IDENTITY_PUB)

    def test_client_ephemeral_pub(self) -> None:
        """The client P-256 scalar 33×32 encodes to the §13 uncompressed point."""
        self.assertEqual(crypto.point_bytes(crypto.ephemeral_from_scalar(CLIENT_SCALAR)).hex(), CLIENT_EPHEMERAL_PUB)

    def test_server_ephemeral_pub(self) -> None:
        """The server P-256 scalar 44×32 encodes to the §13 uncompressed point."""
        self.assertEqual(crypto.point_bytes(crypto.ephemeral_from_scalar(SERVER_SCALAR)).hex(), SERVER_EPHEMERAL_PUB)

    def test_ecdh_x_both_sides(self) -> None:
        """Both sides of the exchange compute the §13 ECDH_X."""
        server = crypto.ecdh(
            crypto.ephemeral_from_scalar(SERVER_SCALAR), crypto.load_point(bytes.fromhex(CLIENT_EPHEMERAL_PUB))
        )
        client = crypto.ecdh(
            crypto.ephemeral_from_scalar(CLIENT_SCALAR), crypto.load_point(bytes.fromhex(SERVER_EPHEMERAL_PUB))
        )
        self.assertEqual((server.hex(), client.hex()), (ECDH_X, ECDH_X))

    def test_v1_server_digest(self) -> None:
        """The v1 server digest hashes the four hex strings as transmitted."""
        digest = crypto.v1_server_digest(SERVER_IDENTITY_PUB, SERVER_EPHEMERAL_PUB, NONCE_C, NONCE_S)
        self.assertEqual(digest.hex(), V1_SERVER_DIGEST)

    def test_v1_server_signature(self) -> None:
        """Signing the v1 server digest with the server key gives the §13 signature, which verifies."""
        key = crypto.signing_key_from_seed(SERVER_SEED)
        sig = key.sign(bytes.fromhex(V1_SERVER_DIGEST)).signature
        self.assertEqual(sig.hex(), V1_SERVER_SIGNATURE)
        self.assertTrue(
            crypto.verify_ed25519(bytes.fromhex(SERVER_IDENTITY_PUB), bytes.fromhex(V1_SERVER_DIGEST), sig)
        )

    def test_v1_client_digest(self) -> None:
        """The v1 client digest hashes user_id, device_id, nonces and server ephemeral as sent."""
        digest = crypto.v1_client_digest(USER_ID, DEVICE_ID, NONCE_C, NONCE_S, SERVER_EPHEMERAL_PUB)
        self.assertEqual(digest.hex(), V1_CLIENT_DIGEST)

    def test_v1_client_signature(self) -> None:
        """The user key signs the v1 client digest to the §13 signature, verified with user_id."""
        sig = crypto.signing_key_from_seed(CLIENT_SEED).sign(bytes.fromhex(V1_CLIENT_DIGEST)).signature
        self.assertEqual(sig.hex(), V1_CLIENT_SIGNATURE)
        self.assertTrue(crypto.verify_ed25519(bytes.fromhex(USER_ID), bytes.fromhex(V1_CLIENT_DIGEST), sig))

    def test_v2_transcript_hash(self) -> None:
        """The v2 transcript hash over the raw handshake bytes is the §13 TH."""
        self.assertEqual(_th().hex(), V2_TH)

    def test_v2_server_signature(self) -> None:
        """The server signs "pocketbridge/2 server_hello" ‖ TH to the §13 signature."""
        sig = crypto.signing_key_from_seed(SERVER_SEED).sign(crypto.v2_server_message(_th())).signature
        self.assertEqual(sig.hex(), V2_SERVER_SIGNATURE)

    def test_v2_client_signature(self) -> None:
        """The client signs "pocketbridge/2 client_auth" ‖ TH ‖ user_id ‖ device_id to the §13 signature."""
        msg = crypto.v2_client_message(_th(), bytes.fromhex(USER_ID), DEVICE_ID.encode("ascii"))
        sig = crypto.signing_key_from_seed(CLIENT_SEED).sign(msg).signature
        self.assertEqual(sig.hex(), V2_CLIENT_SIGNATURE)
        self.assertTrue(crypto.verify_ed25519(bytes.fromhex(USER_ID), msg, sig))

    def test_v2_keys(self) -> None:
        """HKDF over TH and ECDH_X gives the §13 k_c2s and k_s2c."""
        k_c2s, k_s2c = crypto.v2_keys(_th(), bytes.fromhex(ECDH_X))
        self.assertEqual((k_c2s.hex(), k_s2c.hex()), (K_C2S, K_S2C))

    def test_first_server_frame(self) -> None:
        """Frame 0 sealed with k_s2c is the §13 ciphertext, and a client opens it back."""
        self.assertEqual(crypto.FrameCipher(bytes.fromhex(K_S2C)).seal(FIRST_FRAME_PLAINTEXT).hex(), FIRST_FRAME)
        self.assertEqual(crypto.FrameCipher(bytes.fromhex(K_S2C)).open(bytes.fromhex(FIRST_FRAME)), FIRST_FRAME_PLAINTEXT)


class FrameCipherTests(SynchronousTestCase):
    """The v2 channel's per-direction counters (§5)."""

    def test_frames_in_order_decrypt(self) -> None:
        """A receiver opens a sender's frames in the order they were sealed."""
        tx, rx = crypto.FrameCipher(bytes.fromhex(K_C2S)), crypto.FrameCipher(bytes.fromhex(K_C2S))
        frames = [tx.seal(b"frame %d" % i) for i in range(3)]
        self.assertEqual([rx.open(f) for f in frames], [b"frame 0", b"frame 1", b"frame 2"])

    def test_replayed_frame_fails(self) -> None:
        """A frame delivered twice fails to decrypt the second time (its counter has passed)."""
        tx, rx = crypto.FrameCipher(bytes.fromhex(K_C2S)), crypto.FrameCipher(bytes.fromhex(K_C2S))
        frame = tx.seal(b"once")
        rx.open(frame)
        self.assertRaises(crypto.CryptoError, rx.open, frame)

    def test_tampered_frame_fails(self) -> None:
        """Flipping one ciphertext bit makes the frame fail with CryptoError."""
        frame = bytearray(bytes.fromhex(FIRST_FRAME))
        frame[5] ^= 1
        self.assertRaises(crypto.CryptoError, crypto.FrameCipher(bytes.fromhex(K_S2C)).open, bytes(frame))

    def test_wrong_direction_key_fails(self) -> None:
        """A frame sealed with k_s2c does not open with k_c2s."""
        self.assertRaises(
            crypto.CryptoError, crypto.FrameCipher(bytes.fromhex(K_C2S)).open, bytes.fromhex(FIRST_FRAME)
        )

    def test_counter_exhausted(self) -> None:
        """A cipher whose counter reached 2^32 refuses to seal another frame."""
        cipher = crypto.FrameCipher(bytes.fromhex(K_S2C))
        cipher.counter = 2**32
        self.assertRaises(crypto.CryptoError, cipher.seal, b"x")


def _handshake(**kw: Any) -> ServerHandshake:
    """A handshake whose ephemeral key and nonce_s are the §13 inputs."""
    return ServerHandshake(
        crypto.signing_key_from_seed(SERVER_SEED),
        make_ephemeral=lambda: crypto.ephemeral_from_scalar(SERVER_SCALAR),
        random_bytes=lambda n: b"\xbb" * n,
        **kw,
    )


def _hello(**changes: Any) -> Dict[str, Any]:
    fields: Dict[str, Any] = {"client_ephemeral_pub": CLIENT_EPHEMERAL_PUB, "nonce_c": NONCE_C}
    fields.update(changes)
    return fields


def _auth(**changes: Any) -> Dict[str, Any]:
    fields: Dict[str, Any] = {
        "user_id": USER_ID,
        "device_id": DEVICE_ID,
        "client_signature": V1_CLIENT_SIGNATURE,
        "nonce_c2": "cc" * 32,
    }
    fields.update(changes)
    return fields


class ServerHandshakeV1Tests(SynchronousTestCase):
    """``ServerHandshake`` speaking v1 with the §13 inputs."""

    def assertClosed(self, fn: Any, fields: Dict[str, Any], code: int, reason: str) -> None:
        err = self.assertRaises(ProtocolError, fn, fields)
        self.assertEqual((err.code, err.reason), (code, reason))

    def test_server_hello_is_the_vector(self) -> None:
        """The v1 server_hello carries the §13 ephemeral, nonce_s, identity and signature."""
        hello = _handshake().client_hello(_hello())
        self.assertEqual(
            hello,
            {
                "type": "server_hello",
                "server_ephemeral_pub": SERVER_EPHEMERAL_PUB,
                "nonce_s": NONCE_S,
                "server_identity_pub": SERVER_IDENTITY_PUB,
                "server_signature": V1_SERVER_SIGNATURE,
                "protocol_version": 1,
            },
        )

    def test_explicit_version_1_and_null_mean_v1(self) -> None:
        """protocol_version 1 or null is answered as v1 with the same signature."""
        for version in (1, None):
            hello = _handshake().client_hello(_hello(protocol_version=version))
            self.assertEqual((hello["protocol_version"], hello["server_signature"]), (1, V1_SERVER_SIGNATURE))

    def test_vector_client_auth_accepted(self) -> None:
        """The §13 client_signature authenticates the §13 user and device."""
        hs = _handshake()
        hs.client_hello(_hello())
        auth = hs.client_auth(_auth())
        self.assertEqual((auth.user_id, auth.device_id, auth.protocol_version), (USER_ID, DEVICE_ID, 1))

    def test_forged_signature_refused(self) -> None:
        """A signature with one bit flipped closes 1008 "Invalid client signature"."""
        hs = _handshake()
        hs.client_hello(_hello())
        forged = bytearray(bytes.fromhex(V1_CLIENT_SIGNATURE))
        forged[0] ^= 1
        self.assertClosed(hs.client_auth, _auth(client_signature=forged.hex()), 1008, "Invalid client signature")

    def test_signature_by_another_key_refused(self) -> None:
        """A valid signature by another key, presented under the §13 user_id, is refused."""
        hs = _handshake()
        hs.client_hello(_hello())
        other = crypto.signing_key_from_seed(b"\x99" * 32).sign(bytes.fromhex(V1_CLIENT_DIGEST)).signature.hex()
        self.assertClosed(hs.client_auth, _auth(client_signature=other), 1008, "Invalid client signature")

    def test_signature_from_another_connection_refused(self) -> None:
        """The §13 signature does not authenticate a connection whose nonce_s differs (no replay)."""
        hs = ServerHandshake(
            crypto.signing_key_from_seed(SERVER_SEED),
            make_ephemeral=lambda: crypto.ephemeral_from_scalar(SERVER_SCALAR),
            random_bytes=lambda n: b"\xbc" * n,
        )
        hs.client_hello(_hello())
        self.assertClosed(hs.client_auth, _auth(), 1008, "Invalid client signature")

    def test_signature_for_another_device_refused(self) -> None:
        """The §13 signature does not authenticate a different device_id."""
        hs = _handshake()
        hs.client_hello(_hello())
        self.assertClosed(
            hs.client_auth, _auth(device_id="0b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6c"), 1008, "Invalid client signature"
        )

    def test_off_curve_point_refused(self) -> None:
        """A 65-byte point that is not on P-256 closes 1008 "Invalid client_ephemeral_pub"."""
        raw = bytearray(bytes.fromhex(CLIENT_EPHEMERAL_PUB))
        raw[-1] ^= 1  # same X, wrong Y
        self.assertClosed(
            _handshake().client_hello, _hello(client_ephemeral_pub=raw.hex()), 1008, "Invalid client_ephemeral_pub"
        )

    def test_bad_point_encodings_refused(self) -> None:
        """A compressed prefix, the zero point, a short key or a non-string closes 1008."""
        for bad in ("02" + CLIENT_EPHEMERAL_PUB[2:], "04" + "00" * 64, CLIENT_EPHEMERAL_PUB[:128], 5, None):
            self.assertClosed(
                _handshake().client_hello, _hello(client_ephemeral_pub=bad), 1008, "Invalid client_ephemeral_pub"
            )

    def test_bad_nonce_c_refused(self) -> None:
        """A nonce_c that is not hex64 closes 1008 before a server_hello is made."""
        for bad in ("aa" * 31, "zz" * 32, 7, None):
            hs = _handshake()
            self.assertRaises(ProtocolError, hs.client_hello, _hello(nonce_c=bad))
            self.assertFalse(hs.hello_done)

    def test_unsupported_versions_refused(self) -> None:
        """protocol_version 0, 3, "2", 2.0, 1.0 or true closes 1008 "Unsupported protocol version"."""
        for bad in (0, 3, -1, "2", 2.0, 1.0, True, [1]):
            self.assertClosed(
                _handshake().client_hello, _hello(protocol_version=bad), 1008, "Unsupported protocol version"
            )

    def test_v1_refused_when_v2_required(self) -> None:
        """A server configured to require v2 closes a v1 hello with 1008 "Protocol version 2 required"."""
        self.assertClosed(_handshake(require_v2=True).client_hello, _hello(), 1008, "Protocol version 2 required")

    def test_v1_requires_nonce_c2(self) -> None:
        """A v1 client_auth without a hex64 nonce_c2 closes 1008 even with a valid signature."""
        hs = _handshake()
        hs.client_hello(_hello())
        fields = _auth()
        del fields["nonce_c2"]
        self.assertRaises(ProtocolError, hs.client_auth, fields)

    def test_uppercase_input_accepted_and_lowercased(self) -> None:
        """Uppercase hex/UUID input is signed as sent and comes out of the handshake lowercase."""
        hs = _handshake()
        hello = hs.client_hello(_hello(client_ephemeral_pub=CLIENT_EPHEMERAL_PUB.upper(), nonce_c=NONCE_C.upper()))
        # The server signs nonce_c exactly as transmitted (uppercase).
        digest = crypto.v1_server_digest(
            hello["server_identity_pub"], hello["server_ephemeral_pub"], NONCE_C.upper(), hello["nonce_s"]
        )
        self.assertTrue(
            crypto.verify_ed25519(
                bytes.fromhex(SERVER_IDENTITY_PUB), digest, bytes.fromhex(hello["server_signature"])
            )
        )
        user, device = USER_ID.upper(), DEVICE_ID.upper()
        client_digest = crypto.v1_client_digest(user, device, NONCE_C.upper(), NONCE_S, SERVER_EPHEMERAL_PUB)
        sig = crypto.signing_key_from_seed(CLIENT_SEED).sign(client_digest).signature.hex().upper()
        auth = hs.client_auth(_auth(user_id=user, device_id=device, client_signature=sig, nonce_c2=("CC" * 32)))
        self.assertEqual((auth.user_id, auth.device_id), (USER_ID, DEVICE_ID))

    def test_user_id_with_trailing_newline_refused(self) -> None:
        """A user_id of hex64 plus "\\n", validly signed as sent, is not a hex64 and closes 1008."""
        hs = _handshake()
        hs.client_hello(_hello())
        user = USER_ID + "\n"
        digest = crypto.v1_client_digest(user, DEVICE_ID, NONCE_C, NONCE_S, SERVER_EPHEMERAL_PUB)
        sig = crypto.signing_key_from_seed(CLIENT_SEED).sign(digest).signature.hex()
        err = self.assertRaises(ProtocolError, hs.client_auth, _auth(user_id=user, client_signature=sig))
        self.assertEqual(err.code, 1008)

    def test_device_name_and_type_normalised(self) -> None:
        """device_name is trimmed and cut to 50 code points; an unknown device_type becomes "unknown"."""
        hs = _handshake()
        hs.client_hello(_hello())
        auth = hs.client_auth(_auth(device_name="  " + "é" * 60 + "  ", device_type="toaster"))
        self.assertEqual((auth.device_name, auth.device_type), ("é" * 50, "unknown"))


class ServerHandshakeV2Tests(SynchronousTestCase):
    """``ServerHandshake`` speaking v2 with the §13 inputs."""

    def test_server_hello_and_keys_are_the_vector(self) -> None:
        """A v2 hello is answered with the §13 v2 signature, and the channel keys are k_c2s/k_s2c."""
        hs = _handshake()
        hello = hs.client_hello(_hello(protocol_version=2))
        self.assertEqual(
            (hello["protocol_version"], hello["server_signature"], hello["server_ephemeral_pub"]),
            (2, V2_SERVER_SIGNATURE, SERVER_EPHEMERAL_PUB),
        )
        assert hs.keys is not None
        self.assertEqual((hs.keys[0].hex(), hs.keys[1].hex()), (K_C2S, K_S2C))

    def test_vector_client_auth_accepted(self) -> None:
        """The §13 v2 client_signature authenticates without nonce_c2."""
        hs = _handshake()
        hs.client_hello(_hello(protocol_version=2))
        auth = hs.client_auth({"user_id": USER_ID, "device_id": DEVICE_ID, "client_signature": V2_CLIENT_SIGNATURE})
        self.assertEqual((auth.user_id, auth.device_id, auth.protocol_version), (USER_ID, DEVICE_ID, 2))

    def test_v1_signature_refused_on_v2(self) -> None:
        """The v1 signature of the same inputs does not authenticate a v2 connection."""
        hs = _handshake()
        hs.client_hello(_hello(protocol_version=2))
        err = self.assertRaises(ProtocolError, hs.client_auth, _auth())
        self.assertEqual((err.code, err.reason), (1008, "Invalid client signature"))

    def test_resume_from(self) -> None:
        """resume_from is carried when an integer ≥ 0 and closes 1008 when -1, 1.0 or "3"."""
        hs = _handshake()
        hs.client_hello(_hello(protocol_version=2))
        fields = {"user_id": USER_ID, "device_id": DEVICE_ID, "client_signature": V2_CLIENT_SIGNATURE}
        self.assertEqual(hs.client_auth(dict(fields, resume_from=7)).resume_from, 7)
        for bad in (-1, 1.0, "3", True):
            self.assertRaises(ProtocolError, hs.client_auth, dict(fields, resume_from=bad))
