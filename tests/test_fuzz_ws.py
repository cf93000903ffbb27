"""
Fuzzing (hypothesis) of authenticated WebSocket sessions against a real
``twistd``: a fresh v1 or v2 device sends 1-4 fuzzed messages (events with
odd fields, acks, replay requests, handshake messages out of place, unknown
types, non-object payloads, junk frames), then an app-level ``ping``.

The contract's outcomes only (PROTOCOL.md §2, §6-§8, §11): the session
answers the ping (the socket stayed usable), or it is closed with a code a
client can cause (1002, 1007, 1008, 1009) and a short ASCII reason. Never
1011, never a drop without a close frame (except after invalid UTF-8 in a v1
text frame, a WebSocket-layer violation Autobahn may answer by dropping);
afterwards the server is healthy and logged no traceback. A bounded number of examples, in a thread so the
reactor keeps running.
"""

from __future__ import annotations

import json
import socket
import uuid
from typing import Any, Dict, List, Optional, Tuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from pocketbridge.client import Identity
from tests.abuse import start_abuse_server
from tests.harness import ServerProcess
from tests.test_abuse_wire import Reader, authenticate, frame

EXAMPLES = settings(max_examples=80, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CLIENT_CAUSED = {1002, 1007, 1008, 1009}

scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(allow_nan=False),
                   st.text(max_size=20), st.uuids().map(str))
value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                     max_leaves=8)
EVENT_FIELDS = ["event_id", "user_id", "device_id", "device_seq", "stream_id", "stream_seq", "type",
                "encrypted_payload", "ttl"]
REPLAY_FIELDS = ["last_ack_device_seq", "limit", "continuation_token", "resume_from"]


@st.composite
def messages(draw: Any) -> Tuple[str, Any]:
    """("json", a message) or ("junk", raw bytes, sent as one frame)."""
    kind = draw(st.sampled_from(["event", "ack", "replay_request", "other", "junk"]))
    if kind == "junk":
        return "junk", draw(st.binary(max_size=64))
    msg_type = kind if kind != "other" else draw(st.sampled_from(
        ["client_hello", "client_auth", "ping", "pong", "x", "", "EVENT"]))
    names = {"event": EVENT_FIELDS, "ack": ["seq", "device_seq"], "replay_request": REPLAY_FIELDS}.get(kind, ["x"])
    fields = draw(st.dictionaries(st.sampled_from(names), value, max_size=len(names)))
    shape = draw(st.sampled_from(["payload", "flat", "odd_payload"]))
    if shape == "payload":
        return "json", {"type": msg_type, "payload": fields}
    if shape == "flat":
        return "json", dict(fields, type=msg_type)
    return "json", {"type": msg_type, "payload": draw(value)}


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


class WsFuzz(TestCase):
    """Fuzzed messages on authenticated sessions of a real server (SQLite)."""

    async def test_fuzzed_messages_get_contract_outcomes(self) -> None:
        """Fuzzed v1 and v2 messages after authentication: the ping is answered or the close code is one a client causes; no 1011, no traceback."""
        server = await start_abuse_server(self, ["--conn-per-ip-burst", "100000"])
        outcomes: Dict[str, int] = {}
        await deferToThread(self.fuzz, server, outcomes)
        print("ws fuzz outcomes: {}".format(json.dumps(outcomes, sort_keys=True)))
        code, _ = await server.http_get("/health")
        self.assertEqual(code, 200)
        log = server.log_text()
        self.assertNotIn("Traceback", log, "the server logged a traceback:\n" + log[-3000:])

    def fuzz(self, server: ServerProcess, outcomes: Dict[str, int]) -> None:
        """The property, run in a thread."""

        @EXAMPLES
        @given(st.sampled_from([1, 2]), st.lists(messages(), min_size=1, max_size=4))
        def session(version: int, sent: List[Tuple[str, Any]]) -> None:
            identity = Identity.generate()
            sock, reader, codec = authenticate("127.0.0.1", server.port, version, identity, str(uuid.uuid4()))
            # v1 sends junk as a text frame: invalid UTF-8 there is a WebSocket-layer violation, which
            # Autobahn may answer by dropping TCP without a close frame (§11: 1007 comes from that layer).
            framing_violation = codec is None and any(kind == "junk" and not _utf8(m) for kind, m in sent)
            try:
                for kind, message in sent + [("json", {"type": "ping", "payload": {}})]:
                    if kind == "junk":
                        data = frame(0x2 if codec is not None else 0x1, message)
                    elif codec is not None:
                        data = frame(0x2, codec.seal(json.dumps(message).encode()))  # json: ints past 64 bits too
                    else:
                        data = frame(0x1, json.dumps(message).encode())
                    try:
                        sock.sendall(data)
                    except OSError:
                        break  # the server closed already; what it sent before is still to be read
                result = self.until_pong(reader, codec, framing_violation)
            finally:
                sock.close()
            label = result if not result.startswith("close 1007") else "close 1007"
            outcomes[label] = outcomes.get(label, 0) + 1
            if result.startswith("close"):
                code = int(result.split()[1])
                self.assertIn(code, CLIENT_CAUSED, "v{} {} ended with {!r}".format(version, sent, result))

        session()

    def until_pong(self, reader: Reader, codec: Any, drop_allowed: bool) -> str:
        """'pong' once the app-level pong arrives, else 'close CODE reason' or 'dropped' (only when ``drop_allowed``)."""
        while True:
            try:
                opcode, payload = reader.next_data()
            except socket.timeout:
                self.fail("no pong and no close within the timeout")
            except (ConnectionError, OSError) as e:
                text = str(e)
                if not text.startswith("close "):
                    self.assertTrue(drop_allowed, "the server dropped the socket without a close frame ({})".format(text))
                    return "dropped"
                reason = text.split(" ", 2)[2] if text.count(" ") >= 2 else ""
                self.assertTrue(reason.isascii() and len(reason) <= 123, reason)
                return text
            message: Optional[Any] = codec.decode(payload, True) if codec is not None else json.loads(payload)
            if isinstance(message, dict) and message.get("type") == "pong":
                return "pong"
