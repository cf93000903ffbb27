"""
``Storage``: every per-domain store over one connection pool, the one object
the server holds (``node.storage``). The stores share ``BaseStore``'s pool
and transaction runner; a dialect (``SQLiteStorage``, ``PostgresStorage``)
subclasses this class.
"""

from __future__ import annotations

from typing import Optional, Tuple

from twisted.internet.defer import Deferred

from pocketbridge.server.storage.account import AccountStore
from pocketbridge.server.storage.admin import AdminStore
from pocketbridge.server.storage.base import Txn
from pocketbridge.server.storage.commit import CommitStore
from pocketbridge.server.storage.devices import DeviceState, DeviceStore
from pocketbridge.server.storage.events import EventStore
from pocketbridge.server.storage.jobs import JobStore
from pocketbridge.server.storage.pairing import PairingStore
from pocketbridge.server.storage.pairing_v2 import MailboxStore


class Storage(
    EventStore, CommitStore, DeviceStore, AccountStore, PairingStore, MailboxStore, JobStore, AdminStore,
):
    """
    Users, devices, events, profiles and pairing records in one SQL database
    via adbapi. Transactions that span two stores live here.
    """

    def register_and_read_head(
        self, user_id: str, device_id: str, name: Optional[str], dtype: str, now: int
    ) -> "Deferred[Tuple[DeviceState, bool, int, int]]":
        """``register_device`` and ``user_state`` in one transaction: (device, created, head, purged_below)."""

        def both(txn: Txn) -> Tuple[DeviceState, bool, int, int]:
            device, created = self._txn_register(txn, user_id, device_id, name, dtype, now)
            head, purged = self._txn_user_state(txn, user_id)
            return device, created, head, purged

        return self.run("register_and_read_head", both)
