"""
Numbered, forward-only schema migrations per dialect (STYLE.md §10).

The SQL lives in ``schema/<dialect>/NNN_name.sql``, shipped in the wheel as the
``pocketbridge.schema`` package. Each file is applied in its own transaction
and recorded in ``schema_version``; a database newer than the code is refused.
"""

from __future__ import annotations

import pathlib
import re
from importlib import resources
from typing import Any, List, Tuple

FILE_RE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


class SchemaTooNew(Exception):
    """The database was migrated by a newer version of the server."""


def available(dialect: str) -> List[Tuple[int, str, str]]:
    """(version, name, sql) for every migration of ``dialect``, in order."""
    out = []
    for entry in _schema_dir(dialect).iterdir():
        m = FILE_RE.match(entry.name)
        if m:
            out.append((int(m.group(1)), entry.name, entry.read_text("utf-8")))
    out.sort()
    for i, (version, name, _) in enumerate(out, start=1):
        if version != i:
            raise RuntimeError("migration numbering has a gap at {}".format(name))
    return out


def statements(sql: str) -> List[str]:
    """Split a migration file into statements (a ';' ends a statement at line end)."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    parts = re.split(r";\s*$", "\n".join(lines), flags=re.MULTILINE)
    return [p.strip() for p in parts if p.strip()]


def _schema_dir(dialect: str) -> Any:
    """The folder of a dialect's SQL files: the installed ``pocketbridge.schema``
    package, or ``schema/`` beside the package when running from a checkout."""
    try:
        return resources.files("pocketbridge.schema").joinpath(dialect)
    except ModuleNotFoundError:
        checkout = pathlib.Path(__file__).resolve().parents[3]
        return checkout / "schema" / dialect


def current_version(txn: Any) -> int:
    """The highest applied version, creating ``schema_version`` if absent. Runs in a transaction."""
    txn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)"
    )
    txn.execute("SELECT MAX(version) FROM schema_version")
    row = txn.fetchone()
    return int(row[0]) if row and row[0] is not None else 0
