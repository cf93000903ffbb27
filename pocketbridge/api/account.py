"""The account routes of API.md §3."""

from __future__ import annotations

from typing import Any

from .http import Api


def register(api: Api, node: Any) -> None:
    """Add the account routes to api."""
