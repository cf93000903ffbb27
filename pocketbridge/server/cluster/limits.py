"""
Limits shared by every node (ARCHITECTURE.md "Cluster concerns"): new
connections and handshake failures per client IP, the REST budget, failed
pairing lookups, and the signed-request replay cache.

``LocalLimits`` keeps them in memory (embedded shape). ``RedisLimits`` keeps
them in Redis with atomic Lua scripts so all nodes share one budget; when
Redis is unreachable it falls back to its own local state rather than
refusing everyone (limits are best effort, the replay cache included: a
signature can then be accepted once per node for the outage).

Budgets that an await separates from the work they guard are *reserved*:
``reserve`` takes one slot from every budget that applies in one atomic step
(a synchronous step here, one Lua script in Redis), before the work; the
caller gives it back with ``release`` when the work turns out not to count.
Token buckets have ``refund`` for the same pattern.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from pocketbridge.server.buckets import TokenBucket

if TYPE_CHECKING:  # txredisapi is a server-only dependency
    from pocketbridge.server.fanout.redisconn import Commands, RedisConnection

log = Logger()

# A reservation: which store granted it and, per budget key, the window it was taken in.
Ticket = Tuple[str, List[Tuple[str, Any]]]


class Limits(Protocol):
    """The shared limits a node uses; ``LocalLimits`` and ``RedisLimits`` both offer them (documented there)."""

    def take(self, name: str, key: str, rate: float, burst: float, n: float = 1.0) -> "Deferred[float]": ...

    def peek(self, name: str, key: str, rate: float, burst: float, n: float = 1.0) -> "Deferred[float]": ...

    def charge(self, name: str, key: str, rate: float, burst: float, n: float = 1.0) -> "Deferred[None]": ...

    def refund(self, name: str, key: str, rate: float, burst: float, n: float = 1.0) -> "Deferred[None]": ...

    def window(self, name: str, key: str, window_s: float, add: int = 0) -> "Deferred[Tuple[int, int]]": ...

    def budget_count(self, name: str, key: str, window_s: float, add: int = 0) -> "Deferred[Tuple[int, int]]": ...

    def reserve(self, name: str, limits: Sequence[Tuple[str, int]], window_s: float
                ) -> "Deferred[Tuple[Optional[Ticket], int, List[str]]]": ...

    def release(self, name: str, ticket: Ticket) -> "Deferred[None]": ...

    def insert_if_absent(self, key: str, expires_at_ms: int, now_ms: int) -> "Deferred[bool]": ...

    def sweep(self) -> None: ...


class LocalLimits:
    """In-memory token buckets, fixed windows and a replay set."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.buckets: Dict[Tuple[str, str], TokenBucket] = {}
        self.windows: Dict[Tuple[str, str], Tuple[int, float, float]] = {}  # (count, start, length)
        self.seen: Dict[str, int] = {}

    def _bucket(self, name: str, key: str, rate: float, burst: float) -> TokenBucket:
        b = self.buckets.get((name, key))
        if b is None or b.rate != rate or b.burst != burst:
            b = self.buckets[(name, key)] = TokenBucket(rate, burst, self.now)
        return b

    def take(self, name: str, key: str, rate: float, burst: float, n: float = 1.0) -> "Deferred[float]":
        """Take ``n`` tokens if there; fires with 0 or the seconds to wait."""
        return succeed(self._bucket(name, key, rate, burst).try_take(n))

    def peek(self, name: str, key: str, rate: float, burst: float, n: float = 1.0) -> "Deferred[float]":
        """Seconds until ``n`` tokens are there, taking none."""
        return succeed(self._bucket(name, key, rate, burst).wait_for(n))

    def charge(self, name: str, key: str, rate: float, burst: float, n: float = 1.0) -> "Deferred[None]":
        """Take ``n`` tokens unconditionally (the bucket may go negative)."""
        self._bucket(name, key, rate, burst).take(n)
        return succeed(None)

    def refund(self, name: str, key: str, rate: float, burst: float, n: float = 1.0) -> "Deferred[None]":
        """Give back ``n`` tokens taken earlier, never filling the bucket past ``burst``."""
        bucket = self._bucket(name, key, rate, burst)
        bucket.take(0.0)  # refill up to now first
        bucket.tokens = min(bucket.burst, bucket.tokens + n)
        return succeed(None)

    def window(self, name: str, key: str, window_s: float, add: int = 0) -> "Deferred[Tuple[int, int]]":
        """Add to a fixed window counter; fires with (count, seconds until it resets)."""
        now = self.now()
        count, start, _ = self.windows.get((name, key), (0, now, window_s))
        if now - start >= window_s:
            count, start = 0, now
        count += add
        self.windows[(name, key)] = (count, start, window_s)
        return succeed((count, max(1, int(math.ceil(start + window_s - now)))))

    # Fixed-window budgets with reservations. A window is (count, start, length);
    # its start identifies it, so a late release never credits the next window.

    def _live_window(self, name: str, key: str, now: float) -> Optional[List[Any]]:
        w = self.windows.get((name, key))
        if w is None or now - w[1] >= w[2]:
            return None
        return list(w)

    def budget_count(self, name: str, key: str, window_s: float, add: int = 0) -> "Deferred[Tuple[int, int]]":
        """
        Add ``add`` (≥ 0) to a budget's window; fires with (count, whole seconds
        until it closes). A read (``add`` 0) does not open a window.
        """
        now = self.now()
        w = self._live_window(name, key, now)
        if w is None:
            if not add:
                return succeed((0, max(1, int(math.ceil(window_s)))))
            w = [0, now, window_s]
        w[0] += add
        self.windows[(name, key)] = (w[0], w[1], w[2])
        return succeed((w[0], max(1, int(math.ceil(w[1] + w[2] - now)))))

    def reserve(self, name: str, limits: Sequence[Tuple[str, int]], window_s: float
                ) -> "Deferred[Tuple[Optional[Ticket], int, List[str]]]":
        """
        Atomically take one slot from every (key, limit) when each has one
        left; fires with (ticket, 0, []). Otherwise takes nothing and fires
        with (None, whole seconds until every full window closes, the full keys).
        """
        now = self.now()
        wait = 0.0
        full: List[str] = []
        windows = []
        for key, limit in limits:
            w = self._live_window(name, key, now)
            if w is not None and w[0] >= limit:
                full.append(key)
                wait = max(wait, w[1] + w[2] - now)
            windows.append((key, w))
        if full:
            return succeed((None, max(1, int(math.ceil(wait))), full))
        taken: List[Tuple[str, Any]] = []
        for key, w in windows:
            if w is None:
                w = [0, now, window_s]
            self.windows[(name, key)] = (w[0] + 1, w[1], w[2])
            taken.append((key, w[1]))
        return succeed((("local", taken), 0, []))

    def release(self, name: str, ticket: Ticket) -> "Deferred[None]":
        """Give a reservation's slots back to the windows they were taken from (if still open)."""
        now = self.now()
        for key, start in ticket[1]:
            w = self._live_window(name, key, now)
            if w is not None and w[1] == start and w[0] > 0:
                self.windows[(name, key)] = (w[0] - 1, w[1], w[2])
        return succeed(None)

    def insert_if_absent(self, key: str, expires_at_ms: int, now_ms: int) -> "Deferred[bool]":
        """True when ``key`` was new (and is now remembered until ``expires_at_ms``)."""
        if len(self.seen) > 10000:
            for k in [k for k, exp in self.seen.items() if exp <= now_ms]:
                del self.seen[k]
        exp = self.seen.get(key)
        if exp is not None and exp > now_ms:
            return succeed(False)
        self.seen[key] = expires_at_ms
        return succeed(True)

    def sweep(self) -> None:
        """Forget full buckets and ended windows."""
        for k in [k for k, b in self.buckets.items() if b.wait_for(b.burst) == 0.0]:
            del self.buckets[k]
        now = self.now()
        for w in [w for w, (_, start, length) in self.windows.items() if now - start >= length]:
            del self.windows[w]


_BUCKET = """
local rate, burst, n, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local mode = ARGV[5]
local state = redis.call('HMGET', KEYS[1], 't', 's')
local tokens, stamp = tonumber(state[1]), tonumber(state[2])
if tokens == nil then tokens, stamp = burst, now end
if now > stamp then tokens = math.min(burst, tokens + (now - stamp) / 1000 * rate) end
local need = math.min(n, burst)
local wait = 0
if tokens < need then wait = (need - tokens) / rate end
if mode == 'charge' or (mode == 'take' and wait == 0) then tokens = tokens - n end
if mode == 'refund' then tokens = math.min(burst, tokens + n); wait = 0 end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 's', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""

_WINDOW = """
local count = redis.call('INCRBY', KEYS[1], tonumber(ARGV[1]))
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]); ttl = tonumber(ARGV[2]) end
return {count, ttl}
"""


# Budgets: a hash per window, {c = count, id = window id}, expiring with the window.
_BUDGET_COUNT = """
local add, window, id = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
if redis.call('EXISTS', KEYS[1]) == 0 then
  if add == 0 then return {0, window} end
  redis.call('HSET', KEYS[1], 'c', 0, 'id', id)
  redis.call('PEXPIRE', KEYS[1], window)
end
local count = redis.call('HINCRBY', KEYS[1], 'c', add)
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then redis.call('PEXPIRE', KEYS[1], window); ttl = window end
return {count, ttl}
"""

_RESERVE = """
local window, id = tonumber(ARGV[1]), ARGV[2]
local wait, full = 0, {}
for i, key in ipairs(KEYS) do
  local count = tonumber(redis.call('HGET', key, 'c')) or 0
  if count >= tonumber(ARGV[i + 2]) then
    local ttl = redis.call('PTTL', key)
    if ttl < 0 then redis.call('PEXPIRE', key, window); ttl = window end
    if ttl > wait then wait = ttl end
    full[#full + 1] = i
  end
end
if #full > 0 then return {0, wait, unpack(full)} end
local ids = {1, 0}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'c', 0, 'id', id)
    redis.call('PEXPIRE', key, window)
  end
  redis.call('HINCRBY', key, 'c', 1)
  ids[#ids + 1] = redis.call('HGET', key, 'id')
end
return ids
"""

_RELEASE = """
for i, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'id') == ARGV[i] and (tonumber(redis.call('HGET', key, 'c')) or 0) > 0 then
    redis.call('HINCRBY', key, 'c', -1)
  end
end
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisLimits:
    """The same operations, shared through Redis (the node's command connection)."""

    def __init__(self, redis: RedisConnection, prefix: str, now: Callable[[], float]) -> None:
        self.redis = redis
        self.prefix = prefix
        self.now = now
        self.fallback = LocalLimits(now)

    def _conn(self) -> Commands:
        return self.redis.command()

    def _bucket_op(self, mode: str, name: str, key: str, rate: float, burst: float, n: float) -> "Deferred[float]":
        async def run() -> float:
            try:
                res = await self._conn().eval(_BUCKET, [self.prefix + "rl:" + name + ":" + key],
                                              [repr(rate), repr(float(burst)), repr(float(n)),
                                               str(int(self.now() * 1000)), mode])
                return float(res.decode() if isinstance(res, bytes) else res)
            except Exception as e:
                log.warn("shared limit {name} unavailable, using local state: {error}", name=name, error=str(e))
                local = getattr(self.fallback, mode)
                return float((await local(name, key, rate, burst, n)) or 0.0)

        return Deferred.fromCoroutine(run())

    def take(self, name: str, key: str, rate: float, burst: float, n: float = 1.0) -> "Deferred[float]":
        return self._bucket_op("take", name, key, rate, burst, n)

    def peek(self, name: str, key: str, rate: float, burst: float, n: float = 1.0) -> "Deferred[float]":
        return self._bucket_op("peek", name, key, rate, burst, n)

    def charge(self, name: str, key: str, rate: float, burst: float, n: float = 1.0) -> "Deferred[None]":
        d: "Deferred[Any]" = self._bucket_op("charge", name, key, rate, burst, n)
        d.addCallback(lambda _: None)
        return d

    def refund(self, name: str, key: str, rate: float, burst: float, n: float = 1.0) -> "Deferred[None]":
        d: "Deferred[Any]" = self._bucket_op("refund", name, key, rate, burst, n)
        d.addCallback(lambda _: None)
        return d

    def _budget_key(self, name: str, key: str) -> str:
        return self.prefix + "budget:" + name + ":" + key

    def budget_count(self, name: str, key: str, window_s: float, add: int = 0) -> "Deferred[Tuple[int, int]]":
        async def run() -> Tuple[int, int]:
            try:
                count, ttl = await self._conn().eval(_BUDGET_COUNT, [self._budget_key(name, key)],
                                                     [str(add), str(int(window_s * 1000)), os.urandom(8).hex()])
                return int(count), max(1, int(math.ceil(int(ttl) / 1000.0)))
            except Exception as e:
                log.warn("shared budget {name} unavailable, using local state: {error}", name=name, error=str(e))
                return await self.fallback.budget_count(name, key, window_s, add)

        return Deferred.fromCoroutine(run())

    def reserve(self, name: str, limits: Sequence[Tuple[str, int]], window_s: float
                ) -> "Deferred[Tuple[Optional[Ticket], int, List[str]]]":
        async def run() -> Tuple[Optional[Ticket], int, List[str]]:
            try:
                res = await self._conn().eval(
                    _RESERVE, [self._budget_key(name, k) for k, _ in limits],
                    [str(int(window_s * 1000)), os.urandom(8).hex()] + [str(int(n)) for _, n in limits])
            except Exception as e:
                log.warn("shared budget {name} unavailable, using local state: {error}", name=name, error=str(e))
                return await self.fallback.reserve(name, limits, window_s)
            if int(res[0]) == 0:
                full = [limits[int(i) - 1][0] for i in res[2:]]
                return None, max(1, int(math.ceil(int(res[1]) / 1000.0))), full
            return ("redis", [(k, _text(i)) for (k, _), i in zip(limits, res[2:])]), 0, []

        return Deferred.fromCoroutine(run())

    def release(self, name: str, ticket: Ticket) -> "Deferred[None]":
        async def run() -> None:
            if ticket[0] != "redis":
                await self.fallback.release(name, ticket)
                return
            try:
                await self._conn().eval(_RELEASE, [self._budget_key(name, k) for k, _ in ticket[1]],
                                        [i for _, i in ticket[1]])
            except Exception as e:
                log.warn("shared budget {name} unavailable, a reservation is not given back: {error}",
                         name=name, error=str(e))

        return Deferred.fromCoroutine(run())

    def window(self, name: str, key: str, window_s: float, add: int = 0) -> "Deferred[Tuple[int, int]]":
        async def run() -> Tuple[int, int]:
            try:
                count, ttl = await self._conn().eval(_WINDOW, [self.prefix + "win:" + name + ":" + key],
                                                     [str(add), str(int(window_s * 1000))])
                return int(count), max(1, int(math.ceil(int(ttl) / 1000.0)))
            except Exception as e:
                log.warn("shared window {name} unavailable, using local state: {error}", name=name, error=str(e))
                return await self.fallback.window(name, key, window_s, add)

        return Deferred.fromCoroutine(run())

    def insert_if_absent(self, key: str, expires_at_ms: int, now_ms: int) -> "Deferred[bool]":
        async def run() -> bool:
            ttl = max(1, expires_at_ms - now_ms)
            try:
                res = await self._conn().set(self.prefix + "replay:" + key, b"1", pexpire=ttl, only_if_not_exists=True)
                return res is not None
            except Exception as e:
                log.warn("shared replay cache unavailable, using local state: {error}", error=str(e))
                return await self.fallback.insert_if_absent(key, expires_at_ms, now_ms)

        return Deferred.fromCoroutine(run())

    def sweep(self) -> None:
        """Redis expires its own keys; sweep the fallback."""
        self.fallback.sweep()
