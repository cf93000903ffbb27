"""
The background jobs' deletions of events (TTL and retention): bounded
batches, each under the job's cluster-wide lock, safe to run on every node.
The pairing stores have their own expiry batches (``delete_expired_pairing``,
``delete_expired_mailboxes``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from twisted.internet.defer import Deferred

from pocketbridge.protocol.events import TTL_GRACE_MS
from pocketbridge.server.storage.base import BaseStore, Txn

#: The cluster-wide locks of the batches (the jobs' names: unchanged across versions).
EVENT_TTL_LOCK = "event_ttl"
RETENTION_LOCK = "retention"


class JobStore(BaseStore):
    """
    Each method deletes at most ``batch`` rows in one transaction and fires
    with how many, or None when another node holds the job's lock (it does
    this run).
    """

    def delete_expired_events(self, now: int, batch: int) -> "Deferred[Optional[int]]":
        """Delete events whose ttl passed more than ``TTL_GRACE_MS`` before ``now`` (oldest ttl first)."""
        return self.run_locked(EVENT_TTL_LOCK, self._txn_delete_expired_events, now, batch)

    def _txn_delete_expired_events(self, txn: Txn, now: int, batch: int) -> int:
        self._execute(
            txn, "SELECT user_id, seq, payload_size FROM events WHERE ttl IS NOT NULL AND ttl < ? ORDER BY ttl LIMIT ?",
            (now - TTL_GRACE_MS, batch),
        )
        return self._delete_rows(txn, txn.fetchall(), raise_purged=False)

    def apply_retention(self, cutoff: int, batch: int) -> "Deferred[Optional[int]]":
        """Delete events created before ``cutoff`` (oldest first) and raise the users' ``purged_below_seq`` past them."""
        return self.run_locked(RETENTION_LOCK, self._txn_apply_retention, cutoff, batch)

    def _txn_apply_retention(self, txn: Txn, cutoff: int, batch: int) -> int:
        self._execute(
            txn, "SELECT user_id, seq, payload_size FROM events WHERE created_at < ? ORDER BY created_at LIMIT ?",
            (cutoff, batch),
        )
        return self._delete_rows(txn, txn.fetchall(), raise_purged=True)

    def _delete_rows(self, txn: Txn, rows: List[Sequence[Any]], raise_purged: bool) -> int:
        """Delete (user_id, seq, payload_size) rows and give their bytes back to the users' quota."""
        if not rows:
            return 0
        freed: Dict[str, int] = {}
        top: Dict[str, int] = {}
        for user, seq, size in rows:
            freed[user] = freed.get(user, 0) + int(size)
            top[user] = max(top.get(user, 0), int(seq))
        self._executemany(txn, "DELETE FROM events WHERE user_id = ? AND seq = ?", [(u, int(s)) for u, s, _ in rows])
        self._executemany(
            txn, "UPDATE users SET stored_bytes = stored_bytes - ? WHERE user_id = ?",
            [(n, u) for u, n in sorted(freed.items())])
        if raise_purged:
            greatest = self.greatest("purged_below_seq", "?")
            self._executemany(
                txn, "UPDATE users SET purged_below_seq = " + greatest + " WHERE user_id = ?",
                [(s + 1, u) for u, s in sorted(top.items())])
        return len(rows)
