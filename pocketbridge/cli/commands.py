"""
``pocketbridge-cli`` commands ``keygen``, ``send``, ``devices``, ``revoke``
and ``status`` (``watch`` is in ``cli_watch``, ``pair`` in ``cli_pair``).

Each command takes the parsed arguments and a text stream for results and
returns the exit status; failures are raised (``CliError`` and the SDK's
exceptions) and turned into one line by ``cli.main``.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from typing import Any, Dict, List, Optional, TextIO

import orjson

from pocketbridge.cli.support import (
    Api,
    CliError,
    UsageError,
    close_client,
    connect_device,
    emit,
    keys_path,
    progress,
    rest_failure,
    save_keys,
)
from pocketbridge.client import DeviceKeys, EventRejected
from pocketbridge.client.payload import PayloadKey
from pocketbridge.protocol.wire import is_uuid

_ID_PREFIX = re.compile(r"^[0-9a-f-]{4,36}\Z")


# ---------------------------------------------------------------- keygen


def cmd_keygen(args: argparse.Namespace, out: TextIO) -> int:
    """Write a new device key file (a new user, or ``--from`` another file's user); print the ids, never the seed."""
    path = keys_path(args.keys)
    if os.path.exists(path) and not args.force:
        raise CliError("{} exists; refusing to overwrite a key file (use --force)".format(path))
    if args.from_path:
        keys = DeviceKeys.load(args.from_path).for_new_device(args.name, args.device_type)
        progress("copied the user key from {}; `pocketbridge-cli pair` does this without the key ever leaving"
                 " a device in the clear".format(args.from_path))
    else:
        keys = DeviceKeys.generate(args.name, args.device_type)
    keys.save(path)
    emit(out, "user_id={}\ndevice_id={}".format(keys.user_id, keys.device_id))
    progress("wrote {} (mode 0600; keep it private: it holds the user key)".format(path))
    return 0


# ---------------------------------------------------------------- send


def expiry_ms(args: argparse.Namespace, now_ms: int) -> Optional[int]:
    """The event's ``ttl`` field (an absolute time in ms) from ``--ttl MS`` (relative) or ``--expires-at MS``."""
    if args.ttl is not None:
        return now_ms + args.ttl
    return args.expires_at  # type: ignore[no-any-return]


async def cmd_send(reactor: Any, args: argparse.Namespace, payload: bytes, out: TextIO) -> int:
    """Encrypt ``payload`` with the user's payload key, send it as one event, print where it was stored."""
    path = keys_path(args.keys)
    keys = DeviceKeys.load(path)
    try:
        sealed = PayloadKey.from_identity(keys.identity).seal(payload, args.stream, args.type)
    except ValueError as e:
        raise UsageError("cannot encrypt for this stream and type: {}".format(e)) from e
    progress("connecting to {} as device {}".format(args.urls.ws, keys.device_id))
    client = await connect_device(reactor, args.urls, keys, path, args.server_key)
    try:
        device_seq = client.next_device_seq
        # Reserve the seq in the file before it is used: a crash must never
        # reuse it for another event (the server would call that a conflict).
        keys.next_device_seq = max(keys.next_device_seq, device_seq + 1)
        save_keys(keys, path)
        try:
            ttl = expiry_ms(args, int(reactor.seconds() * 1000))
            ack = await client.send_event(args.stream, args.type, sealed, ttl=ttl, device_seq=device_seq,
                                          timeout=args.timeout)
        except EventRejected as e:
            raise CliError("{}: {}".format(e.code, e.message), prefix="rejected") from e
    finally:
        await close_client(reactor, client)
    if ack.get("dropped"):
        raise CliError("the server acknowledged the event but dropped it (device_seq {})".format(device_seq))
    emit(out, "stored seq={} stream_seq={}".format(ack.get("seq"), ack.get("stream_seq")))
    return 0


# ---------------------------------------------------------------- devices


def format_time(ms: Any) -> str:
    """Milliseconds since the epoch as ``YYYY-MM-DD HH:MM:SSZ`` (UTC); ``-`` when absent."""
    if not isinstance(ms, int) or isinstance(ms, bool):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))


def device_rows(devices: List[Dict[str, Any]], this_device: str) -> List[List[str]]:
    """The table rows (header first) for ``devices``; ``*`` marks this device."""
    rows = [["", "DEVICE ID", "NAME", "TYPE", "ONLINE", "LAST SEEN"]]
    for d in devices:
        current = d.get("is_current") or d.get("device_id") == this_device
        if d.get("revoked_at"):
            online, seen = "revoked", format_time(d.get("revoked_at"))
        else:
            online = "yes" if d.get("is_online") else "no"
            seen = "now" if d.get("is_online") else format_time(d.get("last_seen"))
        rows.append(["*" if current else "", str(d.get("device_id")), d.get("device_name") or "-",
                     str(d.get("device_type") or "-"), online, seen])
    return rows


def format_table(rows: List[List[str]]) -> str:
    """Left-aligned columns, two spaces apart, no trailing blanks."""
    widths = [max(1, max(len(r[i]) for r in rows)) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


async def list_devices(api: Api, include_revoked: bool) -> Dict[str, Any]:
    """``GET /api/devices``: the server's document."""
    resp = await api.request("GET", "/api/devices" + ("?include_revoked=1" if include_revoked else ""))
    if resp.status != 200 or not isinstance(resp.json, dict) or not isinstance(resp.json.get("devices"), list):
        raise CliError(rest_failure(resp, "listing the devices"))
    return resp.json


async def cmd_devices(reactor: Any, args: argparse.Namespace, out: TextIO) -> int:
    """Print the user's devices as a table (``*`` = this device) or as the server's JSON."""
    path = keys_path(args.keys)
    keys = DeviceKeys.load(path)
    api = Api(reactor, args.urls, keys, path, args.server_key, args.timeout)
    doc = await list_devices(api, args.all)
    if args.json:
        emit(out, orjson.dumps(doc).decode("utf-8"))
    else:
        devices = [d for d in doc["devices"] if isinstance(d, dict)]
        emit(out, format_table(device_rows(devices, keys.device_id)))
    return 0


# ---------------------------------------------------------------- revoke


async def resolve_device(api: Api, given: str) -> str:
    """A full device id from a full id or a unique prefix of one (of the user's devices, revoked included)."""
    wanted = given.strip().lower()
    if is_uuid(wanted):
        return wanted
    if not _ID_PREFIX.match(wanted):
        raise UsageError("{!r} is not a device id (a UUID, or at least its first 4 characters)".format(given))
    doc = await list_devices(api, include_revoked=True)
    matches = [d["device_id"] for d in doc["devices"]
               if isinstance(d, dict) and str(d.get("device_id", "")).startswith(wanted)]
    if not matches:
        raise CliError("no device of this user has an id starting with {}".format(wanted))
    if len(matches) > 1:
        raise CliError("{} matches {} devices; give more of the id".format(wanted, len(matches)))
    return str(matches[0])


async def cmd_revoke(reactor: Any, args: argparse.Namespace, out: TextIO) -> int:
    """``DELETE /api/devices/{id}``; the current device only with ``--self``."""
    path = keys_path(args.keys)
    keys = DeviceKeys.load(path)
    api = Api(reactor, args.urls, keys, path, args.server_key, args.timeout)
    target = await resolve_device(api, args.device_id)
    if target == keys.device_id and not args.self:
        raise UsageError("{} is this device; to sign this device out, add --self".format(target))
    resp = await api.request("DELETE", "/api/devices/" + target)
    if resp.status == 404:
        raise CliError("no device {} among this user's devices".format(target))
    if resp.status != 200:
        raise CliError(rest_failure(resp, "revoking {}".format(target)))
    message = resp.json.get("message") if isinstance(resp.json, dict) else None
    if isinstance(message, str) and "already" in message.lower():
        emit(out, "already revoked {}".format(target))
        return 0
    emit(out, "revoked {}".format(target))
    if target == keys.device_id:
        progress("this device is signed out: the server refuses its connections and signed requests from now on")
    else:
        progress("its connections are closed and refused from now on; its events stay. It still holds the user"
                 " key: if it may be in the wrong hands, start a new identity (keygen) and pair your devices again")
    return 0


# ---------------------------------------------------------------- status


def _health_line(status: int, doc: Any) -> str:
    """``ok (version …, node …, database ok, bus embedded)`` from a /health answer."""
    if not isinstance(doc, dict):
        return "HTTP {} (not a PocketBridge health answer)".format(status)
    services = doc.get("services")
    if not isinstance(services, dict):
        services = {}
    details = ["version {}".format(doc.get("version")), "node {}".format(doc.get("node_id"))]
    details += ["{} {}".format(k, v) for k, v in sorted(services.items())]
    return "{} ({})".format(doc.get("status", "HTTP {}".format(status)), ", ".join(details))


async def cmd_status(reactor: Any, args: argparse.Namespace, out: TextIO) -> int:
    """Server health, this device's ids and server pin, connection status and presence of the user's devices."""
    path = keys_path(args.keys)
    keys = DeviceKeys.load(path)
    api = Api(reactor, args.urls, keys, path, args.server_key, args.timeout)
    health = await api.get_unsigned("/health")
    healthy = health.status == 200 and isinstance(health.json, dict) and health.json.get("status") == "ok"
    emit(out, "server:      {} (WebSocket {})".format(args.urls.rest, args.urls.ws))
    emit(out, "health:      {}".format(_health_line(health.status, health.json)))
    emit(out, "user_id:     {}".format(keys.user_id))
    emit(out, "device_id:   {} (name {}, type {})".format(
        keys.device_id, orjson.dumps(keys.device_name).decode("utf-8"), keys.device_type))
    if not healthy and health.status != 503:
        raise CliError("{} did not answer /health like a PocketBridge server (HTTP {})".format(
            args.urls.rest, health.status))
    conn = await api.request("GET", "/api/connection-status")  # registers the device if needed (pins the key)
    presence = await api.request("GET", "/api/presence")
    for resp, doing in ((conn, "reading the connection status"), (presence, "reading presence")):
        if resp.status != 200 or not isinstance(resp.json, dict):
            raise CliError(rest_failure(resp, doing))
    pin = keys.pinned_server_key(args.urls.ws)
    emit(out, "server key:  {}".format("{} (pinned for {})".format(pin, args.urls.address) if pin else
                                      "not pinned yet (pinned on the first v2 connection)"))
    conn_devices = [d for d in conn.json.get("devices") or [] if isinstance(d, dict)]
    mine = next((d for d in conn_devices if d.get("device_id") == keys.device_id), {})
    emit(out, "connection:  this device {}; {} of {} devices connected".format(
        "connected ({} sockets)".format(mine.get("sockets")) if mine.get("connected") else "not connected",
        sum(1 for d in conn_devices if d.get("connected")), len(conn_devices)))
    emit(out, "presence:    {} of {} devices online".format(presence.json.get("online_count"),
                                                            presence.json.get("total_count")))
    if not healthy:
        raise CliError("the server is not healthy: {}".format(_health_line(health.status, health.json)))
    return 0
