"""
Reading events: a user's head, the catch-up pages of the WebSocket sessions,
gap filling for the delivery hub and the events page of the REST API.

Every ``_txn_*`` function runs in a database thread inside one transaction,
touches only its cursor and is safe to retry. Times are ms since the epoch.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred

from pocketbridge.protocol.events import StoredEvent
from pocketbridge.server.storage.base import BaseStore, Txn

EVENT_COLUMNS = (
    "user_id, seq, event_id, device_id, device_seq, stream_id, stream_seq, type, encrypted_payload, ttl, created_at"
)
# Bytes a relayed event adds around its payload, stream_id and type when
# serialized: keys, ids (user 64, event and device 36 each), five integers.
RELAY_OVERHEAD = 400


def stored_event(row: Sequence[Any]) -> StoredEvent:
    """A row of ``EVENT_COLUMNS`` as a StoredEvent."""
    return StoredEvent(
        user_id=row[0],
        seq=int(row[1]),
        event_id=row[2],
        device_id=row[3],
        device_seq=int(row[4]),
        stream_id=row[5],
        stream_seq=int(row[6]),
        type=row[7],
        encrypted_payload=row[8],
        ttl=None if row[9] is None else int(row[9]),
        created_at=int(row[10]),
    )


class EventStore(BaseStore):
    """Reads of ``users`` counters and ``events`` rows."""

    # -------------------------------------------------------------- the user's counters

    def head(self, user_id: str) -> "Deferred[int]":
        """The user's highest committed seq (0 for none)."""
        return self.run("head", self._txn_head, user_id)

    def _txn_head(self, txn: Txn, user_id: str) -> int:
        self._execute(txn, "SELECT head_seq FROM users WHERE user_id = ?", (user_id,))
        row = txn.fetchone()
        return int(row[0]) if row else 0

    def user_state(self, user_id: str) -> "Deferred[Tuple[int, int]]":
        """(head_seq, purged_below_seq) of the user ((0, 0) for none)."""
        return self.run("user_state", self._txn_user_state, user_id)

    def _txn_user_state(self, txn: Txn, user_id: str) -> Tuple[int, int]:
        self._execute(txn, "SELECT head_seq, purged_below_seq FROM users WHERE user_id = ?", (user_id,))
        row = txn.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    # -------------------------------------------------------------- catch-up

    def count_backlog(self, user_id: str, after: int, upto: int, exclude_device: str, now: int) -> "Deferred[int]":
        """Events of other devices with after < seq ≤ upto, not expired at ``now``."""
        return self.run("count_backlog", self._txn_count, user_id, after, upto, exclude_device, now)

    def _txn_count(self, txn: Txn, user_id: str, after: int, upto: int, exclude: str, now: int) -> int:
        self._execute(
            txn,
            "SELECT COUNT(*) FROM events WHERE user_id = ? AND seq > ? AND seq <= ? AND device_id <> ?"
            " AND (ttl IS NULL OR ttl > ?)",
            (user_id, after, upto, exclude, now),
        )
        return int(txn.fetchone()[0])

    def read_page(
        self, user_id: str, after: int, upto: int, exclude_device: Optional[str], limit: int, max_bytes: int, now: int
    ) -> "Deferred[Tuple[List[StoredEvent], bool]]":
        """
        The next page of events with after < seq ≤ upto, in seq order.

        Skips events of ``exclude_device`` and events expired at ``now``. At
        most ``limit`` events and about ``max_bytes`` of serialized JSON, but at
        least one. Fires with (events, more_remaining).
        """
        return self.run("read_page", self._txn_read_page, user_id, after, upto, exclude_device, limit, max_bytes, now)

    def _txn_read_page(
        self, txn: Txn, user_id: str, after: int, upto: int, exclude: Optional[str], limit: int, max_bytes: int, now: int,
        payload_only: bool = False,
    ) -> Tuple[List[StoredEvent], bool]:
        """
        ``read_page`` in a transaction. ``max_bytes`` bounds the serialized
        events, or with ``payload_only`` just the sum of their payloads.
        """
        where = "user_id = ? AND seq > ? AND seq <= ? AND (ttl IS NULL OR ttl > ?)"
        tail: List[Any] = [now]
        if exclude is not None:
            where += " AND device_id <> ?"
            tail.append(exclude)
        # Sizes first, so a page of large events never loads more than it sends.
        # Read them in growing seq windows: each statement scans a bounded
        # range whatever plan the database picks (without statistics a plain
        # "seq > after ORDER BY seq LIMIT" can scan the user's whole backlog).
        sizes: List[Any] = []
        low, window = after, max(2 * (limit + 1), 256)
        while True:
            high = min(upto, low + window)
            self._execute(
                txn, "SELECT seq, payload_size, LENGTH(stream_id) + LENGTH(type) FROM events WHERE " + where
                + " ORDER BY seq LIMIT ?", [user_id, low, high] + tail + [limit + 1 - len(sizes)])
            sizes.extend(txn.fetchall())
            if len(sizes) > limit or high >= upto:
                break
            low, window = high, window * 2
        params: List[Any] = [user_id, after, upto] + tail
        if not sizes:
            return [], False
        total = 0
        last = None
        count = 0
        for seq, size, ids in sizes[:limit]:
            cost = int(size) if payload_only else int(size) + int(ids) + RELAY_OVERHEAD
            if count and total + cost > max_bytes:
                break
            total += cost
            last = int(seq)
            count += 1
        more = len(sizes) > count
        self._execute(
            txn,
            "SELECT " + EVENT_COLUMNS + " FROM events WHERE " + where + " AND seq <= ? ORDER BY seq",
            params + [last],
        )
        return [stored_event(r) for r in txn.fetchall()], more

    def read_range(self, user_id: str, after: int, upto: int) -> "Deferred[List[StoredEvent]]":
        """Every event with after < seq ≤ upto (all devices, expired included), for gap filling."""
        return self.run("read_range", self._txn_read_range, user_id, after, upto)

    def _txn_read_range(self, txn: Txn, user_id: str, after: int, upto: int) -> List[StoredEvent]:
        self._execute(
            txn,
            "SELECT " + EVENT_COLUMNS + " FROM events WHERE user_id = ? AND seq > ? AND seq <= ? ORDER BY seq",
            (user_id, after, upto),
        )
        return [stored_event(r) for r in txn.fetchall()]

    # -------------------------------------------------------------- events over HTTP

    def events_page(
        self, user_id: str, after: int, limit: int, max_payload: int, now: int
    ) -> "Deferred[Tuple[List[StoredEvent], bool]]":
        """
        The user's unexpired events with seq > ``after`` in seq order (every
        device's): at most ``limit``, and no more than ``max_payload``
        characters of ``encrypted_payload`` in total unless the first event
        alone is larger. Fires with (events, more unexpired events follow).
        """
        return self.run("events_page", self._txn_events_page, user_id, after, limit, max_payload, now)

    def _txn_events_page(
        self, txn: Txn, user_id: str, after: int, limit: int, max_payload: int, now: int
    ) -> Tuple[List[StoredEvent], bool]:
        # The catch-up page reader, over every device's events up to the head,
        # bounded by payload bytes only.
        head, _ = self._txn_user_state(txn, user_id)
        return self._txn_read_page(txn, user_id, after, head, None, limit, max_payload, now, payload_only=True)
