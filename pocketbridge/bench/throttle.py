"""
Recognising that the server throttled the bench, and which setting to raise.

A figure measured while the server refuses part of the load measures the
limit, not the server. So a refusal that comes from a configured limit (an
HTTP 429 or 503 at the WebSocket upgrade, a 4029 close, a v2 ``error`` whose
code is a limit) stops the scenario at once, and the bench exits with one
line naming the setting of ``pocketbridge/server/config.py`` to raise.

``classify`` maps a close (code, reason) or a v2 error payload to a
``Throttle``; ``of_exception`` does it for whatever ``Client.connect`` or
``RawConnection.open`` raised. Nothing here touches the reactor.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, Mapping, Optional, Tuple

from pocketbridge.server.config import BY_NAME

#: Exit status of ``pocketbridge-bench`` when the server throttled it.
EXIT_THROTTLED = 3

# Autobahn's reason for a refused upgrade: 'WebSocket connection upgrade failed [429]: Too Many Requests'.
_UPGRADE_STATUS = re.compile(r"upgrade failed \[(\d{3})\]")

#: HTTP status at the upgrade → (what happened, settings to raise).
_UPGRADE_LIMITS: Dict[int, Tuple[str, Tuple[str, ...]]] = {
    429: ("HTTP 429 at the WebSocket upgrade (new connections per client IP)",
          ("conn_per_ip_rate", "conn_per_ip_burst")),
    503: ("HTTP 503 at the WebSocket upgrade (open connections per node, or the server is draining)",
          ("max_connections", "fd_reserve")),
}

#: Words of a 4029 reason (PROTOCOL.md §11, gateway/admission.py) → (what happened, settings).
_CLOSE_4029: Tuple[Tuple[str, str, Tuple[str, ...]], ...] = (
    ("failed handshakes", "close 4029 (handshake failures per client IP)", ("handshake_failures_per_ip",)),
    ("this device", "close 4029 (sockets per device)", ("sockets_per_device",)),
    ("this user", "close 4029 (sockets per user)", ("sockets_per_user",)),
)

#: A v2 ``error`` code that is a limit → (what happened, settings). PROTOCOL.md §8 has one today,
#: ``quota_exceeded``; ``rate_limited`` is recognised in case a server sends it (its message says which).
_V2_ERRORS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "quota_exceeded": ("v2 error quota_exceeded (stored bytes per user)", ("max_user_bytes",)),
    "rate_limited": ("v2 error rate_limited (events per device and per user)",
                     ("events_per_device_rate", "events_per_device_burst", "events_per_user_rate",
                      "events_per_user_burst")),
}
_V2_RATE_WORDS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("bytes", ("bytes_per_user_rate", "bytes_per_user_burst")),
    ("frames", ("frames_per_socket_rate", "frames_per_socket_burst")),
    ("device", ("events_per_device_rate", "events_per_device_burst")),
    ("user", ("events_per_user_rate", "events_per_user_burst")),
)


@dataclasses.dataclass(frozen=True)
class Throttle:
    """The server refused the bench because of a limit: what it did and the settings that set it."""

    refusal: str
    settings: Tuple[str, ...]
    detail: str = ""

    def as_dict(self) -> Dict[str, Any]:
        """JSON form (a scenario result's ``throttled`` value)."""
        return {"refusal": self.refusal, "settings": list(self.settings), "detail": self.detail}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Throttle":
        """Back from ``as_dict`` (results cross a pipe as plain dicts)."""
        return cls(str(d.get("refusal", "")), tuple(d.get("settings") or ()), str(d.get("detail", "")))

    def line(self, scenario: str) -> str:
        """The one line the bench prints before it exits: the refusal and each setting's option and env."""
        raise_what = ", ".join(_spelled(name) for name in self.settings)
        return ("pocketbridge-bench: stopped: the server throttled scenario {}: {}; raise {} on the server "
                "(docs/benchmarks.md has the flags) and run again; no figure reported".format(
                    scenario, self.refusal, raise_what))


def _spelled(name: str) -> str:
    """``conn_per_ip_rate (--conn-per-ip-rate / PB_CONN_PER_IP_RATE)``: the setting as the server spells it."""
    setting = BY_NAME.get(name)
    option = "--" + name.replace("_", "-")
    if setting is None:
        return name
    ways = [option] if setting.cli else []
    if setting.env:
        ways.append(setting.env)
    return "{} ({})".format(name, " / ".join(ways)) if ways else name


def classify(code: Optional[int], reason: str) -> Optional[Throttle]:
    """The throttle behind a close (``code``, ``reason``), or None when it is not a limit."""
    reason = reason or ""
    match = _UPGRADE_STATUS.search(reason)
    if match is not None:
        found = _UPGRADE_LIMITS.get(int(match.group(1)))
        return Throttle(found[0], found[1], reason[:160]) if found else None
    if code == 4029:
        lowered = reason.lower()
        for words, refusal, settings in _CLOSE_4029:
            if words in lowered:
                return Throttle(refusal, settings, reason[:160])
        return Throttle("close 4029", ("conn_per_ip_rate", "handshake_failures_per_ip", "sockets_per_device",
                                       "sockets_per_user"), reason[:160])
    return None


def classify_v2_error(payload: Mapping[str, Any]) -> Optional[Throttle]:
    """The throttle behind a v2 ``error`` payload (PROTOCOL.md §8), or None when its code is not a limit."""
    code = payload.get("code")
    found = _V2_ERRORS.get(code) if isinstance(code, str) else None
    if found is None:
        return None
    message = str(payload.get("message") or "")
    settings = found[1]
    if code == "rate_limited":
        lowered = message.lower()
        settings = next((s for word, s in _V2_RATE_WORDS if word in lowered), settings)
    return Throttle(found[0], settings, message[:160])


def of_exception(exc: BaseException) -> Optional[Throttle]:
    """The throttle behind an exception of ``Client.connect`` / ``RawConnection.open``, or None."""
    code = getattr(exc, "code", None)
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        return classify(code if isinstance(code, int) else None, reason)
    return None
