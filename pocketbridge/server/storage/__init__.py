"""Durable storage of users, devices and events (SQLite or PostgreSQL)."""

from pocketbridge.server.storage.base import DeviceState, Outcome, Storage, StorageUnavailable
from pocketbridge.server.storage.factory import open_storage

__all__ = ["DeviceState", "Outcome", "Storage", "StorageUnavailable", "open_storage"]
