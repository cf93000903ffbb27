"""
Limits shared by every node (ARCHITECTURE.md "Cluster concerns"): new
connections and handshake failures per client IP, the REST budget, failed
pairing lookups, and the signed-request replay cache.

``LocalLimits`` keeps them in memory (embedded shape). ``RedisLimits`` keeps
them in Redis with atomic Lua scripts so all nodes share one budget; when
Redis is unreachable it falls back to its own local state rather than
refusing everyone (limits are best effort, the replay cache included: a
signature can then be accepted once per node for the outage).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from .ratelimit import TokenBucket

log = Logger()


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


class RedisLimits:
    """The same operations, shared through Redis (the bus's publisher connection)."""

    def __init__(self, bus: Any, prefix: str, now: Callable[[], float]) -> None:
        self.bus = bus
        self.prefix = prefix
        self.now = now
        self.fallback = LocalLimits(now)

    def _conn(self) -> Any:
        conn = self.bus.pub
        if conn is None:
            raise ConnectionError("redis unavailable")
        return conn

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
