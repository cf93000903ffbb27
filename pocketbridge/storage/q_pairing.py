"""SQL for the REST API's pairing routes (mixed into Storage; uses its run/_execute helpers)."""

from __future__ import annotations


class PairingQueries:
    """Queries of the pairing routes. Each public method returns a Deferred via self.run."""
