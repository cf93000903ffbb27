"""
Presence: which devices have authenticated sockets, on any node (PROTOCOL.md §10).

``LocalPresence`` is the embedded shape (one process). ``RedisPresence`` keeps
one hash per user in Redis with a field per socket
(``device|node|socket`` → ``auth_ms|expires_ms``); each node refreshes its own
entries every 20 s with a 60 s lifetime, so a crashed node's sockets stop
counting within a minute and the sweep job announces those devices offline.
Both offer the same Deferred-returning interface.

The socket limits (PROTOCOL.md §12) are reserved, not merely checked:
``claim`` counts the live sockets and records the new one in one step
(synchronous in-process, one Lua script in Redis), so handshakes that run
at the same time cannot all pass a count taken before any of them is
recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Tuple

import orjson
from twisted.internet.defer import Deferred, succeed

if TYPE_CHECKING:  # txredisapi is a server-only dependency
    from pocketbridge.server.fanout.redisconn import Commands, RedisConnection

SocketMap = Dict[str, Dict[str, int]]  # device_id → {socket_key: auth_ms}

SOCKETS_PER_DEVICE = "sockets_per_device"
SOCKETS_PER_USER = "sockets_per_user"


@dataclass(frozen=True)
class Claim:
    """
    The answer of ``Presence.claim``: ``refused`` names the limit that was
    reached (``sockets_per_device`` or ``sockets_per_user``; nothing was
    recorded), or is None and the socket's slot is held; ``online`` is True
    when the slot is held and the device had no other live socket.
    """

    refused: Optional[str] = None
    online: bool = False

    @property
    def held(self) -> bool:
        return self.refused is None


class Presence(Protocol):
    """What the node needs of presence; ``LocalPresence`` and ``RedisPresence`` both offer it."""

    def claim(self, user_id: str, device_id: str, socket_id: str, auth_ms: int,
              max_device: int, max_user: int) -> "Deferred[Claim]": ...

    def remove(self, user_id: str, device_id: str, socket_id: str) -> "Deferred[bool]": ...

    def user_sockets(self, user_id: str) -> "Deferred[SocketMap]": ...

    def node_summary(self) -> Tuple[int, int]: ...

    def refresh(self) -> "Deferred[None]": ...

    def publish_node(self, node_id: str, stats: Dict[str, Any]) -> "Deferred[None]": ...

    def node_stats(self) -> "Deferred[List[Dict[str, Any]]]": ...

    def sweep(self, now_ms: int) -> "Deferred[List[Tuple[str, str]]]": ...


class LocalPresence:
    """
    Presence of this process's sockets only. Every operation is O(1) in the
    number of other users and sockets on the node: entries are kept per user,
    and the node's totals are counters.
    """

    def __init__(self) -> None:
        self.users: Dict[str, Dict[str, Dict[str, int]]] = {}  # user → device → {socket: auth_ms}
        self.per_user: Dict[str, int] = {}  # live sockets per user
        self.sockets = 0  # live sockets on this node
        self.online = 0  # devices with at least one live socket on this node

    def claim(self, user_id: str, device_id: str, socket_id: str, auth_ms: int,
              max_device: int, max_user: int) -> "Deferred[Claim]":
        """
        Record a socket if the device has fewer than ``max_device`` and the
        user fewer than ``max_user`` live sockets (the socket itself not
        counted); answered at once, so no other claim runs in between.
        """
        devices = self.users.get(user_id)
        sockets = devices.get(device_id, {}) if devices is not None else {}
        again = 1 if socket_id in sockets else 0  # a claim of a held socket renews it
        device_count = len(sockets) - again
        user_count = self.per_user.get(user_id, 0) - again
        if device_count >= max_device:
            return succeed(Claim(SOCKETS_PER_DEVICE))
        if user_count >= max_user:
            return succeed(Claim(SOCKETS_PER_USER))
        if not again:
            self.per_user[user_id] = user_count + 1
            self.sockets += 1
            if not sockets:
                self.online += 1
        self.users.setdefault(user_id, {}).setdefault(device_id, sockets)[socket_id] = auth_ms
        return succeed(Claim(None, online=device_count == 0))

    def remove(self, user_id: str, device_id: str, socket_id: str) -> "Deferred[bool]":
        """Forget a socket; True when the device just went offline."""
        devices = self.users.get(user_id)
        sockets = devices.get(device_id) if devices is not None else None
        if devices is None or not sockets or socket_id not in sockets:
            return succeed(False)
        del sockets[socket_id]
        self.sockets -= 1
        left = self.per_user.get(user_id, 1) - 1
        if left > 0:
            self.per_user[user_id] = left
        else:
            self.per_user.pop(user_id, None)
        if sockets:
            return succeed(False)
        del devices[device_id]
        self.online -= 1
        if not devices:
            del self.users[user_id]
        return succeed(True)

    def user_sockets(self, user_id: str) -> "Deferred[SocketMap]":
        """device_id → {socket: auth_ms} for the user's live sockets."""
        return succeed({d: dict(s) for d, s in self.users.get(user_id, {}).items()})

    def node_summary(self) -> Tuple[int, int]:
        """(sockets, devices online) on this node."""
        return self.sockets, self.online

    def refresh(self) -> "Deferred[None]":
        """Nothing expires in-process."""
        return succeed(None)

    def publish_node(self, node_id: str, stats: Dict[str, Any]) -> "Deferred[None]":
        """One process: nothing to share."""
        return succeed(None)

    def node_stats(self) -> "Deferred[List[Dict[str, Any]]]":
        """Other nodes' stats: none in the embedded shape."""
        return succeed([])

    def sweep(self, now_ms: int) -> "Deferred[List[Tuple[str, str]]]":
        """Nothing expires in-process."""
        return succeed([])


# Lua: count the live sockets of the user (and of the device, by field
# prefix), the claimed field itself left out; under both limits record it.
# -1: the device's limit, -2: the user's; else the device's live sockets
# before this one (0: it just came online).
_CLAIM = """
local all = redis.call('HGETALL', KEYS[1])
local now = tonumber(ARGV[1])
local dev, usr = 0, 0
for i = 1, #all, 2 do
  if all[i] ~= ARGV[3] then
    local exp = tonumber(string.match(all[i + 1], '|(%d+)$'))
    if exp and exp > now then
      usr = usr + 1
      if string.sub(all[i], 1, #ARGV[2]) == ARGV[2] then dev = dev + 1 end
    end
  end
end
if dev >= tonumber(ARGV[6]) then return -1 end
if usr >= tonumber(ARGV[7]) then return -2 end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SADD', KEYS[2], ARGV[8])
return dev
"""

# Lua: remove one socket field, then count the device's live sockets (-1: there was no such field).
_REMOVE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return -1 end
local all = redis.call('HGETALL', KEYS[1])
local dev = 0
local now = tonumber(ARGV[2])
for i = 1, #all, 2 do
  local exp = tonumber(string.match(all[i + 1], '|(%d+)$'))
  if exp and exp > now and string.sub(all[i], 1, #ARGV[3]) == ARGV[3] then dev = dev + 1 end
end
return dev
"""

# Lua: drop expired fields of one user; return the devices that have no live socket left.
_SWEEP = """
local all = redis.call('HGETALL', KEYS[1])
local now = tonumber(ARGV[1])
local live, dead = {}, {}
for i = 1, #all, 2 do
  local device = string.match(all[i], '^([^|]+)|')
  local exp = tonumber(string.match(all[i + 1], '|(%d+)$'))
  if exp and exp > now then live[device] = true
  else redis.call('HDEL', KEYS[1], all[i]); dead[device] = true end
end
local out = {}
for device, _ in pairs(dead) do if not live[device] then table.insert(out, device) end end
if redis.call('HLEN', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[2]) end
return out
"""


#: Sockets renewed by one refresh script.
REFRESH_CHUNK = 256

# Lua: renew entries. KEYS[1] the users set, KEYS[i > 1] the hash of entry i - 1;
# ARGV[1] the TTL in ms, then per entry its field, value and user id.
_REFRESH = """
for i = 2, #KEYS do
  local j = 2 + (i - 2) * 3
  redis.call('HSET', KEYS[i], ARGV[j], ARGV[j + 1])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
  redis.call('SADD', KEYS[1], ARGV[j + 2])
end
return #KEYS - 1
"""


class RedisPresence:
    """Presence shared by every node through Redis (the node's command connection)."""

    def __init__(self, redis: RedisConnection, node_id: str, now_ms: Callable[[], int], prefix: str,
                 ttl_s: float = 60.0) -> None:
        self.ttl_ms = int(ttl_s * 1000)
        self.redis = redis
        self.node_id = node_id
        self.now_ms = now_ms
        self.prefix = prefix
        self.users_key = prefix + "presence:users"
        self.local: Dict[Tuple[str, str, str], int] = {}  # (user, device, socket) → auth_ms

    def _key(self, user_id: str) -> str:
        return self.prefix + "presence:" + user_id

    def _field(self, device_id: str, socket_id: str) -> str:
        return "{}|{}|{}".format(device_id, self.node_id, socket_id)

    def _conn(self) -> Commands:
        return self.redis.command()

    async def _eval(self, script: str, keys: List[str], args: List[Any]) -> Any:
        return await self._conn().eval(script, keys, [str(a) for a in args])

    def claim(self, user_id: str, device_id: str, socket_id: str, auth_ms: int,
              max_device: int, max_user: int) -> "Deferred[Claim]":
        """
        Count and record in one script: one round trip, and Redis runs
        scripts one at a time, so the claims of every node are serialised.
        A held socket joins ``local`` (the refresh renews it) once Redis has
        answered, never before: a refresh that ran meanwhile would record a
        socket the script refused. When no answer comes (Redis down) it joins
        ``local`` all the same, because the caller then admits it without
        limits, and the error is passed on; ``remove`` forgets it.
        """
        entry = (user_id, device_id, socket_id)

        async def run() -> Claim:
            now = self.now_ms()
            try:
                n = int(await self._eval(_CLAIM, [self._key(user_id), self.users_key], [
                    now, device_id + "|", self._field(device_id, socket_id),
                    "{}|{}".format(auth_ms, now + self.ttl_ms), self.ttl_ms, max_device, max_user, user_id,
                ]))
            except Exception:
                self.local[entry] = auth_ms
                raise
            if n < 0:
                return Claim(SOCKETS_PER_DEVICE if n == -1 else SOCKETS_PER_USER)
            self.local[entry] = auth_ms
            return Claim(None, online=n == 0)

        return Deferred.fromCoroutine(run())

    def remove(self, user_id: str, device_id: str, socket_id: str) -> "Deferred[bool]":
        self.local.pop((user_id, device_id, socket_id), None)

        async def run() -> bool:
            n = await self._eval(_REMOVE, [self._key(user_id)], [
                self._field(device_id, socket_id), self.now_ms(), device_id + "|",
            ])
            return int(n) == 0

        return Deferred.fromCoroutine(run())

    def user_sockets(self, user_id: str) -> "Deferred[SocketMap]":
        async def run() -> SocketMap:
            raw = await self._conn().hgetall(self._key(user_id))
            now = self.now_ms()
            out: SocketMap = {}
            for field, value in (raw or {}).items():
                f = field.decode() if isinstance(field, bytes) else field
                v = value.decode() if isinstance(value, bytes) else value
                auth, _, exp = v.partition("|")
                if int(exp) > now:
                    device, node, sock = f.split("|", 2)
                    out.setdefault(device, {})[node + "|" + sock] = int(auth)
            return out

        return Deferred.fromCoroutine(run())

    def node_summary(self) -> Tuple[int, int]:
        """(sockets, devices online) on this node."""
        return len(self.local), len({(u, d) for u, d, _ in self.local})

    def refresh(self) -> "Deferred[None]":
        """
        Renew this node's entries (every ``presence_ttl`` / 3): one script per
        ``REFRESH_CHUNK`` sockets, so a node of N sockets spends N / 256 round
        trips, not 3 N, and no script holds Redis for long.
        """

        async def run() -> None:
            conn = self._conn()
            exp = self.now_ms() + self.ttl_ms
            entries = list(self.local.items())
            for start in range(0, len(entries), REFRESH_CHUNK):
                keys = [self.users_key]
                args: List[Any] = [self.ttl_ms]
                for (user, device, sock), auth in entries[start:start + REFRESH_CHUNK]:
                    keys.append(self._key(user))
                    args += [self._field(device, sock), "{}|{}".format(auth, exp), user]
                await conn.eval(_REFRESH, keys, [str(a) for a in args])

        return Deferred.fromCoroutine(run())

    def publish_node(self, node_id: str, stats: Dict[str, Any]) -> "Deferred[None]":
        """Share this node's /admin/stats line (valid for one presence TTL)."""

        async def run() -> None:
            entry = dict(stats, expires_at=self.now_ms() + self.ttl_ms)
            await self._conn().hset(self.prefix + "nodes", node_id, orjson.dumps(entry))

        return Deferred.fromCoroutine(run())

    def node_stats(self) -> "Deferred[List[Dict[str, Any]]]":
        """The live stats lines of every node that refreshed within the TTL (expired ones are removed)."""

        async def run() -> List[Dict[str, Any]]:
            conn = self._conn()
            raw = await conn.hgetall(self.prefix + "nodes")
            now = self.now_ms()
            out: List[Dict[str, Any]] = []
            for field, value in (raw or {}).items():
                entry = orjson.loads(value)
                if entry.pop("expires_at", 0) > now:
                    out.append(entry)
                else:
                    await conn.hdel(self.prefix + "nodes", field)
            return out

        return Deferred.fromCoroutine(run())

    def sweep(self, now_ms: int) -> "Deferred[List[Tuple[str, str]]]":
        """Remove expired entries of every user; the (user, device) pairs that went offline."""

        async def run() -> List[Tuple[str, str]]:
            conn = self._conn()
            users = await conn.smembers(self.users_key)
            gone: List[Tuple[str, str]] = []
            for u in users or []:
                user = u.decode() if isinstance(u, bytes) else u
                devices = await self._eval(_SWEEP, [self._key(user), self.users_key], [now_ms, user])
                for d in devices or []:
                    gone.append((user, d.decode() if isinstance(d, bytes) else d))
            return gone

        return Deferred.fromCoroutine(run())
