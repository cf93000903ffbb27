"""
Budgets of failed pairing lookups (API.md §2).

A failed lookup is a v1 lookup, v2 join or v2 sealed fetch that does not
succeed, or a store/create answered 409 because the code is live for another
user. Budgets, each over a fixed window (``pairing_failure_window``, 600 s):

- per client IP: ``pairing_failures_per_ip`` (10) per window;
- per user, for authenticated callers: the same number;
- service-wide: ``pairing_failures_global / max(1, ceil(live_codes / 50))``.

While any budget that applies to a request is spent, every pairing lookup
answers 429 with ``Retry-After`` = the seconds until that window closes.

Each lookup *reserves* its failure before it touches storage: one atomic step
takes a slot from every budget that applies (or refuses with 429 and takes
none), and the slot is given back when the lookup turns out not to be a
failure. So however many lookups run at once, the failures admitted in one
window never exceed a budget (a slot taken and given back in one window is
never credited to the next).

The counters sit behind ``FailureCounters``; ``LimitsFailureCounters`` keeps
them in the node's shared limits store (``pocketbridge.server.cluster.limits``: in memory,
or in Redis so that every node of a cluster spends one budget).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, List, Optional, Protocol, Sequence, Tuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pocketbridge.server import metrics
from pocketbridge.server.api.http import ApiError

if TYPE_CHECKING:
    from pocketbridge.server.context import Node

log = Logger()

GLOBAL_KEY = "global"
CODES_PER_SHARE = 50
LIVE_COUNT_MAX_AGE = 1.0  # seconds a count of live codes is reused


class FailureCounters(Protocol):
    """Fixed-window failure counters keyed by strings (``ip:…``, ``user:…``, ``global``)."""

    async def get(self, key: str) -> Tuple[int, float]:
        """(failures in the key's current window, seconds until it closes)."""

    async def add(self, key: str) -> int:
        """Count one failure in the key's current window; the new count."""

    async def reserve(self, limits: Sequence[Tuple[str, int]]) -> Tuple[Any, int, List[str]]:
        """One slot from every (key, limit) atomically: (ticket, 0, []) or (None, seconds to wait, full keys)."""

    async def release(self, ticket: Any) -> None:
        """Give a reservation's slots back (only to the windows they were taken from)."""


class LimitsFailureCounters:
    """
    ``FailureCounters`` on the node's limits store (``LocalLimits`` or
    ``RedisLimits``: ``window(name, key, window_s, add)``). A window opens at
    the first read or failure of its key and lasts ``window`` seconds.
    """

    NAME = "pairing_failures"

    def __init__(self, limits: Any, window: float) -> None:
        self.limits = limits
        self.window = window

    async def get(self, key: str) -> Tuple[int, float]:
        """(count, seconds left) of the key's current window."""
        count, left = await self.limits.budget_count(self.NAME, key, self.window, 0)
        return int(count), float(left)

    async def add(self, key: str) -> int:
        """Count one failure."""
        count, _ = await self.limits.budget_count(self.NAME, key, self.window, 1)
        return int(count)

    async def reserve(self, limits: Sequence[Tuple[str, int]]) -> Tuple[Any, int, List[str]]:
        """Reserve one failure on every (key, limit) or none."""
        ticket, wait, full = await self.limits.reserve(self.NAME, list(limits), self.window)
        return ticket, int(wait), list(full)

    async def release(self, ticket: Any) -> None:
        """Give a reservation back."""
        await self.limits.release(self.NAME, ticket)


class Reservation:
    """
    One failed lookup reserved on every budget that applies. The route calls
    ``keep()`` when the lookup failed (the slot stays spent) and ``refund()``
    on every way out (a no-op after ``keep``): success, another error, a
    cancelled request.
    """

    def __init__(self, counters: FailureCounters, ticket: Any, add_global: bool) -> None:
        self.counters = counters
        self.ticket = ticket
        self.add_global = add_global
        self.settled = False

    def keep(self) -> None:
        """The lookup failed: the slots stay spent (and the service-wide count grows, if not reserved)."""
        if self.settled:
            return
        self.settled = True
        if self.add_global:
            Deferred.fromCoroutine(self.counters.add(GLOBAL_KEY)).addErrback(
                lambda f: log.warn("counting a pairing failure failed: {error}", error=f.getErrorMessage()))

    def refund(self) -> None:
        """The lookup did not fail: give the slots back (no-op once settled)."""
        if self.settled:
            return
        self.settled = True
        Deferred.fromCoroutine(self.counters.release(self.ticket)).addErrback(
            lambda f: log.warn("giving back a pairing reservation failed: {error}", error=f.getErrorMessage()))


def global_limit(base: int, live_codes: int) -> int:
    """The service-wide budget for ``live_codes`` live codes: ``base / max(1, ⌈live/50⌉)`` (at least 1)."""
    shares = max(1, math.ceil(live_codes / CODES_PER_SHARE))
    return max(1, base // shares)


def _keys(ip: Optional[str], user_id: Optional[str]) -> Iterable[str]:
    if ip:
        yield "ip:" + ip
    if user_id:
        yield "user:" + user_id


class PairingBudgets:
    """
    The failed-lookup budgets, over a ``FailureCounters`` store.

    ``count_live`` fires with the number of live pairing codes (v1 records
    and v2 mailboxes); each node reuses its count for up to a second, so a
    flood of refused lookups costs no database work.
    """

    def __init__(self, counters: FailureCounters, per_ip: int, global_base: int,
                 count_live: Callable[[], Awaitable[int]], now: Callable[[], float]) -> None:
        self.counters = counters
        self.per_ip = per_ip
        self.global_base = global_base
        self.count_live = count_live
        self.now = now
        self._live: Optional[Tuple[float, int]] = None  # (fetched at, count)
        self._counting: Optional[List["Deferred[int]"]] = None  # callers waiting for a count in flight

    async def live_codes(self) -> int:
        """The number of live pairing codes (at most a second old; concurrent callers share one count)."""
        t = self.now()
        if self._live is None or t - self._live[0] > LIVE_COUNT_MAX_AGE or t < self._live[0]:
            if self._counting is not None:
                waiter: "Deferred[int]" = Deferred()
                self._counting.append(waiter)
                return await waiter
            waiters: List["Deferred[int]"] = []
            self._counting = waiters
            try:
                self._live = (t, int(await self.count_live()))
            except BaseException as e:
                self._counting = None
                for w in waiters:
                    w.errback(e)
                raise
            self._counting = None
            for w in waiters:
                w.callback(self._live[1])
        return self._live[1]

    def forget_live_count(self) -> None:
        """Count the live codes afresh next time (after a store or a redemption)."""
        self._live = None

    async def retry_after(self, ip: Optional[str], user_id: Optional[str], service_wide: bool = True) -> int:
        """
        0 when the caller may try a lookup now, else the whole seconds (≥ 1)
        until every spent budget that applies has reopened.
        """
        wait = 0.0
        for key in _keys(ip, user_id):
            count, left = await self.counters.get(key)
            if count >= self.per_ip:
                metrics.LIMIT_HITS.labels(limit="pairing_failures_" + key.split(":", 1)[0]).inc()
                wait = max(wait, left)
        if service_wide:
            count, left = await self.counters.get(GLOBAL_KEY)
            # Only consult storage when the service-wide window has failures at all.
            if count and count >= global_limit(self.global_base, await self.live_codes()):
                metrics.LIMIT_HITS.labels(limit="pairing_failures_global").inc()
                wait = max(wait, left)
        return max(1, math.ceil(wait)) if wait > 0 else 0

    async def check(self, ip: Optional[str], user_id: Optional[str], service_wide: bool = True) -> None:
        """Raise 429 RATE_LIMITED (with Retry-After) when a budget that applies is spent."""
        wait = await self.retry_after(ip, user_id, service_wide)
        if wait:
            raise ApiError(429, "RATE_LIMITED", "Too many failed pairing attempts; retry later",
                           headers={"Retry-After": str(wait)})

    async def reserve(self, ip: Optional[str], user_id: Optional[str], service_wide: bool = True) -> Reservation:
        """
        Reserve one failed lookup on the IP's, the user's (when known) and,
        with ``service_wide``, the service-wide budget, all or none, before
        the lookup runs; raise 429 RATE_LIMITED with Retry-After when one is
        spent. Without ``service_wide`` a kept failure still counts service-wide.
        """
        limits = [(key, self.per_ip) for key in _keys(ip, user_id)]
        if service_wide:
            limits.append((GLOBAL_KEY, global_limit(self.global_base, await self.live_codes())))
        ticket, wait, full = await self.counters.reserve(limits)
        if ticket is None:
            for key in full:
                metrics.LIMIT_HITS.labels(limit="pairing_failures_" + key.split(":", 1)[0]).inc()
            raise ApiError(429, "RATE_LIMITED", "Too many failed pairing attempts; retry later",
                           headers={"Retry-After": str(max(1, wait))})
        return Reservation(self.counters, ticket, add_global=not service_wide)

    async def failed(self, ip: Optional[str], user_id: Optional[str]) -> None:
        """Count one failed lookup against the IP, the user (when known) and the service."""
        for key in _keys(ip, user_id):
            await self.counters.add(key)
        await self.counters.add(GLOBAL_KEY)


def budgets_for(api: Any, node: Node) -> PairingBudgets:
    """The node's one ``PairingBudgets`` (created on first use; v1 and v2 pairing share it)."""
    budgets = getattr(api, "pairing_budgets", None)
    if budgets is None:
        s = node.settings
        storage = node.storage

        async def count_live() -> int:
            now = node.now_ms()
            return int(await storage.count_live_pairing(now)) + int(await storage.mailbox_live_count(now))

        budgets = PairingBudgets(
            LimitsFailureCounters(node.limits, s.pairing_failure_window),
            s.pairing_failures_per_ip, s.pairing_failures_global, count_live, node.clock.seconds,
        )
        api.pairing_budgets = budgets
    return budgets
