"""
Autobahn's per-connection setup, paid once per factory instead.

``WebSocketProtocol._connectionMade`` copies every option named in
``CONFIG_ATTRS`` from the factory onto the new protocol and then formats the
whole list with ``pprint.pformat`` for a debug line, whether or not debug
logging is on: the largest single Python cost of a short-lived connection
in the handshake-cycle profile (docs/benchmarks.md). A protocol class that
already carries the options as class attributes and lists no ``CONFIG_ATTRS``
makes that loop (and the formatting) empty; each connection still reads the
same values.
"""

from __future__ import annotations

from typing import Any, Dict, Type, TypeVar

P = TypeVar("P")


def with_factory_options(protocol: Type[P], factory: Any) -> Type[P]:
    """
    A subclass of ``protocol`` holding ``factory``'s current protocol options.
    Call it after the last ``setProtocolOptions``: later changes to the
    factory do not reach connections (per-connection assignments still do).
    """
    names = getattr(protocol, "CONFIG_ATTRS")
    attrs: Dict[str, Any] = {name: getattr(factory, name) for name in names}
    attrs["CONFIG_ATTRS"] = ()
    attrs["__doc__"] = protocol.__doc__
    attrs["__module__"] = protocol.__module__
    return type(protocol.__name__, (protocol,), attrs)
