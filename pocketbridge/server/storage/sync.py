"""
Blocking migration at startup, before the reactor runs (and for
``pocketbridge-admin migrate``): a failure here can still end the process
with one clear line.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from pocketbridge.server.config import Settings
from pocketbridge.server.storage.base import BaseStore, Txn
from pocketbridge.server.storage.factory import open_storage


def migrate_now(settings: Settings) -> int:
    """Apply pending migrations with a direct connection; returns the schema version."""
    storage = open_storage(settings)
    conn: Any
    if settings.database:
        import psycopg2

        conn = psycopg2.connect(settings.database, connect_timeout=5)
    else:
        path = os.path.join(settings.data_dir, "pocketbridge.sqlite3")
        os.makedirs(settings.data_dir, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
    try:
        return migrate_connection(storage, conn)
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.close()


def migrate_connection(storage: BaseStore, conn: Any) -> int:
    """
    Apply pending migrations of ``storage``'s dialect over an open DB-API
    connection and commit; then run the transaction's effects (its log lines).
    """
    txn = Txn(conn.cursor())
    storage._begin(txn)
    version = storage._txn_migrate(txn)
    conn.commit()
    txn.run_effects("migrate")
    return version
