"""
The HTTP side on the same port as ``/ws``: the Klein app and the site.

This module holds the routes every deployment needs (``/ws``, ``/health``,
``/metrics``); the REST API of API.md is added by ``pocketbridge.api``.
"""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred
from twisted.web.server import Site

from . import __version__


def _json(request: Any, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def build_app(node: Any, ws_factory: Any) -> Klein:
    """The Klein application serving ``/ws``, ``/health`` and ``/metrics``."""
    app = Klein()
    ws_resource = WebSocketResource(ws_factory)

    @app.route("/ws", branch=False)
    def ws(request: Any) -> Any:
        if node.draining:
            request.setHeader(b"Retry-After", b"5")
            return _json(request, 503, {"error": "Server draining", "code": "UNAVAILABLE"})
        return ws_resource

    async def health(request: Any) -> bytes:
        services = {"database": "ok", "bus": "embedded" if not node.settings.redis else "ok"}
        try:
            d = node.storage.ping()
            d.addTimeout(2, node.clock)
            await d
        except Exception:
            services["database"] = "error"
        if node.settings.redis and not node.hub.bus.healthy():
            services["bus"] = "error"
        status = "ok"
        code = 200
        if "error" in services.values():
            status, code = "degraded", 503
        if node.draining:
            status, code = "draining", 503
        return _json(request, code, {
            "status": status,
            "version": __version__,
            "node_id": node.node_id,
            "uptime_s": int(node.clock.seconds() - node.started_at),
            "services": services,
        })

    @app.route("/health", methods=["GET"])
    @app.route("/api/health", methods=["GET"])
    def health_route(request: Any) -> "Deferred[bytes]":
        return Deferred.fromCoroutine(health(request))

    @app.route("/metrics", methods=["GET"])
    def metrics_route(request: Any) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest()

    return app


def build_site(app: Klein) -> Site:
    """A Site for the app, with access logs off (the app logs what it must)."""
    site = Site(app.resource())
    site.noisy = False
    site.log = lambda request: None  # access logs would expose pairing codes; the API logs its own
    return site
