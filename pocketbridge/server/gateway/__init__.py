"""
The WebSocket gateway: the Autobahn adapter, the connection lifecycle machine,
the handshake and admission, and the per-protocol sessions.
"""
