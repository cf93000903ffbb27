"""SQL for the admin routes (mixed into Storage; uses its run/_execute helpers)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred


class AdminQueries:
    """Queries of the admin routes. Each public method returns a Deferred via self.run."""

    if TYPE_CHECKING:  # provided by Storage
        def run(self, description: str, fn: Any, *args: Any) -> "Deferred[Any]": ...

        def _execute(self, txn: Any, sql: str, params: Sequence[Any] = ()) -> None: ...

    def count_events(self) -> "Deferred[int]":
        """The number of event rows stored (all users, expired rows not yet deleted included)."""
        return self.run("count_events", self._txn_count_events)

    def _txn_count_events(self, txn: Any) -> int:
        self._execute(txn, "SELECT COUNT(*) FROM events")
        return int(txn.fetchone()[0])
