"""The admin routes' store: counts over every user."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from pocketbridge.server.storage.base import BaseStore, Txn


class AdminStore(BaseStore):
    """Whole-table counts for operators."""

    def count_events(self) -> "Deferred[int]":
        """The number of event rows stored (all users, expired rows not yet deleted included)."""
        return self.run("count_events", self._txn_count_events)

    def _txn_count_events(self, txn: Txn) -> int:
        self._execute(txn, "SELECT COUNT(*) FROM events")
        return int(txn.fetchone()[0])
