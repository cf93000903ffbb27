"""SQL for the REST API's account routes (mixed into Storage; uses its run/_execute helpers)."""

from __future__ import annotations


class AccountQueries:
    """Queries of the account routes. Each public method returns a Deferred via self.run."""
