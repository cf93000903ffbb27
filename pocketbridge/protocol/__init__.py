"""
The protocol, as pure code shared by the server and the SDK: the wire format
and its validators, event checks, the handshake transcripts and their
cryptography (PROTOCOL.md). Nothing here does I/O or imports server-only
dependencies.
"""
