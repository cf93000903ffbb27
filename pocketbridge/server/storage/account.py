"""
The account routes' store: the user profile and account deletion (the events
page over HTTP is ``EventStore.events_page``).

Every ``_txn_*`` function runs in a database thread inside one transaction,
touches only its cursor and is safe to retry. Times are ms since the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

from twisted.internet.defer import Deferred

from pocketbridge.server.storage.base import BaseStore, Txn

PROFILE_COLUMNS = "user_id, display_name, email, avatar_url, preferences, onboarding_completed, created_at, updated_at"
# Columns an update may set (names never come from a request).
PROFILE_SETTABLE = ("display_name", "email", "preferences", "onboarding_completed")


@dataclass(frozen=True)
class Profile:
    """A row of ``profiles``; ``preferences`` is the stored JSON text."""

    user_id: str
    display_name: Optional[str]
    email: Optional[str]
    avatar_url: Optional[str]
    preferences: str
    onboarding_completed: bool
    created_at: int
    updated_at: int


@dataclass(frozen=True)
class Deleted:
    """What ``delete_account`` removed."""

    devices: int
    events: int


def _profile(row: Sequence[Any]) -> Profile:
    return Profile(row[0], row[1], row[2], row[3], row[4], bool(row[5]), int(row[6]), int(row[7]))


class AccountStore(BaseStore):
    """The ``profiles`` table, and deleting everything of a user."""

    # -------------------------------------------------------------- profile

    def get_profile(self, user_id: str) -> "Deferred[Optional[Profile]]":
        """The user's profile, or None."""
        return self.run("get_profile", self._txn_get_profile, user_id)

    def _txn_get_profile(self, txn: Txn, user_id: str) -> Optional[Profile]:
        self._execute(txn, "SELECT " + PROFILE_COLUMNS + " FROM profiles WHERE user_id = ?", (user_id,))
        row = txn.fetchone()
        return _profile(row) if row else None

    def update_profile(
        self, user_id: str, changes: Dict[str, Any], now: int, require_user: bool
    ) -> "Deferred[Optional[Profile]]":
        """
        Create the profile if absent (empty), apply ``changes`` (keys from
        ``PROFILE_SETTABLE``; ``preferences`` as JSON text) and fire with the
        result. With ``require_user``, fires None instead when the user has no
        account row: the users row is locked first (PostgreSQL), so a profile
        written concurrently with the account's deletion is never left behind.
        """
        return self.run("update_profile", self._txn_update_profile, user_id, dict(changes), now, require_user)

    def _txn_update_profile(
        self, txn: Txn, user_id: str, changes: Dict[str, Any], now: int, require_user: bool
    ) -> Optional[Profile]:
        self._execute(txn, "SELECT user_id FROM users WHERE user_id = ?" + self.lock_suffix, (user_id,))
        if txn.fetchone() is None and require_user:
            return None
        self._execute(
            txn,
            "INSERT INTO profiles (" + PROFILE_COLUMNS + ") VALUES (?, NULL, NULL, NULL, '{}', 0, ?, ?)"
            " ON CONFLICT (user_id) DO NOTHING",
            (user_id, now, now),
        )
        columns = [c for c in PROFILE_SETTABLE if c in changes]
        if columns:
            assignments = ", ".join(c + " = ?" for c in columns)
            self._execute(
                txn, "UPDATE profiles SET " + assignments + ", updated_at = ? WHERE user_id = ?",
                [changes[c] for c in columns] + [now, user_id],
            )
        return self._txn_get_profile(txn, user_id)

    # -------------------------------------------------------------- deletion

    def delete_account(self, user_id: str) -> "Deferred[Optional[Deleted]]":
        """
        Delete the user's devices, events, streams, pairing records, profile
        and users row in one transaction that first takes the user's counter
        lock (the row the writer locks), so no event commits half-way through.
        Fires None when there is no account.
        """
        return self.run("delete_account", self._txn_delete_account, user_id)

    def _txn_delete_account(self, txn: Txn, user_id: str) -> Optional[Deleted]:
        self._execute(txn, "SELECT user_id FROM users WHERE user_id = ?" + self.lock_suffix, (user_id,))
        if txn.fetchone() is None:
            return None
        self._execute(txn, "DELETE FROM devices WHERE user_id = ?", (user_id,))
        devices = max(0, int(txn.rowcount))
        self._execute(txn, "DELETE FROM events WHERE user_id = ?", (user_id,))
        events = max(0, int(txn.rowcount))
        for table in ("streams", "pairing", "profiles", "users"):
            self._execute(txn, "DELETE FROM " + table + " WHERE user_id = ?", (user_id,))
        return Deleted(devices, events)
