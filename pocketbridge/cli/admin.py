"""
``pocketbridge-admin``: operator commands that run without a server.

``pocketbridge-admin migrate`` applies pending schema migrations to the
database named by ``--database``/``DATABASE_URL`` (or the SQLite file in the
data dir) and prints the resulting schema version.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from pocketbridge.server import config
from pocketbridge.server.config import ConfigError


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="pocketbridge-admin", description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    mig = sub.add_parser("migrate", help="apply pending database migrations")
    mig.add_argument("--database", help="postgresql:// URL (default: DATABASE_URL, else SQLite)")
    mig.add_argument("--data-dir", help="data directory holding the SQLite file (default ./pocketbridge-data)")
    args = parser.parse_args(argv)
    try:
        settings = config.resolve({"database": args.database, "data_dir": args.data_dir}, config.environment())
    except ConfigError as e:
        sys.stderr.write("pocketbridge-admin: configuration error: {}\n".format(e))
        return 2
    from pocketbridge.server.tap import SERVER_INSTALL_HINT, missing_server_modules

    missing = missing_server_modules()
    if missing:
        sys.stderr.write("pocketbridge-admin: the server's dependencies are not installed (no {}); install them "
                         "with: {}\n".format(", ".join(missing), SERVER_INSTALL_HINT))
        return 2
    from pocketbridge.server.storage.sync import migrate_now

    try:
        version = migrate_now(settings)
    except Exception as e:
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        sys.stderr.write("pocketbridge-admin: migration failed: {}\n".format(text))
        return 1
    sys.stdout.write("schema version {} ({})\n".format(version, "postgresql" if settings.database else "sqlite"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
