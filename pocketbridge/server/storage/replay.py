"""
The replay cache of signed REST requests kept in storage (API.md §1.1), for
deployments without Redis: a signature accepted once stays refused until its
entry expires, across restarts and kill -9 (the insert is committed before
the request is served).

Bound: an entry is written only for a request whose signature verified and
whose device is registered, and lives until ``ts + auth_window`` with
``|ts - now| <= auth_window``; every insert first deletes up to
``SWEEP_BATCH`` expired rows (oldest first, through the ``expires_at`` index),
more than it adds. So the table holds at most the signed requests accepted
in the last two auth windows (10 minutes by default), which the per-IP REST
budget bounds, plus fewer than ``SWEEP_BATCH`` expired rows.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from pocketbridge.server.storage.base import BaseStore, Txn

SWEEP_BATCH = 64


class StorageReplayCache:
    """
    ``insert_if_absent`` of ``pocketbridge.server.cluster.limits`` on the
    ``replay_cache`` table. It holds the storage rather than being one of its
    stores: only deployments without Redis use it, in place of the limits'.
    """

    def __init__(self, storage: BaseStore) -> None:
        self.storage = storage

    def insert_if_absent(self, key: str, expires_at_ms: int, now_ms: int) -> "Deferred[bool]":
        """True when ``key`` was not live (and is now remembered until ``expires_at_ms``)."""
        return self.storage.run("replay_insert", self._txn_insert, key, expires_at_ms, now_ms)

    def _txn_insert(self, txn: Txn, key: str, expires_at: int, now: int) -> bool:
        ex = self.storage._execute
        ex(txn, "DELETE FROM replay_cache WHERE sig IN"
                " (SELECT sig FROM replay_cache WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)", (now, SWEEP_BATCH))
        # A live entry stays; an expired one under the same key is replaced.
        ex(txn, "INSERT INTO replay_cache (sig, expires_at) VALUES (?, ?) ON CONFLICT (sig) DO UPDATE"
                " SET expires_at = excluded.expires_at WHERE replay_cache.expires_at <= ?", (key, expires_at, now))
        return int(txn.rowcount) == 1

    def count(self) -> "Deferred[int]":
        """Rows in the cache (for tests and operators)."""
        def txn_fn(txn: Txn) -> int:
            self.storage._execute(txn, "SELECT COUNT(*) FROM replay_cache")
            return int(txn.fetchone()[0])

        return self.storage.run("replay_count", txn_fn)

    def sweep(self) -> None:
        """Nothing to do in memory: expired rows go with later inserts."""
