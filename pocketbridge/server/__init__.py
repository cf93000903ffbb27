"""
The server (``twistd pocketbridge``; needs the ``server`` extra): the
WebSocket gateway, the writer, fan-out, cluster services, storage and the
REST API. docs/architecture.md maps the modules.
"""
