"""
SQL for the REST API's devices routes (mixed into ``Storage``; uses its
``run``/``_execute``/``_txn_get_device`` helpers).

Every ``_txn_*`` function runs in a database thread inside one transaction,
touches only its cursor and is safe to retry. Times are ms since the epoch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Sequence

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from pocketbridge.server.storage.base import DeviceState

DEVICE_COLUMNS = (
    "user_id, device_id, name, type, created_at, last_seen, last_device_seq, delivered_seq, revoked_at"
)

# Outcomes of rename_device.
RENAMED = "renamed"
NAME_TAKEN = "conflict"
NOT_FOUND = "not_found"
# Outcomes of revoke_device / unrevoke_device / remove_device.
REVOKED = "revoked"
ALREADY = "already"
UNREVOKED = "unrevoked"
REMOVED = "removed"


def _device(row: Sequence[Any]) -> "DeviceState":
    from pocketbridge.server.storage.base import DeviceState

    return DeviceState(
        row[0], row[1], row[2], row[3], int(row[4]), int(row[5]), int(row[6]), int(row[7]),
        None if row[8] is None else int(row[8]),
    )


class DevicesQueries:
    """Queries of the devices routes. Each public method returns a Deferred via self.run."""

    if TYPE_CHECKING:  # provided by Storage
        lock_suffix: str

        def run(self, description: str, fn: Any, *args: Any) -> "Deferred[Any]": ...

        def _execute(self, txn: Any, sql: str, params: Sequence[Any] = ()) -> None: ...

        def _txn_get_device(self, txn: Any, user_id: str, device_id: str) -> "Optional[DeviceState]": ...

    # ---------------------------------------------------------------- reading

    def list_devices(self, user_id: str, include_revoked: bool = False) -> "Deferred[List[DeviceState]]":
        """The user's devices (revoked ones only with ``include_revoked``), in no particular order."""
        return self.run("list_devices", self._txn_list_devices, user_id, include_revoked)

    def _txn_list_devices(self, txn: Any, user_id: str, include_revoked: bool) -> "List[DeviceState]":
        sql = "SELECT " + DEVICE_COLUMNS + " FROM devices WHERE user_id = ?"
        if not include_revoked:
            sql += " AND revoked_at IS NULL"
        self._execute(txn, sql + " ORDER BY device_id", (user_id,))
        return [_device(r) for r in txn.fetchall()]

    # ---------------------------------------------------------------- renaming

    def rename_device(self, user_id: str, device_id: str, name: str) -> "Deferred[str]":
        """
        Set a non-revoked device's name unless another non-revoked device of the
        user has exactly that name. Fires with ``renamed``, ``conflict`` or
        ``not_found`` (unknown or revoked). The check and the update are one
        transaction holding the user's device rows (PostgreSQL: row locks), so
        two concurrent renames cannot both take the same name.
        """
        return self.run("rename_device", self._txn_rename, user_id, device_id, name)

    def _txn_rename(self, txn: Any, user_id: str, device_id: str, name: str) -> str:
        # Lock every device row of the user, in key order (the order the
        # cursor and event writers use), so the duplicate check stays true
        # until commit.
        self._execute(
            txn,
            "SELECT device_id, name, revoked_at FROM devices WHERE user_id = ? ORDER BY device_id" + self.lock_suffix,
            (user_id,),
        )
        rows = txn.fetchall()
        target = [r for r in rows if r[0] == device_id and r[2] is None]
        if not target:
            return NOT_FOUND
        if any(r[0] != device_id and r[2] is None and r[1] == name for r in rows):
            return NAME_TAKEN
        self._execute(
            txn, "UPDATE devices SET name = ? WHERE user_id = ? AND device_id = ? AND revoked_at IS NULL",
            (name, user_id, device_id),
        )
        return RENAMED

    # ---------------------------------------------------------------- revocation

    def revoke_device(self, user_id: str, device_id: str, now: int) -> "Deferred[str]":
        """
        Tombstone a device (``revoked_at`` = ``now``); its events stay. Fires with
        ``revoked``, ``already`` (it was revoked before; the first time is kept)
        or ``not_found``. Later handshakes of the device are refused and it is
        never re-created (PROTOCOL.md §4.4).
        """
        return self.run("revoke_device", self._txn_revoke, user_id, device_id, now)

    def _txn_revoke(self, txn: Any, user_id: str, device_id: str, now: int) -> str:
        self._execute(
            txn, "UPDATE devices SET revoked_at = ? WHERE user_id = ? AND device_id = ? AND revoked_at IS NULL",
            (now, user_id, device_id),
        )
        if txn.rowcount == 1:
            return REVOKED
        return ALREADY if self._txn_get_device(txn, user_id, device_id) is not None else NOT_FOUND

    def unrevoke_device(self, user_id: str, device_id: str) -> "Deferred[str]":
        """
        Clear a device's tombstone so it may connect again. Fires with
        ``unrevoked``, ``already`` (it was not revoked) or ``not_found``.
        """
        return self.run("unrevoke_device", self._txn_unrevoke, user_id, device_id)

    def _txn_unrevoke(self, txn: Any, user_id: str, device_id: str) -> str:
        self._execute(
            txn, "UPDATE devices SET revoked_at = NULL WHERE user_id = ? AND device_id = ? AND revoked_at IS NOT NULL",
            (user_id, device_id),
        )
        if txn.rowcount == 1:
            return UNREVOKED
        return ALREADY if self._txn_get_device(txn, user_id, device_id) is not None else NOT_FOUND

    def remove_device(self, user_id: str, device_id: str) -> "Deferred[str]":
        """
        The legacy soft revocation (API.md §1.2): delete a non-revoked device's
        row without a tombstone, so the device may register again; its events
        stay. Fires with ``removed``, ``already`` (the device is tombstoned: the
        tombstone is kept, an unauthenticated legacy call must not undo a
        revocation) or ``not_found``.
        """
        return self.run("remove_device", self._txn_remove, user_id, device_id)

    def _txn_remove(self, txn: Any, user_id: str, device_id: str) -> str:
        self._execute(
            txn, "DELETE FROM devices WHERE user_id = ? AND device_id = ? AND revoked_at IS NULL",
            (user_id, device_id),
        )
        if txn.rowcount == 1:
            return REMOVED
        return ALREADY if self._txn_get_device(txn, user_id, device_id) is not None else NOT_FOUND
