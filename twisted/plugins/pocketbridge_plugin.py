"""The ``twistd pocketbridge`` plugin. Everything else lives in pocketbridge.tap."""

from twisted.application.service import ServiceMaker

pocketbridge = ServiceMaker(
    "PocketBridge",
    "pocketbridge.tap",
    "Real-time, end-to-end encrypted sync server",
    "pocketbridge",
)
