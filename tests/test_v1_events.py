"""
Integration tests of protocol v1 events (PROTOCOL.md §6 and §7): uploads,
acks, live relay, catch-up pages and delivery cursors.

Every test starts a real ``twistd pocketbridge`` process (``tests.harness``)
and drives it over real sockets with the project's client SDK
(``pocketbridge.client``), once on SQLite and once on PostgreSQL. Frames the
SDK would never send (malformed or foreign events) go out with
``Client.send_raw``; their acks are read from ``Client.messages``.

A check that "nothing more arrives" is made with a barrier, never a sleep:
the server answers frames in arrival order and sends the events and acks of
one socket in order, so everything due before a later frame's answer has
arrived once that answer has.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Tuple

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from pocketbridge.client import OMIT, Client, Identity
from tests.class_servers import class_server
from tests.harness import PostgresMixin, ServerProcess, SQLiteMixin, start_server

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

TIMEOUT = 10.0  # seconds any single expected message may take

#: The fields of a relayed event (§7.1), ``ttl`` only when it is set.
RELAY_FIELDS = frozenset(
    {"event_id", "user_id", "device_id", "device_seq", "stream_id", "stream_seq", "type",
     "encrypted_payload", "created_at", "seq"}
)

#: The page a v1 client gets once its backlog is exhausted (§7.3).
EMPTY_FINAL_PAGE = {"type": "replay_response", "events": [], "has_more": False, "page_size": 0, "total_events": 0}

STREAM = "clipboard:main"
TYPE = "clipboard:text"


def b64(n: int = 24) -> str:
    """Standard padded base64 of ``n`` random bytes: a valid ``encrypted_payload``."""
    return base64.b64encode(os.urandom(n)).decode("ascii")


def new_id() -> str:
    """A fresh lowercase event or device id."""
    return str(uuid.uuid4())


def now_ms() -> int:
    """Wall-clock ms (the server runs on this host and uses the same clock)."""
    return int(time.time() * 1000)


def ids(events: Iterable[Dict[str, Any]]) -> List[str]:
    """The ``event_id`` of each event, in order."""
    return [e["event_id"] for e in events]


def seqs(events: Iterable[Dict[str, Any]]) -> List[int]:
    """The ``seq`` of each event, in order."""
    return [e["seq"] for e in events]


def ack_summary(ack: Dict[str, Any]) -> Tuple[Any, ...]:
    """An ack as (device_seq, event_id, seq, stream_seq, dropped) for whole-sequence comparisons."""
    return (ack.get("device_seq"), ack.get("event_id"), ack.get("seq"), ack.get("stream_seq"), ack.get("dropped", False))


def sleep(seconds: float) -> Any:
    """A Deferred that fires after ``seconds`` of real time."""
    return deferLater(reactor, seconds, lambda: None)


class V1EventTests(_Base):
    """The §6/§7 event rules against a real server; mixed with a backend and TestCase below."""

    backend: str

    # ------------------------------------------------------------ helpers

    async def start(self, args: Sequence[str] = ()) -> ServerProcess:
        """A healthy server on this class's backend, shared with the class's other tests (tests.class_servers).

        A test that kills or restarts the server uses ``start_server``.
        """
        return await class_server(self, args=args)

    def device(self, server: ServerProcess, identity: Identity, **kwargs: Any) -> Client:
        """A (not yet connected) client of ``identity``, closed after the test."""
        client = Client(reactor, server.ws_url, identity, **kwargs)
        self.addCleanup(client.close)
        return client

    async def online(self, server: ServerProcess, identity: Identity, **kwargs: Any) -> Client:
        """A connected client of ``identity``."""
        client = self.device(server, identity, **kwargs)
        await client.connect()
        return client

    async def barrier(self, client: Client) -> None:
        """Ping and wait for the pong: everything the server sent this socket before it has arrived."""
        mark = len(client.messages)
        client.send_raw({"type": "ping", "payload": {}})
        await client.wait_for("pong", timeout=TIMEOUT, since=mark)

    async def receive(self, client: Client, n: int) -> List[Dict[str, Any]]:
        """The next ``n`` events the client receives (live or replayed)."""
        return [await client.next_event(TIMEOUT) for _ in range(n)]

    async def history(self, server: ServerProcess, identity: Identity) -> List[Dict[str, Any]]:
        """What a brand-new device of the user catches up: the user's stored, deliverable events."""
        client = await self.online(server, identity)
        events = await client.catch_up(limit=1000, timeout=TIMEOUT)
        await client.close()
        return events

    @staticmethod
    def acks_since(client: Client, mark: int) -> List[Dict[str, Any]]:
        """The ack payloads among ``client.messages[mark:]``, in arrival order."""
        return [m["payload"] for m in client.messages[mark:] if isinstance(m, dict) and m.get("type") == "ack"]

    async def wait_acks(self, client: Client, mark: int, n: int) -> List[Dict[str, Any]]:
        """Wait until ``n`` acks arrived after ``mark``; return them."""
        while len(self.acks_since(client, mark)) < n:
            await client.wait_for("ack", timeout=TIMEOUT, since=None)
        return self.acks_since(client, mark)

    @staticmethod
    def raw_event(client: Client, device_seq: Any, event_id: Optional[str] = None, **fields: Any) -> Dict[str, Any]:
        """An event payload as the client's device would upload it; ``fields`` override (OMIT removes)."""
        payload: Dict[str, Any] = {
            "event_id": event_id if event_id is not None else new_id(),
            "user_id": client.identity.user_id,
            "device_id": client.device_id,
            "device_seq": device_seq,
            "stream_id": STREAM,
            "stream_seq": 0,
            "type": TYPE,
            "encrypted_payload": b64(),
        }
        if device_seq is OMIT:
            del payload["device_seq"]
        for key, value in fields.items():
            if value is OMIT:
                payload.pop(key, None)
            else:
                payload[key] = value
        return payload

    @staticmethod
    def send_raw_event(client: Client, payload: Dict[str, Any]) -> None:
        """Upload ``payload`` without ack tracking."""
        client.send_raw({"type": "event", "payload": payload})

    def assertDropped(self, ack: Dict[str, Any], device_seq: int, event_id: str) -> None:
        """``ack`` is the §6 step 6 ack of an event that was not stored: only these three fields."""
        self.assertEqual(ack, {"device_seq": device_seq, "event_id": event_id, "dropped": True})

    def assertStoredAck(self, ack: Dict[str, Any], device_seq: int, event_id: str, seq: int, stream_seq: int) -> None:
        """``ack`` is the ack of a stored event with these values and no ``dropped`` flag."""
        self.assertEqual(ack_summary(ack), (device_seq, event_id, seq, stream_seq, False), ack)

    # ------------------------------------------------------------ 1. live relay

    async def test_live_relay_exactly_once_in_seq_order(self) -> None:
        """Another device of the user receives each event once, in seq order, as exactly the §7.1 fields with lowercase ids; the sender gets none back."""
        await self.check_relay_exactly_once(await self.start())

    async def test_live_relay_exactly_once_with_redis_bus(self) -> None:
        """With the Redis bus configured, an event is still relayed once per socket, not once locally and once through Redis."""
        await self.check_relay_exactly_once(await start_server(self, redis=True))

    async def check_relay_exactly_once(self, server: ServerProcess) -> None:
        """Rule 1 (§7.1) on ``server``: see test_live_relay_exactly_once_in_seq_order."""
        user = Identity.generate()
        b = await self.online(server, user)
        a = await self.online(server, user, device_id=new_id().upper())
        n = 20
        t0 = now_ms()
        sent: List[Dict[str, Any]] = []
        pending = []
        for i in range(n):
            event = {
                "event_id": new_id().upper(),
                "encrypted_payload": b64(10 + i),
                "ttl": now_ms() + 3_600_000 if i % 4 == 0 else None,
            }
            sent.append(event)
            pending.append(a.send_event(
                stream_id=STREAM, type=TYPE, encrypted_payload=event["encrypted_payload"], ttl=event["ttl"],
                event_id=event["event_id"], user_id=user.user_id.upper(),
                # Fields a relay must drop or replace: the server assigns seq, stream_seq, created_at.
                extra={"sender_note": "not relayed", "stream_seq": 99, "seq": 12345, "created_at": 1},
            ))
        acks = await gatherResults(pending, consumeErrors=True)
        t1 = now_ms()
        self.assertEqual([(x["seq"], x["stream_seq"]) for x in acks], [(i, i) for i in range(1, n + 1)])
        self.assertEqual([x["event_id"] for x in acks], [e["event_id"].lower() for e in sent])

        received = await self.receive(b, n)
        await self.barrier(b)
        await self.barrier(a)
        self.assertEqual(len(b.events_received), n, "an event was relayed more than once")
        self.assertEqual(a.events_received, [], "the sender received its own events")
        self.assertEqual(seqs(received), list(range(1, n + 1)))
        for i, (event, got) in enumerate(zip(sent, received)):
            expected_fields = RELAY_FIELDS | ({"ttl"} if event["ttl"] is not None else set())
            self.assertEqual(set(got), expected_fields, "event {}".format(i))
            self.assertEqual(got["event_id"], event["event_id"].lower())
            self.assertEqual(got["user_id"], user.user_id)
            self.assertEqual(got["device_id"], a.device_id.lower())
            self.assertEqual(got["device_seq"], i + 1)
            self.assertEqual(got["stream_id"], STREAM)
            self.assertEqual(got["stream_seq"], acks[i]["stream_seq"])
            self.assertEqual(got["seq"], acks[i]["seq"])
            self.assertEqual(got["type"], TYPE)
            self.assertEqual(got["encrypted_payload"], event["encrypted_payload"])
            if event["ttl"] is not None:
                self.assertEqual(got["ttl"], event["ttl"])
            self.assertIsInstance(got["created_at"], int)
            self.assertTrue(t0 <= got["created_at"] <= t1, (t0, got["created_at"], t1))

    # ------------------------------------------------------------ 2. duplicates

    async def test_duplicate_resend_acked_with_stored_seq_and_not_relayed(self) -> None:
        """Re-sending an event (same event_id and device_seq, stored or still in flight) is acked with the original seq and stream_seq, and is neither relayed nor stored again."""
        server = await self.start()
        user = Identity.generate()
        b = await self.online(server, user)
        a = await self.online(server, user)
        first_id, second_id, third_id = new_id(), new_id(), new_id()
        payload = b64()

        first = await a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=payload, event_id=first_id, device_seq=1)
        self.assertStoredAck(first, 1, first_id, 1, 1)
        again = await a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=payload, event_id=first_id, device_seq=1)
        self.assertStoredAck(again, 1, first_id, 1, 1)
        # event_ids are compared lowercased: the same id in upper case is the same event.
        upper = await a.send_event(
            stream_id=STREAM, type=TYPE, encrypted_payload=payload, event_id=first_id.upper(), device_seq=1
        )
        self.assertStoredAck(upper, 1, first_id, 1, 1)

        # The same event twice in one burst: the copy is acked after the original, with its seq.
        pair = await gatherResults([
            a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=payload, event_id=second_id, device_seq=2),
            a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=payload, event_id=second_id, device_seq=2),
        ], consumeErrors=True)
        self.assertStoredAck(pair[0], 2, second_id, 2, 2)
        self.assertStoredAck(pair[1], 2, second_id, 2, 2)

        # Duplicates took no seq: the next event is seq 3.
        third = await a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=payload, event_id=third_id, device_seq=3)
        self.assertStoredAck(third, 3, third_id, 3, 3)

        await self.receive(b, 3)
        await self.barrier(b)
        self.assertEqual(ids(b.events_received), [first_id, second_id, third_id])
        stored = await self.history(server, user)
        self.assertEqual([(e["event_id"], e["seq"]) for e in stored], [(first_id, 1), (second_id, 2), (third_id, 3)])

    # ------------------------------------------------------------ 3. conflicts

    async def test_conflicting_event_acked_dropped_and_not_relayed(self) -> None:
        """An event_id reused with another (device, device_seq), or a device_seq reused with another event_id, is acked with dropped: true and never relayed or stored."""
        server = await self.start()
        user = Identity.generate()
        b = await self.online(server, user)
        a = await self.online(server, user)
        x, y, z = new_id(), new_id(), new_id()

        first = await a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64(), event_id=x, device_seq=1)
        self.assertStoredAck(first, 1, x, 1, 1)
        same_id = await a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64(), event_id=x, device_seq=2)
        self.assertDropped(same_id, 2, x)
        same_seq = await a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64(), event_id=y, device_seq=1)
        self.assertDropped(same_seq, 1, y)
        # event_ids are unique per user, not per device.
        other_device = await b.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64(), event_id=x, device_seq=1)
        self.assertDropped(other_device, 1, x)

        # Nothing was stored: device_seq 2 is still unused and the next seq is 2.
        after = await a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64(), event_id=z, device_seq=2)
        self.assertStoredAck(after, 2, z, 2, 2)

        await self.receive(b, 2)
        await self.barrier(b)
        await self.barrier(a)
        self.assertEqual(ids(b.events_received), [x, z])
        self.assertEqual(a.events_received, [], "B's conflicting event was relayed")
        self.assertEqual(ids(await self.history(server, user)), [x, z])

    # ------------------------------------------------------------ 4. foreign events

    async def test_foreign_event_ignored_without_ack(self) -> None:
        """An event naming another device or another user gets no ack and is neither stored nor relayed; the next valid event gets the next ack."""
        server = await self.start()
        user = Identity.generate()
        stranger = Identity.generate()
        b = await self.online(server, user)
        a = await self.online(server, user)
        mark = len(a.messages)
        foreign = [
            self.raw_event(a, 1, device_id=b.device_id),  # a v1 client re-sending B's event
            self.raw_event(a, 2, device_id=new_id()),  # a device that is not this session's
            self.raw_event(a, 3, user_id=stranger.user_id),  # another user's event
            self.raw_event(a, 4, device_id=OMIT),  # no device at all
        ]
        for event in foreign:
            self.send_raw_event(a, event)
        # Empty or missing user_id means the session user (§6): these two are A's own.
        no_user = new_id()
        empty_user = new_id()
        first = await a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64(), event_id=no_user,
                                   device_seq=1, extra={"user_id": OMIT})
        second = await a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64(), event_id=empty_user,
                                    device_seq=2, user_id="")

        self.assertEqual([ack_summary(x) for x in self.acks_since(a, mark)],
                         [(1, no_user, 1, 1, False), (2, empty_user, 2, 2, False)])
        self.assertIsNone(a.close_info, "the server closed the socket over a foreign event")
        self.assertEqual((first["seq"], second["seq"]), (1, 2))
        await self.receive(b, 2)
        await self.barrier(b)
        self.assertEqual(ids(b.events_received), [no_user, empty_user])
        self.assertEqual(ids(await self.history(server, user)), [no_user, empty_user])
        self.assertEqual(await self.history(server, stranger), [])

    # ------------------------------------------------------------ 5. invalid events

    async def test_invalid_event_acked_dropped_and_connection_stays_open(self) -> None:
        """Each event breaking a §6 rule is acked with only device_seq, event_id and dropped: true, is not stored or relayed, and the socket stays usable."""
        server = await self.start()
        user = Identity.generate()
        b = await self.online(server, user)
        a = await self.online(server, user)
        now = now_ms()
        cases: List[Tuple[str, Dict[str, Any]]] = [
            ("stream_id with a space", {"stream_id": "clip board"}),
            ("empty stream_id", {"stream_id": ""}),
            ("stream_id of 257 characters", {"stream_id": "s" * 257}),
            ("missing stream_id", {"stream_id": OMIT}),
            ("type with a slash", {"type": "clipboard/text"}),
            ("type of 65 characters", {"type": "t" * 65}),
            ("missing type", {"type": OMIT}),
            ("payload not base64", {"encrypted_payload": "QUJD!!!!"}),
            ("payload without padding", {"encrypted_payload": "QUJDRA"}),
            ("payload with a newline", {"encrypted_payload": "QUJ\nRA=="}),
            ("empty payload", {"encrypted_payload": ""}),
            ("payload not a string", {"encrypted_payload": 1234}),
            ("ttl ten minutes in the past", {"ttl": now - 600_000}),
            ("ttl a string", {"ttl": str(now + 60_000)}),
            ("ttl a float", {"ttl": float(now + 60_000)}),
            ("event_id not a UUID", {"event_id": "not-a-uuid"}),
        ]
        mark = len(a.messages)
        expected = []
        for device_seq, (_, fields) in enumerate(cases, start=1):
            event = self.raw_event(a, device_seq, **fields)
            expected.append({"device_seq": device_seq, "event_id": event["event_id"], "dropped": True})
            self.send_raw_event(a, event)
        # At the limits of the same rules, an event is valid.
        valid_id = new_id()
        valid = await a.send_event(stream_id="s" * 256, type="t" * 64, encrypted_payload=b64(), event_id=valid_id,
                                   device_seq=len(cases) + 1, ttl=now - 60_000)

        acks = self.acks_since(a, mark)
        self.assertEqual(len(acks), len(cases) + 1, acks)
        for (name, _), ack, want in zip(cases, acks, expected):
            self.assertEqual(ack, want, name)
        self.assertStoredAck(valid, len(cases) + 1, valid_id, 1, 1)
        self.assertIsNone(a.close_info)
        # The valid event's ttl has passed (within the 5-minute grace it is accepted): stored, never delivered.
        live_id = new_id()
        await a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64(), event_id=live_id)
        await self.receive(b, 1)
        await self.barrier(b)
        self.assertEqual(ids(b.events_received), [live_id])
        self.assertEqual(ids(await self.history(server, user)), [live_id])

    async def test_event_without_integer_device_seq_gets_no_ack(self) -> None:
        """An event whose device_seq is not an integer in 1..2^53-1 ("1", 1.0, true, missing, 0, 2^53) gets no ack and is not stored."""
        server = await self.start()
        user = Identity.generate()
        b = await self.online(server, user)
        a = await self.online(server, user)
        mark = len(a.messages)
        for bad in ("1", 1.0, True, OMIT, 0, -1, 2**53):
            self.send_raw_event(a, self.raw_event(a, bad))
        # If any of those had been taken as device_seq 1, this one would be a conflict.
        valid_id = new_id()
        valid = await a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64(), event_id=valid_id, device_seq=1)
        self.assertEqual([ack_summary(x) for x in self.acks_since(a, mark)], [(1, valid_id, 1, 1, False)])
        self.assertStoredAck(valid, 1, valid_id, 1, 1)
        self.assertIsNone(a.close_info)
        await self.receive(b, 1)
        await self.barrier(b)
        self.assertEqual(ids(b.events_received), [valid_id])
        self.assertEqual(ids(await self.history(server, user)), [valid_id])

    # ------------------------------------------------------------ 6. device identity

    async def test_same_device_id_under_another_user_is_another_device(self) -> None:
        """A second user signing in with another user's device_id starts at last_ack_device_seq 0, sees none of the first user's events and writes its own history."""
        server = await self.start()
        x = Identity.generate()
        y = Identity.generate()
        shared = new_id()
        x_other = await self.online(server, x)
        x_dev = await self.online(server, x, device_id=shared)
        x_ids = []
        for _ in range(3):
            ack = await x_dev.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64())
            x_ids.append(ack["event_id"])

        y_dev = self.device(server, y, device_id=shared)
        established = await y_dev.connect()
        self.assertEqual(established["device_id"], shared)
        self.assertEqual(established["last_ack_device_seq"], 0)
        page = await y_dev.replay_request(limit=100, timeout=TIMEOUT)
        self.assertEqual(page, EMPTY_FINAL_PAGE)

        # X keeps writing while Y is online; Y writes device_seq 1, which X's device already used.
        x_ids.append((await x_dev.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64()))["event_id"])
        y_id = new_id()
        y_ack = await y_dev.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64(), event_id=y_id, device_seq=1)
        self.assertStoredAck(y_ack, 1, y_id, 1, 1)

        await self.barrier(y_dev)
        self.assertEqual(y_dev.events_received, [])
        await self.receive(x_other, 4)
        await self.barrier(x_other)
        self.assertEqual(ids(x_other.events_received), x_ids)
        self.assertEqual(ids(await self.history(server, y)), [y_id])
        self.assertEqual(ids(await self.history(server, x)), x_ids)

    # ------------------------------------------------------------ 7. counters

    async def test_seq_and_stream_seq_count_per_user(self) -> None:
        """seq counts per user without gaps and stream_seq per (user, stream): two users on one stream_id and two streams of one user count independently."""
        server = await self.start()
        x = Identity.generate()
        y = Identity.generate()
        xa = await self.online(server, x)
        xb = await self.online(server, x)
        ya = await self.online(server, y)
        files = "files:main:" + new_id()
        steps = [
            (xa, STREAM, (1, 1)),
            (ya, STREAM, (1, 1)),
            (xa, files, (2, 1)),
            (ya, STREAM, (2, 2)),
            (xb, STREAM, (3, 2)),  # another device of X continues X's counters
            (ya, STREAM, (3, 3)),
            (xa, files, (4, 2)),
            (xa, STREAM, (5, 3)),
        ]
        got = []
        for client, stream, _ in steps:
            ack = await client.send_event(stream_id=stream, type=TYPE, encrypted_payload=b64())
            got.append((ack["seq"], ack["stream_seq"]))
        self.assertEqual(got, [want for _, _, want in steps])
        x_history = await self.history(server, x)
        self.assertEqual([(e["seq"], e["stream_id"], e["stream_seq"]) for e in x_history],
                         [(1, STREAM, 1), (2, files, 1), (3, STREAM, 2), (4, files, 2), (5, STREAM, 3)])

    # ------------------------------------------------------------ 8. catch-up

    async def test_offline_backlog_of_250_in_pages_of_100_100_50(self) -> None:
        """A device back online pages its 250-event backlog as 100/100/50 with the §7.3 counters and token, then gets the empty final page; a new device is pushed the first page unasked."""
        server = await self.start()
        user = Identity.generate()
        a = await self.online(server, user)
        b = await self.online(server, user)
        # B stores one event so that it has last_ack_device_seq > 0 and asks for pages itself.
        b_first = await b.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64())
        await self.receive(a, 1)
        await b.close()

        acks = await gatherResults(
            [a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64()) for _ in range(250)], consumeErrors=True
        )
        sent_ids = [x["event_id"] for x in acks]
        self.assertEqual([x["seq"] for x in acks], list(range(2, 252)))

        established = await b.connect()
        self.assertEqual(established["last_ack_device_seq"], 1)
        pages = []
        token = None
        for _ in range(4):
            page = await b.replay_request(limit=100, continuation_token=token, timeout=TIMEOUT)
            pages.append(page)
            token = page.get("continuation_token")
        shape = [(p["type"], p["page_size"], len(p["events"]), p["has_more"], p["total_events"], "continuation_token" in p)
                 for p in pages[:3]]
        self.assertEqual(shape, [
            ("replay_response", 100, 100, True, 250, True),
            ("replay_response", 100, 100, True, 150, True),
            ("replay_response", 50, 50, False, 50, False),
        ])
        self.assertIsInstance(pages[0]["continuation_token"], str)
        self.assertIsInstance(pages[1]["continuation_token"], str)
        self.assertEqual(pages[3], EMPTY_FINAL_PAGE)
        replayed = [e for p in pages for e in p["events"]]
        self.assertEqual(ids(replayed), sent_ids)
        self.assertEqual(seqs(replayed), list(range(2, 252)))
        await self.barrier(b)
        self.assertEqual(b.unsolicited_pages, [])
        self.assertEqual(len(b.events_received), 250, "events arrived outside the requested pages")

        # A brand-new device has last_ack_device_seq 0: the server pushes the first page itself.
        c = self.device(server, user)
        mark = len(c.messages)
        established = await c.connect()
        self.assertEqual(established["last_ack_device_seq"], 0)
        pushed = (await c.wait_for("replay_response", timeout=TIMEOUT, since=mark))["payload"]
        self.assertEqual((pushed["type"], pushed["page_size"], pushed["has_more"], pushed["total_events"]),
                         ("replay_response", 100, True, 251))
        self.assertIsInstance(pushed.get("continuation_token"), str)
        everything = await c.catch_up(limit=100, timeout=TIMEOUT)
        self.assertEqual(ids(everything), [b_first["event_id"]] + sent_ids)

    # ------------------------------------------------------------ 9. delivery cursor

    async def test_delivery_cursor_advances_only_on_acks(self) -> None:
        """Events a device received but did not ack come again on its next connection; once acked (up to a point), they do not."""
        server = await self.start()
        user = Identity.generate()
        a = await self.online(server, user)
        b = await self.online(server, user, auto_ack=False)
        acks = await gatherResults(
            [a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64()) for _ in range(5)], consumeErrors=True
        )
        sent_ids = [x["event_id"] for x in acks]
        self.assertEqual(ids(await self.receive(b, 5)), sent_ids)

        async def reconnect() -> List[Dict[str, Any]]:
            await self.barrier(b)  # every ack sent so far has been handled
            await b.close()
            await sleep(0.5)  # the cursor is written on disconnect
            await b.connect()
            return await b.catch_up(limit=100, timeout=TIMEOUT)

        # Received, never acked: all five again.
        again = await reconnect()
        self.assertEqual(ids(again), sent_ids)
        # Ack the first three: only the last two again.
        for event in again[:3]:
            b.ack(event["device_seq"])
        rest = await reconnect()
        self.assertEqual(ids(rest), sent_ids[3:])
        for event in rest:
            b.ack(event["device_seq"])
        self.assertEqual(await reconnect(), [])

    # ------------------------------------------------------------ 10. several sockets

    async def test_every_socket_of_a_device_receives_each_event(self) -> None:
        """Two sockets of one device both receive every event of another device, and neither receives the events the other socket uploads."""
        server = await self.start()
        user = Identity.generate()
        shared = new_id()
        a = await self.online(server, user)
        b1 = await self.online(server, user, device_id=shared)
        b2 = await self.online(server, user, device_id=shared)
        acks = await gatherResults(
            [a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64()) for _ in range(10)], consumeErrors=True
        )
        sent_ids = [x["event_id"] for x in acks]
        self.assertEqual(ids(await self.receive(b1, 10)), sent_ids)
        self.assertEqual(ids(await self.receive(b2, 10)), sent_ids)

        own = await b1.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64())
        self.assertEqual(ids(await self.receive(a, 1)), [own["event_id"]])
        marker = await a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64())
        self.assertEqual(ids(await self.receive(b2, 1)), [marker["event_id"]])
        self.assertEqual(ids(await self.receive(b1, 1)), [marker["event_id"]])
        await self.barrier(b1)
        await self.barrier(b2)
        self.assertEqual(ids(b1.events_received), sent_ids + [marker["event_id"]])
        self.assertEqual(ids(b2.events_received), sent_ids + [marker["event_id"]])

    # ------------------------------------------------------------ 11. durability

    async def test_acked_events_survive_kill9(self) -> None:
        """After SIGKILL and a restart every acked event is still there, in order, and the sender's last_ack_device_seq is its last acked device_seq."""
        server = await start_server(self)
        user = Identity.generate()
        a = await self.online(server, user)
        acks = await gatherResults(
            [a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64()) for _ in range(50)], consumeErrors=True
        )
        self.assertEqual([(x["device_seq"], x["seq"]) for x in acks], [(i, i) for i in range(1, 51)])

        self.assertEqual(await server.kill9(), -9)
        await a.closed
        await server.restart()

        established = await a.connect()
        self.assertEqual(established["last_ack_device_seq"], 50)
        history = await self.history(server, user)
        self.assertEqual([(e["event_id"], e["seq"]) for e in history], [(x["event_id"], x["seq"]) for x in acks])
        after = await a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64())
        self.assertEqual((after["device_seq"], after["seq"]), (51, 51))

    # ------------------------------------------------------------ 12. ack order

    async def test_acks_follow_arrival_order_in_a_mixed_burst(self) -> None:
        """A pipelined burst of valid, invalid, duplicate, conflicting and foreign events is answered with acks in exactly the order the events arrived."""
        server = await self.start()
        user = Identity.generate()
        b = await self.online(server, user)
        a = await self.online(server, user)
        p = new_id()
        await a.send_event(stream_id=STREAM, type=TYPE, encrypted_payload=b64(), event_id=p, device_seq=1)
        v1, v2, v3, v4, v5, i1, i2 = (new_id() for _ in range(7))
        files = "files:main:" + new_id()
        burst: List[Tuple[Dict[str, Any], Optional[Tuple[Any, ...]]]] = [
            (self.raw_event(a, 2, v1), (2, v1, 2, 2, False)),
            (self.raw_event(a, 3, i1, stream_id="bad stream"), (3, i1, None, None, True)),
            (self.raw_event(a, 1, p), (1, p, 1, 1, False)),  # duplicate of a stored event
            (self.raw_event(a, 4, device_id=b.device_id), None),  # foreign: no ack
            (self.raw_event(a, 5, v2, stream_id=files), (5, v2, 3, 1, False)),
            (self.raw_event(a, 6, v1), (6, v1, None, None, True)),  # conflict: v1's id, another device_seq
            (self.raw_event(a, "7"), None),  # no integer device_seq: no ack
            (self.raw_event(a, 5, v2, stream_id=files), (5, v2, 3, 1, False)),  # duplicate within the burst
            (self.raw_event(a, 8, i2, ttl=now_ms() - 600_000), (8, i2, None, None, True)),
            (self.raw_event(a, 9, v3), (9, v3, 4, 3, False)),
            (self.raw_event(a, 2, v4), (2, v4, None, None, True)),  # conflict: v1's device_seq, another id
            (self.raw_event(a, 10, v5), (10, v5, 5, 4, False)),
        ]
        expected = [want for _, want in burst if want is not None]
        mark = len(a.messages)
        for event, _ in burst:
            self.send_raw_event(a, event)
        acks = await self.wait_acks(a, mark, len(expected))
        self.assertEqual([ack_summary(x) for x in acks], expected)

        await self.receive(b, 5)
        await self.barrier(b)
        self.assertEqual(ids(b.events_received), [p, v1, v2, v3, v5])


class V1EventTestsSQLite(V1EventTests, SQLiteMixin, TestCase):
    """V1EventTests on the embedded SQLite storage."""


class V1EventTestsPostgres(V1EventTests, PostgresMixin, TestCase):
    """V1EventTests on PostgreSQL."""
