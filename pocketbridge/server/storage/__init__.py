"""Durable storage of users, devices and events (SQLite or PostgreSQL)."""

from pocketbridge.server.storage.base import StorageUnavailable, Txn
from pocketbridge.server.storage.commit import Outcome, OutcomeKind
from pocketbridge.server.storage.datastore import Storage
from pocketbridge.server.storage.devices import DeviceChange, DeviceState
from pocketbridge.server.storage.factory import open_storage
from pocketbridge.server.storage.pairing import PairingStored
from pocketbridge.server.storage.pairing_v2 import Mailbox, MailboxReply

__all__ = [
    "DeviceChange", "DeviceState", "Mailbox", "MailboxReply", "Outcome", "OutcomeKind", "PairingStored",
    "Storage", "StorageUnavailable", "Txn", "open_storage",
]
