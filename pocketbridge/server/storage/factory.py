"""Choose the storage backend from the settings."""

from __future__ import annotations

import os

from pocketbridge.server.config import Settings
from pocketbridge.server.storage.datastore import Storage


def open_storage(settings: Settings) -> Storage:
    """PostgreSQL when ``database`` is set, else SQLite in the data dir. Not started yet."""
    if settings.database:
        from pocketbridge.server.storage.postgres import PostgresStorage

        return PostgresStorage(settings.database, pool_size=settings.db_pool_size)
    from pocketbridge.server.storage.sqlite import SQLiteStorage

    return SQLiteStorage(os.path.join(settings.data_dir, "pocketbridge.sqlite3"))
