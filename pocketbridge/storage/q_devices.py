"""SQL for the REST API's devices routes (mixed into Storage; uses its run/_execute helpers)."""

from __future__ import annotations


class DevicesQueries:
    """Queries of the devices routes. Each public method returns a Deferred via self.run."""
