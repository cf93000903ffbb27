"""
Every setting of the server in one table (PROTOCOL.md §12 and the issue's list).

Each setting has a command-line option, an environment variable and a coerce
function; the command line wins over the environment, which wins over the
default. ``Settings`` is the frozen result handed to every component.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlparse

KIB = 1024
MIB = 1024 * 1024
GIB = 1024 * MIB


class ConfigError(Exception):
    """A setting has a bad value; the message names the setting."""


def _int(value: str) -> int:
    text = str(value).strip()
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ValueError("must be an integer")
    return int(text)


def _float(value: str) -> float:
    try:
        return float(str(value).strip())
    except ValueError:
        raise ValueError("must be a number") from None


def positive_int(value: str) -> int:
    """An integer ≥ 1."""
    n = _int(value)
    if n < 1:
        raise ValueError("must be an integer >= 1")
    return n


def non_negative_int(value: str) -> int:
    """An integer ≥ 0."""
    n = _int(value)
    if n < 0:
        raise ValueError("must be an integer >= 0")
    return n


def positive_float(value: str) -> float:
    """A number > 0."""
    n = _float(value)
    if not n > 0 or n != n or n == float("inf"):
        raise ValueError("must be a number > 0")
    return n


def flag(value: str) -> bool:
    """1/true/yes/on or 0/false/no/off."""
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be 1 or 0")


def database_url(value: str) -> str:
    """``postgresql://…`` (or ``postgres://…``); empty means SQLite."""
    if not value:
        return ""
    u = urlparse(value)
    if u.scheme not in ("postgresql", "postgres"):
        raise ValueError("must be a postgresql:// URL")
    return value


def redis_url(value: str) -> str:
    """``redis://host[:port][/db]``; empty means the in-process bus."""
    if not value:
        return ""
    u = urlparse(value)
    if u.scheme not in ("redis",) or not u.hostname:
        raise ValueError("must be a redis://host[:port][/db] URL")
    if u.port is not None and not (0 < u.port < 65536):
        raise ValueError("bad port")
    return value


def log_level(value: str) -> str:
    """debug, info, warn, error or critical."""
    v = value.strip().lower()
    if v == "warning":
        v = "warn"
    if v not in ("debug", "info", "warn", "error", "critical"):
        raise ValueError("must be debug, info, warn, error or critical")
    return v


def hex_key(value: str) -> str:
    """64 hex characters (a 32-byte key)."""
    v = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", v):
        raise ValueError("must be 64 hex characters")
    return v


def worker_count(value: str) -> int:
    """``auto`` (one per core) or an integer >= 1."""
    if str(value).strip().lower() == "auto":
        return max(1, os.cpu_count() or 1)
    return positive_int(value)


def text(value: str) -> str:
    """Any string."""
    return value


@dataclass(frozen=True)
class Setting:
    name: str
    coerce: Callable[[str], Any]
    default: Any
    env: Optional[str]
    help: str
    cli: bool = True


# name, coerce, default, environment variable, help
SETTINGS: List[Setting] = [
    Setting("listen", text, "tcp:3001", None, "Endpoint string to listen on (PORT env sets tcp:PORT)"),
    Setting("data_dir", text, "./pocketbridge-data", "PB_DATA_DIR", "Directory for the SQLite file and the generated server key"),
    Setting("database", database_url, "", "DATABASE_URL", "postgresql:// URL; absent = SQLite in the data dir"),
    Setting("redis", redis_url, "", "REDIS_URL", "redis:// URL for the cluster bus; absent = in-process bus"),
    Setting("redis_prefix", text, "pb:", "PB_REDIS_PREFIX", "Prefix of every Redis key and channel of this cluster"),
    Setting("legacy_clients", flag, False, "PB_LEGACY_CLIENTS", "Accept X-User-ID REST auth of old web clients (API.md 1.2)"),
    Setting("require_v2", flag, False, "PB_REQUIRE_V2", "Refuse protocol v1 clients"),
    Setting("log_level", log_level, "info", "LOG_LEVEL", "debug, info, warn, error or critical"),
    Setting("node_id", text, "", "PB_NODE_ID", "Name of this node (default: host:pid)"),
    Setting("trusted_proxies", text, "", "PB_TRUSTED_PROXIES", "Comma list of proxy IPs whose X-Forwarded-For is trusted"),
    # message sizes
    Setting("max_message_bytes", positive_int, 16 * MIB, "PB_MAX_MESSAGE_BYTES", "Largest message after authentication"),
    Setting("max_preauth_message_bytes", positive_int, 64 * KIB, "PB_MAX_PREAUTH_MESSAGE_BYTES", "Largest message before authentication"),
    Setting("max_payload_bytes", positive_int, 12 * MIB, "PB_MAX_PAYLOAD_BYTES", "Longest encrypted_payload, in characters"),
    Setting("max_user_bytes", positive_int, 2 * GIB, "PB_MAX_USER_BYTES", "Stored payload bytes per user"),
    Setting("max_preauth_messages", non_negative_int, 8, "PB_MAX_PREAUTH_MESSAGES", "Unexpected messages tolerated before authentication"),
    # times (seconds)
    Setting("session_max_age", positive_float, 86400.0, "PB_SESSION_MAX_AGE", "Session lifetime in seconds"),
    Setting("handshake_timeout", positive_float, 30.0, "PB_HANDSHAKE_TIMEOUT", "Seconds to complete the handshake"),
    Setting("heartbeat_interval", positive_float, 30.0, "PB_HEARTBEAT_INTERVAL", "Seconds between server pings"),
    Setting("heartbeat_timeout", positive_float, 60.0, "PB_HEARTBEAT_TIMEOUT", "Seconds without a pong before closing"),
    Setting("slow_consumer_timeout", positive_float, 60.0, "PB_SLOW_CONSUMER_TIMEOUT", "Seconds a stalled outbound buffer is tolerated"),
    Setting("cursor_flush_interval", positive_float, 5.0, "PB_CURSOR_FLUSH_INTERVAL", "Seconds between delivery-cursor writes"),
    Setting("event_retention_days", positive_float, 30.0, "PB_EVENT_RETENTION_DAYS", "Days events are kept"),
    # connection limits
    Setting("conn_per_ip_burst", positive_int, 60, "PB_CONN_PER_IP_BURST", "New connections per client IP: bucket size"),
    Setting("conn_per_ip_rate", positive_float, 1.0, "PB_CONN_PER_IP_RATE", "New connections per client IP: refill per second"),
    Setting("conn_open_per_ip", positive_int, 512, "PB_CONN_OPEN_PER_IP", "Open connections per client IP (the TCP peer), counted from accept; more are closed at accept"),
    Setting("max_connections", non_negative_int, 0, "PB_MAX_CONNECTIONS", "Open client connections per node; 0 = the fd limit minus --fd-reserve and --db-pool-size (a value can only lower that)"),
    Setting("fd_reserve", non_negative_int, 64, "PB_FD_RESERVE", "File descriptors kept from client connections for storage, Redis, logs and listeners"),
    Setting("reserved_connections", non_negative_int, 16, "PB_RESERVED_CONNECTIONS", "Last connection slots of a node that only serve /health and /metrics (at most half the cap)"),
    Setting("request_head_timeout", positive_float, 10.0, "PB_REQUEST_HEAD_TIMEOUT", "Seconds to send a complete HTTP request head, WebSocket upgrade included (from accept or the previous response)"),
    Setting("request_body_timeout", positive_float, 30.0, "PB_REQUEST_BODY_TIMEOUT", "Seconds to send an HTTP request body"),
    Setting("request_body_grace", positive_float, 10.0, "PB_REQUEST_BODY_GRACE", "Seconds of a request body before its minimum rate applies"),
    Setting("request_body_min_rate", non_negative_int, 1024, "PB_REQUEST_BODY_MIN_RATE", "Bytes per second a request body must average after the grace period (0 = no minimum)"),
    Setting("listen_backlog", positive_int, 1024, "PB_LISTEN_BACKLOG", "Accept queue of the listening sockets when the endpoint string sets no backlog= (a full queue drops SYNs: 1 s client retries)"),
    Setting("handshake_failures_per_ip", positive_int, 20, "PB_HANDSHAKE_FAILURES_PER_IP", "Handshake failures per IP per minute"),
    Setting("sockets_per_device", positive_int, 5, "PB_SOCKETS_PER_DEVICE", "Authenticated sockets per device"),
    Setting("sockets_per_user", positive_int, 50, "PB_SOCKETS_PER_USER", "Authenticated sockets per user"),
    # rates
    Setting("events_per_device_rate", positive_float, 100.0, "PB_EVENTS_PER_DEVICE_RATE", "Events per device per second"),
    Setting("events_per_device_burst", positive_int, 500, "PB_EVENTS_PER_DEVICE_BURST", "Events per device: burst"),
    Setting("events_per_user_rate", positive_float, 300.0, "PB_EVENTS_PER_USER_RATE", "Events per user per second (per node)"),
    Setting("events_per_user_burst", positive_int, 2000, "PB_EVENTS_PER_USER_BURST", "Events per user: burst"),
    Setting("bytes_per_user_rate", positive_float, 16.0 * MIB, "PB_BYTES_PER_USER_RATE", "Inbound payload bytes per user per second"),
    Setting("bytes_per_user_burst", positive_int, 64 * MIB, "PB_BYTES_PER_USER_BURST", "Inbound payload bytes per user: burst"),
    Setting("frames_per_socket_rate", positive_float, 200.0, "PB_FRAMES_PER_SOCKET_RATE", "Client frames per socket per second"),
    Setting("frames_per_socket_burst", positive_int, 1000, "PB_FRAMES_PER_SOCKET_BURST", "Client frames per socket: burst"),
    Setting("pending_bytes_per_socket", positive_int, 32 * MIB, "PB_PENDING_BYTES_PER_SOCKET", "Uncommitted payload bytes per socket"),
    Setting("outbound_pause_bytes", positive_int, 8 * MIB, "PB_OUTBOUND_PAUSE_BYTES", "v1 outbound buffer size that pauses delivery"),
    Setting("outbound_resume_bytes", positive_int, 1 * MIB, "PB_OUTBOUND_RESUME_BYTES", "Outbound buffer size below which paused delivery resumes"),
    Setting("outbound_max_bytes", positive_int, 24 * MIB, "PB_OUTBOUND_MAX_BYTES", "Unsent bytes held for an authenticated socket before it is closed 4008 at once"),
    Setting("preauth_outbound_bytes", positive_int, 64 * KIB, "PB_PREAUTH_OUTBOUND_BYTES", "Unsent bytes held for a connection before authentication; past it the connection is dropped"),
    Setting("preauth_close_grace", positive_float, 1.0, "PB_PREAUTH_CLOSE_GRACE", "Seconds a connection closed before authentication may take to answer the close before TCP is dropped"),
    Setting("v1_unacked_tracked", positive_int, 10000, "PB_V1_UNACKED_TRACKED", "Unacknowledged events tracked per v1 socket"),
    Setting("v2_window_events", positive_int, 256, "PB_V2_WINDOW_EVENTS", "v2 unacknowledged deliveries per socket"),
    Setting("v2_window_bytes", positive_int, 4 * MIB, "PB_V2_WINDOW_BYTES", "v2 unacknowledged payload bytes per socket"),
    # writer
    Setting("writer_max_batch", positive_int, 1000, "PB_WRITER_MAX_BATCH", "Most events committed in one transaction"),
    Setting("writer_delay_ms", non_negative_int, 0, "PB_WRITER_DELAY_MS", "Extra milliseconds to gather a batch when idle"),
    Setting("writer_pipeline", positive_int, 2, "PB_WRITER_PIPELINE", "Writer transactions in flight at once, each for other users (at most --db-pool-size minus 1, so REST and handshakes keep a connection; 1 on SQLite)"),
    Setting("writer_retry_max", positive_float, 5.0, "PB_WRITER_RETRY_MAX", "Longest wait in seconds between commit attempts while storage is failing"),
    Setting("storage_log_interval", positive_float, 60.0, "PB_STORAGE_LOG_INTERVAL", "Seconds between 'storage still unavailable' log lines during an outage"),
    Setting("bus_held_users", positive_int, 10000, "PB_BUS_HELD_USERS", "Users with news remembered during a Redis outage (past it: every node re-reads all its users)"),
    Setting("bus_resend_rate", positive_int, 2000, "PB_BUS_RESEND_RATE", "Small 'user has news' notices per second sent after Redis comes back"),
    Setting("hub_read_page", positive_int, 256, "PB_HUB_READ_PAGE", "Most events the hub reads from storage at once when filling a gap"),
    Setting("db_pool_size", positive_int, 4, "PB_DB_POOL_SIZE", "PostgreSQL connections per node"),
    # REST
    Setting("cors_origin", text, "", "CORS_ORIGIN", "Comma list of allowed browser origins, or * (unset: none)"),
    Setting("rest_requests_per_minute", positive_int, 120, "PB_REST_REQUESTS_PER_MINUTE", "REST requests per client IP per minute"),
    Setting("pairing_failures_per_ip", positive_int, 10, "PB_PAIRING_FAILURES_PER_IP", "Failed pairing lookups per IP (and per user) per window"),
    Setting("pairing_failures_global", positive_int, 200, "PB_PAIRING_FAILURES_GLOBAL", "Failed pairing lookups service-wide per window (divided by live codes / 50)"),
    Setting("pairing_failure_window", positive_float, 600.0, "PB_PAIRING_FAILURE_WINDOW", "Seconds of the failed-lookup window"),
    Setting("pairing_ttl", positive_float, 600.0, "PB_PAIRING_TTL", "Seconds a v1 pairing code lives"),
    Setting("pairing_v2_ttl", positive_float, 300.0, "PB_PAIRING_V2_TTL", "Seconds a v2 pairing mailbox lives"),
    Setting("auth_window", positive_float, 300.0, "PB_AUTH_WINDOW", "Seconds a signed request's ts may differ from now"),
    Setting("drain_window", positive_float, 30.0, "PB_DRAIN_WINDOW", "Seconds over which a drain closes sockets"),
    Setting("presence_ttl", positive_float, 60.0, "PB_PRESENCE_TTL", "Seconds a node's presence entry lives without refresh (refreshed every third of it)"),
    Setting("jobs_interval", positive_float, 60.0, "PB_JOBS_INTERVAL", "Seconds between background job runs"),
    Setting("job_batch", positive_int, 1000, "PB_JOB_BATCH", "Rows a job deletes per transaction"),
    Setting("shutdown_window", positive_float, 2.0, "PB_SHUTDOWN_WINDOW", "Seconds over which SIGTERM closes sockets (keep below the supervisor's stop timeout)"),
    Setting("workers", worker_count, 1, "PB_WORKERS", "Worker processes serving the listening socket (auto = one per core); more than 1 needs PostgreSQL and Redis"),
    Setting("metrics_listen", text, "", "PB_METRICS_LISTEN", "Separate endpoint for /metrics (empty: on the main port)"),
    Setting("admin_api_key", text, "", "ADMIN_API_KEY", "Admin bearer key, at least 32 characters (environment only)", cli=False),
]

BY_NAME: Dict[str, Setting] = {s.name: s for s in SETTINGS}


def _settings_fields() -> Dict[str, Any]:
    return {s.name: s.default for s in SETTINGS}


@dataclass(frozen=True)
class Settings:
    """The resolved configuration. Secrets (server key) are carried separately."""

    values: Dict[str, Any] = field(default_factory=_settings_fields)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def replace(self, **changes: Any) -> "Settings":
        v = dict(self.values)
        for k, val in changes.items():
            if k not in BY_NAME:
                raise KeyError(k)
            v[k] = val
        return Settings(v)


def resolve(cli: Mapping[str, Optional[str]], environ: Mapping[str, str]) -> Settings:
    """
    Merge command line (values not None win), environment and defaults.

    Raises ConfigError naming the first bad setting.
    """
    values: Dict[str, Any] = {}
    for s in SETTINGS:
        raw: Optional[str] = cli.get(s.name)
        source = "--" + s.name.replace("_", "-")
        if raw is None and s.name == "listen" and environ.get("PORT"):
            raw = "tcp:" + environ["PORT"]
            source = "PORT"
            if not re.fullmatch(r"[0-9]{1,5}", environ["PORT"]) or not 0 < int(environ["PORT"]) < 65536:
                raise ConfigError("PORT: must be a TCP port number 1-65535")
        if raw is None and s.env and s.env in environ:
            raw = environ[s.env]
            source = s.env
        if raw is None:
            values[s.name] = s.default
            continue
        if isinstance(raw, bool):
            values[s.name] = raw
            continue
        try:
            values[s.name] = s.coerce(raw)
        except (ValueError, TypeError) as e:
            raise ConfigError("{}: {} (got {!r})".format(source, e, _redact(raw))) from None
    settings = Settings(values)
    _check(settings)
    return settings


def _redact(raw: str) -> str:
    return raw if len(raw) <= 80 else raw[:77] + "..."


def _check(s: Settings) -> None:
    if s.max_preauth_message_bytes > s.max_message_bytes:
        raise ConfigError("--max-preauth-message-bytes: must not exceed --max-message-bytes")
    if s.max_payload_bytes + 64 * KIB > s.max_message_bytes:
        raise ConfigError("--max-payload-bytes: must be at least 64 KiB below --max-message-bytes")
    if s.admin_api_key and len(s.admin_api_key) < 32:
        raise ConfigError("ADMIN_API_KEY: must be at least 32 characters")
    if s.heartbeat_timeout < s.heartbeat_interval:
        raise ConfigError("--heartbeat-timeout: must be >= --heartbeat-interval")


def trusted_proxy_set(s: Settings) -> Tuple[str, ...]:
    """The configured trusted proxy addresses."""
    return tuple(p.strip() for p in s.trusted_proxies.split(",") if p.strip())


def environment() -> Mapping[str, str]:
    """The process environment (a seam for tests)."""
    return os.environ
