"""The REST API of API.md, served by Klein beside ``/ws``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from klein import Klein

from pocketbridge.server.api import account, admin, devices, pairing, pairing_v2
from pocketbridge.server.api.auth import Authenticator
from pocketbridge.server.api.http import Api

if TYPE_CHECKING:
    from pocketbridge.server.context import Node


def install_api(app: Klein, node: Node) -> Api:
    """Register every REST route on the Klein ``app``."""
    api = Api(app, node, Authenticator(node))
    for module in (devices, pairing, pairing_v2, account, admin):
        module.register(api, node)
    return api
