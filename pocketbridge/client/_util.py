"""
Small helpers shared by the client SDK modules: a waitable queue, integer
checks that follow the wire rules, and event-id generation.

Nothing here touches a socket; the clock is always passed in.
"""

from __future__ import annotations

import os
import uuid
from collections import deque
from typing import Any, Deque, Generic, List, Optional, TypeGuard, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

T = TypeVar("T")

#: The largest ``device_seq`` the protocol allows (PROTOCOL.md §6).
MAX_DEVICE_SEQ = 2**53 - 1


def is_wire_int(value: Any) -> TypeGuard[int]:
    """True when ``value`` is an integer as the wire defines it (``bool`` is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def now_ms(clock: IReactorTime) -> int:
    """The clock's current time in integer milliseconds since the epoch."""
    return int(clock.seconds() * 1000)


def uuid7(clock: IReactorTime) -> str:
    """
    A lowercase UUIDv7 string (RFC 9562) whose timestamp comes from ``clock``.

    v1 clients use UUIDv7 event ids; the server only checks the UUID shape.
    """
    ms = now_ms(clock) & ((1 << 48) - 1)
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = rand >> 68 & 0xFFF
    rand_b = rand & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return str(uuid.UUID(int=value))


class WaitQueue(Generic[T]):
    """
    A FIFO of items with waiters: ``get`` returns a Deferred that fires with
    the next item, at once if one is queued.

    After ``fail(exc)`` the queued items are still handed out first; then
    every ``get`` fails with ``exc`` until ``reopen`` is called.
    Called from the reactor thread only.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._items: Deque[T] = deque()
        self._waiters: Deque["Deferred[T]"] = deque()
        self._failure: Optional[BaseException] = None

    def __len__(self) -> int:
        """The number of queued items not yet taken."""
        return len(self._items)

    def put(self, item: T) -> None:
        """Hand ``item`` to the oldest waiter, or queue it."""
        if self._waiters:
            self._waiters.popleft().callback(item)
        else:
            self._items.append(item)

    def get(self, timeout: Optional[float] = None) -> "Deferred[T]":
        """
        The next item. With ``timeout`` (seconds) the Deferred fails with
        ``twisted.internet.defer.TimeoutError`` when nothing came in time.
        """
        if self._items:
            return succeed(self._items.popleft())
        if self._failure is not None:
            return fail(self._failure)
        d: "Deferred[T]" = Deferred(canceller=self._forget)
        self._waiters.append(d)
        if timeout is not None:
            d.addTimeout(timeout, self._clock)
        return d

    def drain(self) -> List[T]:
        """Take every queued item at once."""
        items = list(self._items)
        self._items.clear()
        return items

    def _forget(self, d: "Deferred[T]") -> None:
        """Drop a cancelled waiter."""
        try:
            self._waiters.remove(d)
        except ValueError:
            pass

    def fail(self, exc: BaseException) -> None:
        """Fail current and future waiters with ``exc`` once the queue is empty."""
        self._failure = exc
        waiters: List["Deferred[T]"] = list(self._waiters)
        self._waiters.clear()
        for d in waiters:
            d.errback(exc)

    def reopen(self) -> None:
        """Forget the failure set by ``fail`` (a new connection began)."""
        self._failure = None
