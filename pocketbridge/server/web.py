"""
The HTTP side on the same port as ``/ws``: the Klein app and the site.

This module holds the routes every deployment needs (``/ws``, ``/health``,
``/metrics``); the REST API of API.md is added by ``pocketbridge.server.api``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Tuple

from autobahn.twisted.resource import WebSocketResource
from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Site

from pocketbridge import __version__
from pocketbridge.server.accept import RESTRICTED_PATHS, AdmittedRequest, admitted_connection
from pocketbridge.server.api import install_api
from pocketbridge.server.api.auth import Authenticator
from pocketbridge.server.api.http import Api, ApiError, Raw

if TYPE_CHECKING:
    from pocketbridge.server.context import Node


def build_api(node: Node) -> Api:
    """The REST API with ``/health`` and ``/metrics``; ``api.app`` is its Klein application."""
    api = install_api(Klein(), node)
    add_health_routes(api, node, metrics_here=not node.settings.metrics_listen)
    return api


class _Draining(Resource):
    """503 for WebSocket upgrades while the node drains."""

    isLeaf = True
    message = "Server draining"

    def __init__(self, api: Api) -> None:
        super().__init__()
        self.api = api

    def render(self, request: Any) -> bytes:
        self.api.common_headers(request)
        route = "/ws" if request.path == b"/ws" else "(full)"
        return self.api.error(request, ApiError(503, "UNAVAILABLE", self.message, headers={"Retry-After": "5"}), route)


class _Full(_Draining):
    """503 for a request other than /health or /metrics on a connection admitted in the node's last slots."""

    message = "Server full"


class Root(Resource):
    """
    ``/ws`` goes straight to the WebSocket resource (the handshake path skips
    Klein's routing); every other path goes to the Klein app. ``api``
    renders the 503 answers of a draining or full node.
    """

    def __init__(self, node: Node, app: Klein, ws_factory: Any, api: Api) -> None:
        super().__init__()
        self.node = node
        self.app_resource = app.resource()
        self.ws = WebSocketResource(ws_factory)
        self.draining = _Draining(api)
        self.full = _Full(api)

    def getChild(self, path: bytes, request: Any) -> Any:
        if self._restricted(request):
            return self.full
        if path == b"ws" and not request.postpath:
            return self.draining if self.node.draining else self.ws
        # Hand the whole path to Klein, which routes on prepath/postpath itself.
        request.postpath.insert(0, request.prepath.pop())
        return self.app_resource

    def render(self, request: Any) -> Any:
        if self._restricted(request):
            return self.full.render(request)
        return self.app_resource.render(request)

    @staticmethod
    def _restricted(request: Any) -> bool:
        """True when the request came on a connection that may only ask for /health or /metrics."""
        conn = admitted_connection(request)
        return conn is not None and conn.restricted and request.path not in RESTRICTED_PATHS


def add_health_routes(api: Api, node: Node, metrics_here: bool = True) -> None:
    """``/health`` (and ``/api/health``) and, unless served elsewhere, ``/metrics``."""

    async def health(request: Any, caller: Any) -> Tuple[int, Any]:
        services = {"database": "ok", "bus": "embedded" if not node.settings.redis else "ok"}
        try:
            d = node.storage.ping()
            d.addTimeout(2, node.clock)
            await d
        except Exception:
            services["database"] = "error"
        # A database that answers SELECT 1 but cannot commit (disk full, read-only)
        # is down for every upload: the writer's last commit (or probe write) failed.
        if not node.writer.storage_ok:
            services["database"] = "error"
        if node.settings.redis and not node.hub.bus.healthy():
            services["bus"] = "error"
        status, code = "ok", 200
        if "error" in services.values():
            status, code = "degraded", 503
        if node.draining:
            status, code = "draining", 503
        return code, {
            "status": status,
            "version": __version__,
            "node_id": node.node_id,
            "uptime_s": int(node.clock.seconds() - node.started_at),
            "services": services,
        }

    api.route("/health", ["GET"], auth="none", rate_limited=False)(health)
    api.route("/api/health", ["GET"], auth="none", rate_limited=False, name="/health")(health)
    if metrics_here:
        api.route("/metrics", ["GET"], auth="none", rate_limited=False)(metrics_route)


async def metrics_route(request: Any, caller: Any) -> Tuple[int, Any]:
    """Prometheus text exposition."""
    return 200, Raw(CONTENT_TYPE_LATEST, generate_latest())


def build_site(root: Any, reactor: Any = None) -> Site:
    """
    A Site for ``root`` (a Klein app or resource) with the 64 KiB body limit;
    no access log (pairing codes are in paths). Its requests report head and
    body progress when the site is wrapped in an ``AdmissionFactory``.
    """
    resource = root.resource() if isinstance(root, Klein) else root
    site = Site(resource, requestFactory=AdmittedRequest, reactor=reactor)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # silence the access log per instance
    return site


def metrics_site(node: Node, auth: Authenticator, reactor: Any = None) -> Site:
    """A separate site serving only ``/metrics`` (``--metrics-listen``)."""
    app = Klein()
    api = Api(app, node, auth)
    api.route("/metrics", ["GET"], auth="none", rate_limited=False)(metrics_route)
    return build_site(app, reactor)
