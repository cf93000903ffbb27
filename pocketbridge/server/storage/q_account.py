"""
SQL for the account routes (mixed into Storage; uses its run/_execute helpers):
the user profile, account deletion and events over HTTP.

Every ``_txn_*`` function runs in a database thread inside one transaction,
touches only its cursor and is safe to retry. Times are ms since the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from pocketbridge.protocol.events import StoredEvent

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


class AccountQueries:
    """Queries of the account routes. Each public method returns a Deferred via self.run."""

    if TYPE_CHECKING:  # provided by Storage
        lock_suffix: str

        def run(self, description: str, fn: Any, *args: Any) -> "Deferred[Any]": ...

        def _execute(self, txn: Any, sql: str, params: Sequence[Any] = ()) -> None: ...

    # -------------------------------------------------------------- profile

    def get_profile(self, user_id: str) -> "Deferred[Optional[Profile]]":
        """The user's profile, or None."""
        return self.run("get_profile", self._txn_get_profile, user_id)

    def _txn_get_profile(self, txn: Any, user_id: str) -> Optional[Profile]:
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
        self, txn: Any, user_id: str, changes: Dict[str, Any], now: int, require_user: bool
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

    def _txn_delete_account(self, txn: Any, user_id: str) -> Optional[Deleted]:
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
        self, txn: Any, user_id: str, after: int, limit: int, max_payload: int, now: int
    ) -> "Tuple[List[StoredEvent], bool]":
        # The catch-up page reader, over every device's events up to the head,
        # bounded by payload bytes only.
        head, _ = self._txn_user_state(txn, user_id)  # type: ignore[attr-defined]
        return self._txn_read_page(  # type: ignore[attr-defined,no-any-return]
            txn, user_id, after, head, None, limit, max_payload, now, payload_only=True)
