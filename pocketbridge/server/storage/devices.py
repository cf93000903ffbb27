"""
Devices: registration at the handshake, delivery cursors, ``last_seen``, and
the REST API's devices routes (list, rename, revoke, unrevoke, remove).

Every ``_txn_*`` function runs in a database thread inside one transaction,
touches only its cursor and is safe to retry. Times are ms since the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred

from pocketbridge.server.storage.base import BaseStore, StrEnum, Txn

DEVICE_COLUMNS = (
    "user_id, device_id, name, type, created_at, last_seen, last_device_seq, delivered_seq, revoked_at"
)


@dataclass(frozen=True)
class DeviceState:
    """A device row as the gateway needs it."""

    user_id: str
    device_id: str
    name: Optional[str]
    type: str
    created_at: int
    last_seen: int
    last_device_seq: int
    delivered_seq: int
    revoked_at: Optional[int]


class DeviceChange(StrEnum):
    """What rename/revoke/unrevoke/remove did (the text is what the routes log and count)."""

    RENAMED = "renamed"
    NAME_TAKEN = "conflict"  # another live device of the user has that name
    NOT_FOUND = "not_found"  # unknown (or, for rename and remove, revoked)
    REVOKED = "revoked"
    UNREVOKED = "unrevoked"
    REMOVED = "removed"
    ALREADY = "already"  # revoked before (revoke, remove) or not revoked (unrevoke): nothing changed


# The members under their own names, as the routes import them.
RENAMED = DeviceChange.RENAMED
NAME_TAKEN = DeviceChange.NAME_TAKEN
NOT_FOUND = DeviceChange.NOT_FOUND
REVOKED = DeviceChange.REVOKED
UNREVOKED = DeviceChange.UNREVOKED
REMOVED = DeviceChange.REMOVED
ALREADY = DeviceChange.ALREADY


def _device(row: Sequence[Any]) -> DeviceState:
    return DeviceState(
        row[0], row[1], row[2], row[3], int(row[4]), int(row[5]), int(row[6]), int(row[7]),
        None if row[8] is None else int(row[8]),
    )


class DeviceStore(BaseStore):
    """The ``devices`` table (and the ``users`` row a first device creates)."""

    # -------------------------------------------------------------- the handshake

    def register_device(
        self, user_id: str, device_id: str, name: Optional[str], dtype: str, now: int
    ) -> "Deferred[Tuple[DeviceState, bool]]":
        """
        Create the user and device rows if absent; fires with (device, created).

        A revoked device is returned as is (never re-created); ``created`` is
        true only for the call whose insert created the device row.
        """
        return self.run("register_device", self._txn_register, user_id, device_id, name, dtype, now)

    def _txn_register(
        self, txn: Txn, user_id: str, device_id: str, name: Optional[str], dtype: str, now: int
    ) -> Tuple[DeviceState, bool]:
        # A returning device (the common case) only reads: no write, so no
        # durable commit on the handshake path. Its last_seen is "now" from
        # presence while it is online and is written when its last socket closes.
        existing = self._txn_get_device(txn, user_id, device_id)
        if existing is not None:
            return existing, False
        self._execute(
            txn,
            "INSERT INTO users (user_id, head_seq, purged_below_seq, stored_bytes, created_at, last_activity)"
            " VALUES (?, 0, 0, 0, ?, ?) ON CONFLICT (user_id) DO NOTHING",
            (user_id, now, now),
        )
        # A device row removed by a legacy (soft) revocation may come back: it
        # starts from the device_seqs already stored, so last_ack_device_seq is true.
        self._execute(
            txn,
            "INSERT INTO devices (user_id, device_id, name, type, created_at, last_seen, last_device_seq)"
            " VALUES (?, ?, ?, ?, ?, ?, COALESCE((SELECT MAX(device_seq) FROM events"
            " WHERE user_id = ? AND device_id = ?), 0)) ON CONFLICT (user_id, device_id) DO NOTHING",
            (user_id, device_id, name, dtype, now, now, user_id, device_id),
        )
        created = txn.rowcount == 1
        device = self._txn_get_device(txn, user_id, device_id)
        assert device is not None
        return device, created

    def get_device(self, user_id: str, device_id: str) -> "Deferred[Optional[DeviceState]]":
        """The device row, or None."""
        return self.run("get_device", self._txn_get_device, user_id, device_id)

    def _txn_get_device(self, txn: Txn, user_id: str, device_id: str) -> Optional[DeviceState]:
        self._execute(txn, "SELECT " + DEVICE_COLUMNS + " FROM devices WHERE user_id = ? AND device_id = ?",
                      (user_id, device_id))
        row = txn.fetchone()
        return None if row is None else _device(row)

    # -------------------------------------------------------------- delivery cursors

    def update_cursors(
        self, cursors: Dict[Tuple[str, str], int], now: int, last_seen: Optional[Dict[Tuple[str, str], int]] = None,
    ) -> "Deferred[None]":
        """
        Raise each device's ``delivered_seq`` to at least the given seq (never
        lowers it) and set its ``last_seen``: the time in ``last_seen`` (its
        last socket closed then), else ``now``. A device only in ``last_seen``
        keeps its cursor (GREATEST with 0). One transaction for the whole batch.
        """
        seen = last_seen or {}
        keys = sorted(set(cursors) | set(seen))
        rows = [(cursors.get(key, 0), seen.get(key, now), key[0], key[1]) for key in keys]
        return self.run("update_cursors", self._txn_update_cursors, rows)

    def _txn_update_cursors(self, txn: Txn, rows: List[Tuple[int, int, str, str]]) -> None:
        self._executemany(
            txn,
            "UPDATE devices SET delivered_seq = " + self.greatest("delivered_seq", "?") + ", last_seen = ?"
            " WHERE user_id = ? AND device_id = ?",
            rows,
        )

    def record_unacked(self, user_id: str, device_id: str, delivered: int, blocker: int, now: int) -> "Deferred[bool]":
        """
        A connection ended with ``blocker`` (= delivered + 1) sent but never
        acknowledged. The third connection in a row that ends so moves the
        cursor past it (PROTOCOL.md §7.2); fires True when that happened.
        """
        return self.run("record_unacked", self._txn_unacked, user_id, device_id, delivered, blocker, now)

    def _txn_unacked(self, txn: Txn, user_id: str, device_id: str, delivered: int, blocker: int, now: int) -> bool:
        self._execute(
            txn, "SELECT delivered_seq, stuck_seq, stuck_count FROM devices WHERE user_id = ? AND device_id = ?"
            + self.lock_suffix, (user_id, device_id),
        )
        row = txn.fetchone()
        if row is None:
            return False
        stored, stuck_seq, count = int(row[0]), int(row[1]), int(row[2])
        current = max(stored, delivered)
        if current >= blocker:
            return False
        count = count + 1 if stuck_seq == blocker else 1
        gave_up = count >= 3
        self._execute(
            txn,
            "UPDATE devices SET delivered_seq = ?, stuck_seq = ?, stuck_count = ?, last_seen = ?"
            " WHERE user_id = ? AND device_id = ?",
            (blocker if gave_up else current, blocker, 0 if gave_up else count, now, user_id, device_id),
        )
        return gave_up

    def touch_device(self, user_id: str, device_id: str, now: int) -> "Deferred[None]":
        """Set ``last_seen`` (when the device's last socket closed)."""
        return self.run("touch_device", self._txn_touch, user_id, device_id, now)

    def _txn_touch(self, txn: Txn, user_id: str, device_id: str, now: int) -> None:
        self._execute(txn, "UPDATE devices SET last_seen = ? WHERE user_id = ? AND device_id = ?", (now, user_id, device_id))

    # -------------------------------------------------------------- the devices routes

    def list_devices(self, user_id: str, include_revoked: bool = False) -> "Deferred[List[DeviceState]]":
        """The user's devices (revoked ones only with ``include_revoked``), in no particular order."""
        return self.run("list_devices", self._txn_list_devices, user_id, include_revoked)

    def _txn_list_devices(self, txn: Txn, user_id: str, include_revoked: bool) -> List[DeviceState]:
        sql = "SELECT " + DEVICE_COLUMNS + " FROM devices WHERE user_id = ?"
        if not include_revoked:
            sql += " AND revoked_at IS NULL"
        self._execute(txn, sql + " ORDER BY device_id", (user_id,))
        return [_device(r) for r in txn.fetchall()]

    def rename_device(self, user_id: str, device_id: str, name: str) -> "Deferred[DeviceChange]":
        """
        Set a non-revoked device's name unless another non-revoked device of the
        user has exactly that name. Fires with RENAMED, NAME_TAKEN or NOT_FOUND
        (unknown or revoked). The check and the update are one transaction
        holding the user's device rows (PostgreSQL: row locks), so two
        concurrent renames cannot both take the same name.
        """
        return self.run("rename_device", self._txn_rename, user_id, device_id, name)

    def _txn_rename(self, txn: Txn, user_id: str, device_id: str, name: str) -> DeviceChange:
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
            return DeviceChange.NOT_FOUND
        if any(r[0] != device_id and r[2] is None and r[1] == name for r in rows):
            return DeviceChange.NAME_TAKEN
        self._execute(
            txn, "UPDATE devices SET name = ? WHERE user_id = ? AND device_id = ? AND revoked_at IS NULL",
            (name, user_id, device_id),
        )
        return DeviceChange.RENAMED

    def revoke_device(self, user_id: str, device_id: str, now: int) -> "Deferred[DeviceChange]":
        """
        Tombstone a device (``revoked_at`` = ``now``); its events stay. Fires with
        REVOKED, ALREADY (it was revoked before; the first time is kept) or
        NOT_FOUND. Later handshakes of the device are refused and it is never
        re-created (PROTOCOL.md §4.4).
        """
        return self.run("revoke_device", self._txn_revoke, user_id, device_id, now)

    def _txn_revoke(self, txn: Txn, user_id: str, device_id: str, now: int) -> DeviceChange:
        self._execute(
            txn, "UPDATE devices SET revoked_at = ? WHERE user_id = ? AND device_id = ? AND revoked_at IS NULL",
            (now, user_id, device_id),
        )
        if txn.rowcount == 1:
            return DeviceChange.REVOKED
        return self._already_or_not_found(txn, user_id, device_id)

    def unrevoke_device(self, user_id: str, device_id: str) -> "Deferred[DeviceChange]":
        """Clear a device's tombstone so it may connect again. Fires with UNREVOKED, ALREADY (it was not revoked) or NOT_FOUND."""
        return self.run("unrevoke_device", self._txn_unrevoke, user_id, device_id)

    def _txn_unrevoke(self, txn: Txn, user_id: str, device_id: str) -> DeviceChange:
        self._execute(
            txn, "UPDATE devices SET revoked_at = NULL WHERE user_id = ? AND device_id = ? AND revoked_at IS NOT NULL",
            (user_id, device_id),
        )
        if txn.rowcount == 1:
            return DeviceChange.UNREVOKED
        return self._already_or_not_found(txn, user_id, device_id)

    def remove_device(self, user_id: str, device_id: str) -> "Deferred[DeviceChange]":
        """
        The legacy soft revocation (API.md §1.2): delete a non-revoked device's
        row without a tombstone, so the device may register again; its events
        stay. Fires with REMOVED, ALREADY (the device is tombstoned: the
        tombstone is kept, an unauthenticated legacy call must not undo a
        revocation) or NOT_FOUND.
        """
        return self.run("remove_device", self._txn_remove, user_id, device_id)

    def _txn_remove(self, txn: Txn, user_id: str, device_id: str) -> DeviceChange:
        self._execute(
            txn, "DELETE FROM devices WHERE user_id = ? AND device_id = ? AND revoked_at IS NULL",
            (user_id, device_id),
        )
        if txn.rowcount == 1:
            return DeviceChange.REMOVED
        return self._already_or_not_found(txn, user_id, device_id)

    def _already_or_not_found(self, txn: Txn, user_id: str, device_id: str) -> DeviceChange:
        """After an update that changed no row: ALREADY if the device exists, else NOT_FOUND."""
        found = self._txn_get_device(txn, user_id, device_id) is not None
        return DeviceChange.ALREADY if found else DeviceChange.NOT_FOUND
