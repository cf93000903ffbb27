"""The ``twistd pocketbridge`` plugin. Everything else lives in pocketbridge.server.tap."""

from twisted.application.service import ServiceMaker

pocketbridge = ServiceMaker(
    "PocketBridge",
    "pocketbridge.server.tap",
    "Real-time, end-to-end encrypted sync server",
    "pocketbridge",
)
