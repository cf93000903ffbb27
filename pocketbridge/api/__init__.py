"""The REST API of API.md, served by Klein beside ``/ws``."""

from __future__ import annotations

from typing import Any

from . import account, admin, devices, pairing
from .auth import Authenticator
from .http import Api


def install_api(app: Any, node: Any) -> Api:
    """Register every REST route on the Klein ``app``."""
    api = Api(app, node, Authenticator(node))
    for module in (devices, pairing, account, admin):
        module.register(api, node)
    return api
