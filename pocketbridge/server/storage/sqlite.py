"""The embedded dialect: one SQLite file, one connection, WAL, synchronous=FULL."""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from twisted.enterprise import adbapi

from pocketbridge.server.storage.datastore import Storage


def _setup(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")


class SQLiteStorage(Storage):
    """Storage in a SQLite file. One connection serves reads and writes in order."""

    dialect = "sqlite"

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def _make_pool(self) -> adbapi.ConnectionPool:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        return adbapi.ConnectionPool(
            "sqlite3",
            self.path,
            check_same_thread=False,
            isolation_level=None,
            cp_min=1,
            cp_max=1,
            cp_openfun=_setup,
            cp_noisy=False,
        )

    def _begin(self, txn: Any) -> None:
        txn.execute("BEGIN IMMEDIATE")

    def greatest(self, a: str, b: str) -> str:
        return "MAX({}, {})".format(a, b)
