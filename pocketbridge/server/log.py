"""Log level control for the process (``LOG_LEVEL``)."""

from __future__ import annotations

from typing import Any, cast

from twisted.logger import ILogObserver, LogLevel, globalLogPublisher

_state = {"level": LogLevel.info}


def install_level_filter(level: LogLevel) -> None:
    """Drop events below ``level`` before any observer sees them."""
    _state["level"] = level
    observers = list(getattr(globalLogPublisher, "_observers", []))
    if not observers or getattr(globalLogPublisher, "_pb_filtered", False):
        return

    def filtered(event: Any) -> None:
        lvl = event.get("log_level", LogLevel.info)
        if lvl is not None and lvl < _state["level"]:
            return
        for obs in observers:
            obs(event)

    for obs in observers:
        globalLogPublisher.removeObserver(obs)
    globalLogPublisher.addObserver(cast(ILogObserver, filtered))
    globalLogPublisher._pb_filtered = True  # type: ignore[attr-defined]


def json_observer() -> Any:
    """
    A JSON-lines log observer on stdout, for ``twistd --logger
    pocketbridge.server.log.json_observer``: one JSON object per event with the
    format fields (never secrets or payloads: the code does not log them).
    """
    import sys

    from twisted.logger import jsonFileLogObserver

    return jsonFileLogObserver(sys.stdout)
