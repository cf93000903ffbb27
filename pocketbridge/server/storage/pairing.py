"""
The v1 pairing routes' store.

The ``pairing`` table holds one row per live code: ``kind`` (``v1`` here),
the storing user and the sealed record. The sealing happens above this
layer; these queries never see plaintext and never raise on a taken code
(a constraint error's message would carry the code into the log).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

from twisted.internet.defer import Deferred

from pocketbridge.server.storage.base import BaseStore, StrEnum, Txn

#: The cluster-wide lock of the expiry job's batches (the job's name: unchanged across versions).
EXPIRY_LOCK = "pairing_expiry"


def blob(value: Any) -> bytes:
    """A BLOB/BYTEA column value as bytes (psycopg2 returns memoryview)."""
    if isinstance(value, memoryview):
        return value.tobytes()
    return bytes(value)


class PairingStored(StrEnum):
    """Whether ``store_pairing`` stored the record."""

    STORED = "stored"
    CONFLICT = "conflict"  # the code is live for someone


@dataclass(frozen=True)
class StoreResult:
    """What ``store_pairing`` did: STORED, or CONFLICT with the holder (None if it vanished)."""

    outcome: PairingStored
    holder: Optional[str] = None


class PairingStore(BaseStore):
    """The ``pairing`` table (v1 codes)."""

    # -------------------------------------------------------------- store

    def store_pairing(
        self, code: str, user_id: str, kind: str, sealed: bytes, now: int, expires_at: int
    ) -> "Deferred[StoreResult]":
        """
        Insert a pairing record unless the code is live (unexpired) for anyone.

        An expired row under the code is replaced. Safe to retry; concurrent
        stores of one code: exactly one gets ``stored``.
        """
        return self.run("store_pairing", self._txn_store_pairing, code, user_id, kind, sealed, now, expires_at)

    def _txn_store_pairing(
        self, txn: Txn, code: str, user_id: str, kind: str, sealed: bytes, now: int, expires_at: int
    ) -> StoreResult:
        self._execute(txn, "DELETE FROM pairing WHERE code = ? AND expires_at <= ?", (code, now))
        self._execute(
            txn,
            "INSERT INTO pairing (code, user_id, kind, sealed, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (code) DO NOTHING",
            (code, user_id, kind, bytes(sealed), now, expires_at),
        )
        if txn.rowcount == 1:
            return StoreResult(PairingStored.STORED)
        self._execute(txn, "SELECT user_id FROM pairing WHERE code = ?", (code,))
        row = txn.fetchone()
        return StoreResult(PairingStored.CONFLICT, row[0] if row else None)

    # -------------------------------------------------------------- redeem

    def redeem_pairing(self, code: str, kind: str, now: int) -> "Deferred[Optional[Tuple[str, bytes]]]":
        """
        Delete and return ``(user_id, sealed)`` of the live record of ``kind``
        under ``code``, or None. One statement, so of concurrent calls at
        most one gets the record. An expired record under the code is
        deleted on the way.
        """
        return self.run("redeem_pairing", self._txn_redeem_pairing, code, kind, now)

    def _txn_redeem_pairing(self, txn: Txn, code: str, kind: str, now: int) -> Optional[Tuple[str, bytes]]:
        self._execute(
            txn, "DELETE FROM pairing WHERE code = ? AND kind = ? AND expires_at > ? RETURNING user_id, sealed",
            (code, kind, now),
        )
        row = txn.fetchone()
        if row is None:
            self._execute(txn, "DELETE FROM pairing WHERE code = ? AND kind = ? AND expires_at <= ?", (code, kind, now))
            return None
        return row[0], blob(row[1])

    # -------------------------------------------------------------- counts and expiry

    def count_live_pairing(self, now: int) -> "Deferred[int]":
        """How many v1 pairing records are unexpired at ``now`` (v2 mailboxes: ``mailbox_live_count``)."""
        return self.run("count_live_pairing", self._txn_count_live_pairing, now)

    def _txn_count_live_pairing(self, txn: Txn, now: int) -> int:
        self._execute(txn, "SELECT COUNT(*) FROM pairing WHERE expires_at > ?", (now,))
        return int(txn.fetchone()[0])

    def delete_expired_pairing(self, now: int, batch: int) -> "Deferred[Optional[int]]":
        """
        One batch of the expiry job: delete up to ``batch`` records expired at
        ``now`` (oldest first) under the job's cluster-wide lock; fires with
        how many, or None when another node holds the lock.
        """
        return self.run_locked(EXPIRY_LOCK, self._txn_delete_expired_pairing, now, batch)

    def _txn_delete_expired_pairing(self, txn: Txn, now: int, batch: int) -> int:
        self._execute(
            txn,
            "DELETE FROM pairing WHERE code IN"
            " (SELECT code FROM pairing WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)",
            (now, batch),
        )
        return max(0, int(txn.rowcount))
