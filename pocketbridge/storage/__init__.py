"""Durable storage of users, devices and events (SQLite or PostgreSQL)."""

from .base import DeviceState, Outcome, Storage, StorageUnavailable
from .factory import open_storage

__all__ = ["DeviceState", "Outcome", "Storage", "StorageUnavailable", "open_storage"]
