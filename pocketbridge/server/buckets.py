"""Token buckets for the per-socket, per-device and per-user limits of PROTOCOL.md §12."""

from __future__ import annotations

from typing import Callable, Dict, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second, on an injected clock (seconds)."""

    __slots__ = ("rate", "burst", "tokens", "stamp", "now")

    def __init__(self, rate: float, burst: float, now: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.now = now
        self.stamp = now()

    def _refill(self) -> None:
        t = self.now()
        if t > self.stamp:
            self.tokens = min(self.burst, self.tokens + (t - self.stamp) * self.rate)
        self.stamp = t

    def wait_for(self, n: float) -> float:
        """Seconds until ``n`` tokens (at most a full bucket) are there; 0 when they are now."""
        self._refill()
        need = min(n, self.burst)
        if self.tokens >= need:
            return 0.0
        return (need - self.tokens) / self.rate

    def take(self, n: float) -> None:
        """Remove ``n`` tokens (may go negative for one oversized item)."""
        self._refill()
        self.tokens -= n

    def try_take(self, n: float = 1.0) -> float:
        """Take ``n`` tokens if there; returns 0, or the seconds to wait."""
        wait = self.wait_for(n)
        if wait == 0.0:
            self.take(n)
        return wait


class BucketMap(Generic[K]):
    """Buckets keyed by device, user or IP, created on demand, dropped when full and idle."""

    def __init__(self, rate: float, burst: float, now: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.now = now
        self.buckets: Dict[K, TokenBucket] = {}

    def get(self, key: K) -> TokenBucket:
        """The bucket for ``key``."""
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = TokenBucket(self.rate, self.burst, self.now)
        return b

    def sweep(self) -> None:
        """Forget buckets that have refilled completely (they hold no state)."""
        for key in [k for k, b in self.buckets.items() if b.wait_for(b.burst) == 0.0]:
            del self.buckets[key]
