"""PocketBridge: a real-time, end-to-end encrypted sync server."""

__version__ = "0.1.0"
