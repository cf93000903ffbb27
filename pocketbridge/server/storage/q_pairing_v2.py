"""
SQL of the v2 pairing mailboxes (API.md "Pairing, v2"). Every state change is
one transaction on one row, so concurrent requests on any node see a single
order: open → joined → sealed → (fetched: deleted), and a second join burns
the mailbox.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple


class PairingV2Queries:
    """Mailbox operations; each returns a Deferred via ``self.run``."""

    def _mailbox(self, txn: Any, code_key: str, now: int) -> Optional[Sequence[Any]]:
        self._execute(  # type: ignore[attr-defined]
            txn,
            "SELECT user_id, device_id, msg_a, msg_b, b_token_hash, sealed, state, expires_at FROM pairing_v2"
            " WHERE code_key = ?" + self.lock_suffix, (code_key,))  # type: ignore[attr-defined]
        row = txn.fetchone()
        if row is None:
            return None
        if int(row[7]) <= now:
            self._execute(txn, "DELETE FROM pairing_v2 WHERE code_key = ?", (code_key,))  # type: ignore[attr-defined]
            return None
        return row

    def mailbox_create(self, code_key: str, user_id: str, device_id: str, msg_a: str, now: int, expires_at: int) -> Any:
        """Open a mailbox; fires "ok", "taken_self" or "taken_other"."""
        def txn_fn(txn: Any) -> str:
            row = self._mailbox(txn, code_key, now)
            if row is not None:
                return "taken_self" if row[0] == user_id else "taken_other"
            self._execute(  # type: ignore[attr-defined]
                txn, "INSERT INTO pairing_v2 (code_key, user_id, device_id, msg_a, state, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, 'open', ?, ?)", (code_key, user_id, device_id, msg_a, now, expires_at))
            return "ok"

        return self.run("pairing_v2_create", txn_fn)  # type: ignore[attr-defined]

    def mailbox_join(self, code_key: str, msg_b: str, token_hash: str, now: int) -> Any:
        """B joins; fires ("ok", msg_a, user_id), ("not_found",) or ("burned",). A second join burns."""
        def txn_fn(txn: Any) -> Tuple[Any, ...]:
            row = self._mailbox(txn, code_key, now)
            if row is None:
                return ("not_found",)
            if row[6] != "open":
                self._execute(  # type: ignore[attr-defined]
                    txn, "UPDATE pairing_v2 SET state = 'burned', msg_b = NULL, sealed = NULL, b_token_hash = NULL"
                    " WHERE code_key = ?", (code_key,))
                return ("burned",)
            self._execute(  # type: ignore[attr-defined]
                txn, "UPDATE pairing_v2 SET msg_b = ?, b_token_hash = ?, state = 'joined' WHERE code_key = ?",
                (msg_b, token_hash, code_key))
            return ("ok", row[2], row[0])

        return self.run("pairing_v2_join", txn_fn)  # type: ignore[attr-defined]

    def mailbox_msg_b(self, code_key: str, user_id: str, now: int) -> Any:
        """A polls for B's message; fires ("ok", msg_b), ("wait",), ("not_found",) or ("burned",)."""
        def txn_fn(txn: Any) -> Tuple[Any, ...]:
            row = self._mailbox(txn, code_key, now)
            if row is None or row[0] != user_id:
                return ("not_found",)
            if row[6] == "burned":
                return ("burned",)
            if row[3] is None:
                return ("wait",)
            return ("ok", row[3])

        return self.run("pairing_v2_msg_b", txn_fn)  # type: ignore[attr-defined]

    def mailbox_seal(self, code_key: str, user_id: str, sealed: str, now: int) -> Any:
        """A deposits the sealed bundle; fires "ok", "conflict", "not_found" or "burned"."""
        def txn_fn(txn: Any) -> str:
            row = self._mailbox(txn, code_key, now)
            if row is None or row[0] != user_id:
                return "not_found"
            if row[6] == "burned":
                return "burned"
            if row[6] != "joined":
                return "conflict"
            self._execute(  # type: ignore[attr-defined]
                txn, "UPDATE pairing_v2 SET sealed = ?, state = 'sealed' WHERE code_key = ?", (sealed, code_key))
            return "ok"

        return self.run("pairing_v2_seal", txn_fn)  # type: ignore[attr-defined]

    def mailbox_fetch(self, code_key: str, token_ok: Any, now: int) -> Any:
        """
        B fetches the bundle; ``token_ok(stored_hash)`` compares in constant
        time. Fires ("ok", sealed, user_id) and deletes the mailbox, or
        ("wait",), ("not_found",) or ("burned",).
        """
        def txn_fn(txn: Any) -> Tuple[Any, ...]:
            row = self._mailbox(txn, code_key, now)
            if row is None or row[4] is None or not token_ok(row[4]):
                if row is not None and row[6] == "burned":
                    return ("burned",)
                return ("not_found",)
            if row[6] == "burned":
                return ("burned",)
            if row[5] is None:
                return ("wait",)
            self._execute(txn, "DELETE FROM pairing_v2 WHERE code_key = ?", (code_key,))  # type: ignore[attr-defined]
            return ("ok", row[5], row[0])

        return self.run("pairing_v2_fetch", txn_fn)  # type: ignore[attr-defined]

    def mailbox_live_count(self, now: int) -> Any:
        """Mailboxes open or in progress (for the service-wide failure budget)."""
        def txn_fn(txn: Any) -> int:
            self._execute(txn, "SELECT COUNT(*) FROM pairing_v2 WHERE expires_at > ? AND state <> 'burned'", (now,))  # type: ignore[attr-defined]
            return int(txn.fetchone()[0])

        return self.run("pairing_v2_count", txn_fn)  # type: ignore[attr-defined]

    def _txn_delete_expired_mailboxes(self, txn: Any, now: int, batch: int) -> int:
        self._execute(  # type: ignore[attr-defined]
            txn, "SELECT code_key FROM pairing_v2 WHERE expires_at <= ? LIMIT ?", (now, batch))
        keys = [(r[0],) for r in txn.fetchall()]
        if keys:
            self._executemany(txn, "DELETE FROM pairing_v2 WHERE code_key = ?", keys)  # type: ignore[attr-defined]
        return len(keys)
