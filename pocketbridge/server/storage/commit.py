"""
The write path: one transaction stores a batch of events from many users
(ARCHITECTURE.md, the event path step 2) and says per event what happened.

Every ``_txn_*`` function runs in a database thread inside one transaction,
touches only its cursor and is safe to retry. Times are ms since the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred

from pocketbridge.protocol.events import NewEvent, StoredEvent
from pocketbridge.server.storage.base import BaseStore, StrEnum, Txn
from pocketbridge.server.storage.events import EVENT_COLUMNS, stored_event

# Rows per set-based lookup statement (keeps the parameter count far below driver limits).
SET_CHUNK = 500


class OutcomeKind(StrEnum):
    """What the writer did with one event (the text is the metric label)."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # committed before, with the same event_id and device_seq
    CONFLICT = "conflict"  # event_id or device_seq already used by another event
    QUOTA = "quota"  # the user's stored bytes would pass the limit
    NO_USER = "no_user"  # the account was deleted


@dataclass(frozen=True)
class Outcome:
    """
    One event's outcome; ``seq``, ``stream_seq`` and ``stored`` are set for
    ``stored`` and ``duplicate``. ``kind`` may be given as its text (fakes
    in tests do); it is always an ``OutcomeKind`` afterwards.
    """

    kind: OutcomeKind
    seq: Optional[int] = None
    stream_seq: Optional[int] = None
    stored: Optional[StoredEvent] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", OutcomeKind(self.kind))


def _in(n: int) -> str:
    return "(" + ",".join("?" * n) + ")"


# Set-based lookups by key: the keys are a VALUES list joined to the table,
# the keys first. "k CROSS JOIN table" fixes that join order in SQLite (one
# index search per key: a row-value "IN (VALUES …)" is a full table scan in
# SQLite 3.40); PostgreSQL ignores the hint and picks its own plan, a nested
# loop over the index once the table is large.

def _values(name: str, columns: str, width: int, n: int) -> str:
    return "{}({}) AS (VALUES {})".format(name, columns, ",".join(["(" + ", ".join("?" * width) + ")"] * n))


def lookup_sql(pairs: int, triples: int, streams: int) -> str:
    """
    One statement for everything a batch reads under its users' locks: the
    stored events matching ``pairs`` (user_id, event_id) or ``triples``
    (user_id, device_id, device_seq), tagged 'e', and the heads of ``streams``
    (user_id, stream_id), tagged 's' (the head in the ``seq`` column, the
    other event columns NULL). One round trip instead of two.
    """
    names = [c.strip() for c in EVENT_COLUMNS.split(",")]
    event_cols = ", ".join("e." + c for c in names)
    stream_cols = ", ".join({"user_id": "st.user_id", "seq": "st.head", "stream_id": "st.stream_id"}.get(c, "NULL")
                            for c in names)
    ctes, parts = [], []
    if pairs:
        ctes.append(_values("eid", "u, e", 2, pairs))
        parts.append("SELECT 'e', " + event_cols + " FROM eid CROSS JOIN events e"
                     " WHERE e.user_id = eid.u AND e.event_id = eid.e")
    if triples:
        ctes.append(_values("dseq", "u, d, s", 3, triples))
        parts.append("SELECT 'e', " + event_cols + " FROM dseq CROSS JOIN events e"
                     " WHERE e.user_id = dseq.u AND e.device_id = dseq.d AND e.device_seq = dseq.s")
    if streams:
        ctes.append(_values("k", "u, s", 2, streams))
        parts.append("SELECT 's', " + stream_cols + " FROM k CROSS JOIN streams st"
                     " WHERE st.user_id = k.u AND st.stream_id = k.s")
    return "WITH " + ", ".join(ctes) + " " + " UNION ALL ".join(parts)


#: What ``_lookup`` finds: events by (user, event_id), by (user, device, device_seq), stream heads.
Lookup = Tuple[
    Dict[Tuple[str, str], Tuple[Any, ...]],
    Dict[Tuple[str, str, int], Tuple[Any, ...]],
    Dict[Tuple[str, str], int],
]


class CommitStore(BaseStore):
    """``commit_batch``; PostgreSQL overrides the bulk writes with one statement each."""

    def commit_batch(self, events: List[NewEvent], now: int, max_user_bytes: int) -> "Deferred[List[Outcome]]":
        """
        Store a batch in one transaction; fires with one Outcome per event, in order.

        Duplicates and conflicts are decided under each user's row lock, before
        any seq is allocated (ARCHITECTURE.md, the event path step 2).
        """
        return self.run("commit_batch", self._txn_commit, events, now, max_user_bytes)

    def _txn_commit(self, txn: Txn, events: List[NewEvent], now: int, max_user_bytes: int) -> List[Outcome]:
        by_user: Dict[str, List[int]] = {}
        for i, ev in enumerate(events):
            by_user.setdefault(ev.user_id, []).append(i)
        users = sorted(by_user)
        # Lock the users' counter rows in a fixed order (no deadlock between nodes).
        self._execute(
            txn,
            "SELECT user_id, head_seq, stored_bytes FROM users WHERE user_id IN " + _in(len(users))
            + " ORDER BY user_id" + self.lock_suffix,
            users,
        )
        heads = {r[0]: [int(r[1]), int(r[2])] for r in txn.fetchall()}
        outcomes: List[Optional[Outcome]] = [None] * len(events)
        inserts: List[Tuple[Any, ...]] = []
        device_max: Dict[Tuple[str, str], int] = {}
        stream_heads_changed: Dict[Tuple[str, str], int] = {}
        known = [ev for ev in events if ev.user_id in heads]
        # One statement each for the whole batch, not one per user: at load a
        # batch holds many users, and every statement is a round trip.
        by_eid, by_dseq, streams = self._lookup(txn, known)
        for user in users:
            idx = by_user[user]
            if user not in heads:
                for i in idx:
                    outcomes[i] = Outcome(OutcomeKind.NO_USER)
                continue
            head, stored_bytes = heads[user]
            for i in idx:
                ev = events[i]
                prior = by_eid.get((user, ev.event_id))
                same_seq = by_dseq.get((user, ev.device_id, ev.device_seq))
                if prior is not None or same_seq is not None:
                    if prior is not None and prior[0] == ev.device_id and prior[1] == ev.device_seq:
                        outcomes[i] = Outcome(OutcomeKind.DUPLICATE, prior[2], prior[3], prior[4])
                    else:
                        outcomes[i] = Outcome(OutcomeKind.CONFLICT)
                    continue
                if stored_bytes + ev.payload_size > max_user_bytes:
                    outcomes[i] = Outcome(OutcomeKind.QUOTA)
                    continue
                head += 1
                stored_bytes += ev.payload_size
                sseq = streams.get((user, ev.stream_id), 0) + 1
                streams[(user, ev.stream_id)] = sseq
                stream_heads_changed[(user, ev.stream_id)] = sseq
                row = StoredEvent(
                    user, head, ev.event_id, ev.device_id, ev.device_seq, ev.stream_id, sseq,
                    ev.type, ev.encrypted_payload, ev.ttl, now,
                )
                # Later events in this batch see this one as existing.
                entry = (ev.device_id, ev.device_seq, head, sseq, row)
                by_eid[(user, ev.event_id)] = entry
                by_dseq[(user, ev.device_id, ev.device_seq)] = entry
                outcomes[i] = Outcome(OutcomeKind.STORED, head, sseq, row)
                inserts.append(
                    (user, head, ev.event_id, ev.device_id, ev.device_seq, ev.stream_id, sseq, ev.type,
                     ev.encrypted_payload, ev.payload_size, ev.ttl, now)
                )
                key = (user, ev.device_id)
                device_max[key] = max(device_max.get(key, 0), ev.device_seq)
            heads[user] = [head, stored_bytes]
        if inserts:
            self._write_batch(
                txn, inserts,
                [(u, heads[u][0], heads[u][1], now) for u in users if u in heads],
                [(u, st, h) for (u, st), h in sorted(stream_heads_changed.items())],
                [(u, d, m, now) for (u, d), m in sorted(device_max.items())],
            )
        return [o if o is not None else Outcome(OutcomeKind.CONFLICT) for o in outcomes]

    # Bulk writes of a batch; PostgreSQL overrides them with one statement for all four.

    def _write_batch(
        self, txn: Txn, inserts: List[Tuple[Any, ...]], users: List[Tuple[str, int, int, int]],
        streams: List[Tuple[str, str, int]], devices: List[Tuple[str, str, int, int]],
    ) -> None:
        """The batch's events, its users' counters, its streams' heads and its devices' last seqs."""
        self._insert_events(txn, inserts)
        self._update_users(txn, users)
        self._upsert_streams(txn, streams)
        self._update_devices(txn, devices)

    def _update_users(self, txn: Txn, rows: List[Tuple[str, int, int, int]]) -> None:
        """(user_id, head_seq, stored_bytes, last_activity) per user."""
        self._executemany(
            txn, "UPDATE users SET head_seq = ?, stored_bytes = ?, last_activity = ? WHERE user_id = ?",
            [(h, b, t, u) for u, h, b, t in rows])

    def _upsert_streams(self, txn: Txn, rows: List[Tuple[str, str, int]]) -> None:
        """(user_id, stream_id, head) per changed stream."""
        self._executemany(
            txn, "INSERT INTO streams (user_id, stream_id, head) VALUES (?, ?, ?)"
            " ON CONFLICT (user_id, stream_id) DO UPDATE SET head = excluded.head", rows)

    def _update_devices(self, txn: Txn, rows: List[Tuple[str, str, int, int]]) -> None:
        """(user_id, device_id, highest device_seq stored, now) per sending device."""
        self._executemany(
            txn, "UPDATE devices SET last_device_seq = " + self.greatest("last_device_seq", "?")
            + ", last_seen = ? WHERE user_id = ? AND device_id = ?", [(m, t, u, d) for u, d, m, t in rows])

    def _insert_events(self, txn: Txn, rows: List[Tuple[Any, ...]]) -> None:
        self._executemany(
            txn,
            "INSERT INTO events (user_id, seq, event_id, device_id, device_seq, stream_id, stream_seq, type,"
            " encrypted_payload, payload_size, ttl, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    def _lookup(self, txn: Txn, events: List[NewEvent]) -> Lookup:
        """Stored events sharing an (user, event_id) or (user, device, device_seq) with the batch, and its streams' heads."""
        by_eid: Dict[Tuple[str, str], Tuple[Any, ...]] = {}
        by_dseq: Dict[Tuple[str, str, int], Tuple[Any, ...]] = {}
        heads: Dict[Tuple[str, str], int] = {}
        if not events:
            return by_eid, by_dseq, heads
        pairs = sorted({(e.user_id, e.event_id) for e in events})
        triples = sorted({(e.user_id, e.device_id, e.device_seq) for e in events})
        streams = sorted({(e.user_id, e.stream_id) for e in events})
        for chunk in range(0, max(len(pairs), len(triples), len(streams)), SET_CHUNK):
            p = pairs[chunk:chunk + SET_CHUNK]
            t = triples[chunk:chunk + SET_CHUNK]
            s = streams[chunk:chunk + SET_CHUNK]
            self._execute(txn, lookup_sql(len(p), len(t), len(s)),
                          [x for pair in p for x in pair] + [x for triple in t for x in triple]
                          + [x for pair in s for x in pair])
            for r in txn.fetchall():
                if r[0] == "s":
                    heads[(r[1], r[6])] = int(r[2])
                    continue
                st = stored_event(r[1:])
                entry = (st.device_id, st.device_seq, st.seq, st.stream_seq, st)
                by_eid[(st.user_id, st.event_id)] = entry
                by_dseq[(st.user_id, st.device_id, st.device_seq)] = entry
        return by_eid, by_dseq, heads
