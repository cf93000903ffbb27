"""SQL of the background jobs: bounded deletions, safe to run on every node."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred

TTL_GRACE_MS = 300_000


class JobQueries:
    """Each method deletes at most ``batch`` rows in one transaction and returns how many."""

    def run_locked(self, job: str, fn: Any, *args: Any) -> "Deferred[Optional[int]]":
        """Run ``fn(txn, *args)`` under the job's cluster-wide lock; None when another node holds it."""

        def locked(txn: Any, *a: Any) -> Optional[int]:
            if not self._try_job_lock(txn, job):  # type: ignore[attr-defined]
                return None
            return fn(txn, *a)

        return self.run("job:" + job, locked, *args)  # type: ignore[attr-defined,no-any-return]

    def _try_job_lock(self, txn: Any, job: str) -> bool:
        """SQLite has one process and BEGIN IMMEDIATE; PostgreSQL overrides this."""
        return True

    def _txn_delete_expired_events(self, txn: Any, now: int, batch: int) -> int:
        self._execute(  # type: ignore[attr-defined]
            txn, "SELECT user_id, seq, payload_size FROM events WHERE ttl IS NOT NULL AND ttl < ? ORDER BY ttl LIMIT ?",
            (now - TTL_GRACE_MS, batch),
        )
        return self._delete_rows(txn, txn.fetchall(), raise_purged=False)

    def _txn_apply_retention(self, txn: Any, cutoff: int, batch: int) -> int:
        self._execute(  # type: ignore[attr-defined]
            txn, "SELECT user_id, seq, payload_size FROM events WHERE created_at < ? ORDER BY created_at LIMIT ?",
            (cutoff, batch),
        )
        return self._delete_rows(txn, txn.fetchall(), raise_purged=True)

    def _delete_rows(self, txn: Any, rows: List[Tuple[Any, ...]], raise_purged: bool) -> int:
        if not rows:
            return 0
        freed: Dict[str, int] = {}
        top: Dict[str, int] = {}
        for user, seq, size in rows:
            freed[user] = freed.get(user, 0) + int(size)
            top[user] = max(top.get(user, 0), int(seq))
        self._executemany(  # type: ignore[attr-defined]
            txn, "DELETE FROM events WHERE user_id = ? AND seq = ?", [(u, int(s)) for u, s, _ in rows])
        self._executemany(  # type: ignore[attr-defined]
            txn, "UPDATE users SET stored_bytes = stored_bytes - ? WHERE user_id = ?",
            [(n, u) for u, n in sorted(freed.items())])
        if raise_purged:
            greatest = self.greatest("purged_below_seq", "?")  # type: ignore[attr-defined]
            self._executemany(  # type: ignore[attr-defined]
                txn, "UPDATE users SET purged_below_seq = " + greatest + " WHERE user_id = ?",
                [(s + 1, u) for u, s in sorted(top.items())])
        return len(rows)
