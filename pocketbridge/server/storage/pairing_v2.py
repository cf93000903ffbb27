"""
The v2 pairing mailboxes (API.md "Pairing, v2"). Every state change is one
transaction on one row, so concurrent requests on any node see a single
order: open → joined → sealed → (fetched: deleted), and a second join burns
the mailbox.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

from twisted.internet.defer import Deferred

from pocketbridge.server.storage.base import BaseStore, StrEnum, Txn

#: The cluster-wide lock of the expiry job's batches (the job's name: unchanged across versions).
EXPIRY_LOCK = "mailbox_expiry"


class Mailbox(StrEnum):
    """The answer of a mailbox operation."""

    OK = "ok"
    TAKEN_SELF = "taken_self"  # create: the code is open, by the same user
    TAKEN_OTHER = "taken_other"  # create: the code is open, by someone else
    NOT_FOUND = "not_found"
    BURNED = "burned"  # joined twice: nothing more is handed out
    WAIT = "wait"  # the other side has not written yet
    CONFLICT = "conflict"  # seal: not joined yet, or sealed already


class MailboxReply(NamedTuple):
    """``reply[0]`` is the status; ``reply[1]`` the message or bundle, ``reply[2]`` the owner, when OK."""

    status: Mailbox
    value: Optional[str] = None
    user_id: Optional[str] = None


class MailboxStore(BaseStore):
    """The ``pairing_v2`` table; each operation is one transaction on the mailbox's row."""

    def _mailbox(self, txn: Txn, code_key: str, now: int) -> Optional[Sequence[Any]]:
        """The live mailbox row, locked; an expired one is deleted on the way."""
        self._execute(
            txn,
            "SELECT user_id, device_id, msg_a, msg_b, b_token_hash, sealed, state, expires_at FROM pairing_v2"
            " WHERE code_key = ?" + self.lock_suffix, (code_key,))
        row = txn.fetchone()
        if row is None:
            return None
        if int(row[7]) <= now:
            self._execute(txn, "DELETE FROM pairing_v2 WHERE code_key = ?", (code_key,))
            return None
        return row

    def mailbox_create(
        self, code_key: str, user_id: str, device_id: str, msg_a: str, now: int, expires_at: int
    ) -> "Deferred[Mailbox]":
        """Open a mailbox; fires OK, TAKEN_SELF or TAKEN_OTHER."""
        def txn_fn(txn: Txn) -> Mailbox:
            row = self._mailbox(txn, code_key, now)
            if row is not None:
                return Mailbox.TAKEN_SELF if row[0] == user_id else Mailbox.TAKEN_OTHER
            self._execute(
                txn, "INSERT INTO pairing_v2 (code_key, user_id, device_id, msg_a, state, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, 'open', ?, ?)", (code_key, user_id, device_id, msg_a, now, expires_at))
            return Mailbox.OK

        return self.run("pairing_v2_create", txn_fn)

    def mailbox_join(self, code_key: str, msg_b: str, token_hash: str, now: int) -> "Deferred[MailboxReply]":
        """B joins; fires (OK, msg_a, user_id), (NOT_FOUND,) or (BURNED,). A second join burns."""
        def txn_fn(txn: Txn) -> MailboxReply:
            row = self._mailbox(txn, code_key, now)
            if row is None:
                return MailboxReply(Mailbox.NOT_FOUND)
            if row[6] != "open":
                self._execute(
                    txn, "UPDATE pairing_v2 SET state = 'burned', msg_b = NULL, sealed = NULL, b_token_hash = NULL"
                    " WHERE code_key = ?", (code_key,))
                return MailboxReply(Mailbox.BURNED)
            self._execute(
                txn, "UPDATE pairing_v2 SET msg_b = ?, b_token_hash = ?, state = 'joined' WHERE code_key = ?",
                (msg_b, token_hash, code_key))
            return MailboxReply(Mailbox.OK, row[2], row[0])

        return self.run("pairing_v2_join", txn_fn)

    def mailbox_msg_b(self, code_key: str, user_id: str, now: int) -> "Deferred[MailboxReply]":
        """A polls for B's message; fires (OK, msg_b), (WAIT,), (NOT_FOUND,) or (BURNED,)."""
        def txn_fn(txn: Txn) -> MailboxReply:
            row = self._mailbox(txn, code_key, now)
            if row is None or row[0] != user_id:
                return MailboxReply(Mailbox.NOT_FOUND)
            if row[6] == "burned":
                return MailboxReply(Mailbox.BURNED)
            if row[3] is None:
                return MailboxReply(Mailbox.WAIT)
            return MailboxReply(Mailbox.OK, row[3])

        return self.run("pairing_v2_msg_b", txn_fn)

    def mailbox_seal(self, code_key: str, user_id: str, sealed: str, now: int) -> "Deferred[Mailbox]":
        """A deposits the sealed bundle; fires OK, CONFLICT, NOT_FOUND or BURNED."""
        def txn_fn(txn: Txn) -> Mailbox:
            row = self._mailbox(txn, code_key, now)
            if row is None or row[0] != user_id:
                return Mailbox.NOT_FOUND
            if row[6] == "burned":
                return Mailbox.BURNED
            if row[6] != "joined":
                return Mailbox.CONFLICT
            self._execute(
                txn, "UPDATE pairing_v2 SET sealed = ?, state = 'sealed' WHERE code_key = ?", (sealed, code_key))
            return Mailbox.OK

        return self.run("pairing_v2_seal", txn_fn)

    def mailbox_fetch(self, code_key: str, token_ok: Callable[[str], bool], now: int) -> "Deferred[MailboxReply]":
        """
        B fetches the bundle; ``token_ok(stored_hash)`` compares in constant
        time. Fires (OK, sealed, user_id) and deletes the mailbox, or (WAIT,),
        (NOT_FOUND,) or (BURNED,).
        """
        def txn_fn(txn: Txn) -> MailboxReply:
            row = self._mailbox(txn, code_key, now)
            if row is None or row[4] is None or not token_ok(row[4]):
                if row is not None and row[6] == "burned":
                    return MailboxReply(Mailbox.BURNED)
                return MailboxReply(Mailbox.NOT_FOUND)
            if row[6] == "burned":
                return MailboxReply(Mailbox.BURNED)
            if row[5] is None:
                return MailboxReply(Mailbox.WAIT)
            self._execute(txn, "DELETE FROM pairing_v2 WHERE code_key = ?", (code_key,))
            return MailboxReply(Mailbox.OK, row[5], row[0])

        return self.run("pairing_v2_fetch", txn_fn)

    def mailbox_live_count(self, now: int) -> "Deferred[int]":
        """Mailboxes open or in progress (for the service-wide failure budget)."""
        def txn_fn(txn: Txn) -> int:
            self._execute(txn, "SELECT COUNT(*) FROM pairing_v2 WHERE expires_at > ? AND state <> 'burned'", (now,))
            return int(txn.fetchone()[0])

        return self.run("pairing_v2_count", txn_fn)

    def delete_expired_mailboxes(self, now: int, batch: int) -> "Deferred[Optional[int]]":
        """
        One batch of the expiry job: delete up to ``batch`` mailboxes expired
        at ``now`` under the job's cluster-wide lock; fires with how many, or
        None when another node holds the lock.
        """
        return self.run_locked(EXPIRY_LOCK, self._txn_delete_expired_mailboxes, now, batch)

    def _txn_delete_expired_mailboxes(self, txn: Txn, now: int, batch: int) -> int:
        self._execute(txn, "SELECT code_key FROM pairing_v2 WHERE expires_at <= ? LIMIT ?", (now, batch))
        keys = [(r[0],) for r in txn.fetchall()]
        if keys:
            self._executemany(txn, "DELETE FROM pairing_v2 WHERE code_key = ?", keys)
        return len(keys)
