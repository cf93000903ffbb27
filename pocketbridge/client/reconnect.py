"""
Reconnecting with the close-code policy of PROTOCOL.md §11.

``RetryPolicy`` is the pure decision table (close code, reason, attempt →
retry or stop, and after how long). ``ReconnectingClient`` runs a ``Client``
in a loop: connect, catch up, wait for the close, ask the policy, sleep.
``EventDeduper`` drops repeats (delivery is at-least-once, §7.2).

Both protocol versions: a v2 ``Client`` reconnects with ``resume_from`` =
its ``last_received_seq`` and dedupes replayed events itself, so a 1001 or
4008 close loses nothing and repeats nothing. A v2 server key that no longer
matches its pin (``ServerKeyChanged``) stops the loop like a 4003: retrying
cannot fix it, and a user must decide.
"""

from __future__ import annotations

import random
import re
from typing import Any, Callable, Dict, Optional

from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferTimeoutError
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.task import deferLater
from twisted.logger import Logger

from pocketbridge.client.connection import ABNORMAL_CLOSE, ConnectionClosed
from pocketbridge.client.handshake import HandshakeError, ServerKeyChanged
from pocketbridge.client.client import Client
from pocketbridge.client.v2 import SeenEvents

log = Logger()

_RETRY_AFTER = re.compile(r"; retry after (\d+) s\s*$")

#: Close codes after which a client reconnects at once (with a little jitter).
RECONNECT_SOON = frozenset({1001, 4008})


class DeviceRevoked(Exception):
    """The server closed with 4003: this device must not reconnect."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


def parse_retry_after(reason: str) -> Optional[int]:
    """N from a 4029 reason ending in ``; retry after N s`` (N ≥ 1), else None."""
    match = _RETRY_AFTER.search(reason or "")
    if match is None:
        return None
    seconds = int(match.group(1))
    return seconds if seconds >= 1 else None


class RetryDecision:
    """Whether to reconnect, after ``delay`` seconds, and why (for logs)."""

    __slots__ = ("retry", "delay", "why")

    def __init__(self, retry: bool, delay: float, why: str) -> None:
        self.retry = retry
        self.delay = delay
        self.why = why

    def __repr__(self) -> str:
        """For test failures."""
        return "RetryDecision(retry={!r}, delay={:.3f}, why={!r})".format(self.retry, self.delay, self.why)


class RetryPolicy:
    """
    PROTOCOL.md §11 as a function. ``attempt`` counts failed tries since the
    last established session (0 for the first reconnect).

    - 4003: never retry.
    - 4029: wait the N s of the reason, plus up to 1 s of jitter (backoff if absent).
    - 1001, 4008: reconnect within ``soon`` s (jittered) on the first attempt.
    - anything else (1000, 1002, 1006, 1007, 1008, 1009, 1011, 1013, client-side
      failures): exponential backoff ``base·2^attempt`` capped at ``cap``,
      jittered to 50–100 %.
    """

    def __init__(self, rng: Optional[random.Random] = None, base: float = 1.0, cap: float = 60.0,
                 soon: float = 1.0) -> None:
        self.rng = rng if rng is not None else random.Random()
        self.base = base
        self.cap = cap
        self.soon = soon

    def backoff(self, attempt: int) -> float:
        """The jittered exponential delay for ``attempt``, in seconds."""
        ceiling = min(self.cap, self.base * (2 ** min(attempt, 32)))
        return ceiling * self.rng.uniform(0.5, 1.0)

    def decide(self, code: Optional[int], reason: str, attempt: int) -> RetryDecision:
        """What to do after a connection ended with ``code``/``reason``."""
        if code == 4003:
            return RetryDecision(False, 0.0, "device revoked")
        if code == 4029:
            seconds = parse_retry_after(reason)
            if seconds is not None:
                return RetryDecision(True, seconds + self.rng.uniform(0.0, 1.0), "rate limited")
            return RetryDecision(True, self.backoff(attempt), "rate limited (no retry time)")
        if code in RECONNECT_SOON and attempt == 0:
            return RetryDecision(True, self.rng.uniform(0.0, self.soon), "server asked to reconnect")
        return RetryDecision(True, self.backoff(attempt), "backoff")


class EventDeduper(SeenEvents):
    """Remembers the last ``capacity`` event ids; ``is_new`` is False for repeats."""

    def is_new(self, event: Dict[str, Any]) -> bool:
        """True the first time an ``event_id`` is seen (events without one are always new)."""
        return self.add(event)


class ReconnectingClient:
    """
    Keeps ``client`` connected: connect, ``catch_up``, wait for the close,
    then reconnect as ``policy`` says, until ``stop()`` or a 4003.

    ``on_connected(session_payload)``, ``on_caught_up(events)`` and
    ``on_disconnected(code, reason, decision)`` are optional progress hooks.

    The backoff starts again from its first step only after a session that
    did useful work. A session is *useful* when it stayed established for at
    least ``stable_after`` seconds (default 10): long enough that it was not
    refused in disguise. A session closed sooner — e.g. 1013 "Storage
    unavailable" on its first upload right after a successful handshake —
    counts as a failed attempt, so a node that accepts handshakes but cannot
    store anything sees each client back off (1, 2, 4 … 60 s) instead of
    reconnecting about once a second. 1001 and 4008 (the server asked the
    client to come back) still reconnect soon after any established session.
    """

    def __init__(
        self,
        reactor: Any,
        client: Client,
        policy: Optional[RetryPolicy] = None,
        on_connected: Optional[Callable[[Dict[str, Any]], None]] = None,
        on_caught_up: Optional[Callable[[list], None]] = None,
        on_disconnected: Optional[Callable[[Optional[int], str, RetryDecision], None]] = None,
        stable_after: float = 10.0,
    ) -> None:
        self.reactor = reactor
        self.client = client
        self.policy = policy if policy is not None else RetryPolicy()
        self.on_connected = on_connected
        self.on_caught_up = on_caught_up
        self.on_disconnected = on_disconnected
        self.stable_after = stable_after
        self._stopping = False
        self._current: Optional[Deferred[Any]] = None
        #: Seconds ``run`` waits for the closing handshake after ``stop``.
        self.close_timeout = 5.0

    def run(self) -> "Deferred[None]":
        """
        Fires with None after ``stop()``; fails with ``DeviceRevoked`` on 4003
        and with ``ServerKeyChanged`` when a v2 server key does not match its
        pin. Other failures are retried for ever.
        """
        return Deferred.fromCoroutine(self._run())

    def stop(self) -> None:
        """
        Stop reconnecting and close the current connection (code 1000); ``run``
        fires once the closing handshake is done, so the reactor can stop
        without losing frames still in the socket buffer.
        """
        self._stopping = True
        if self._current is not None and not self._current.called:
            self._current.cancel()
        self.client.close()

    async def _attempt(self) -> tuple[Optional[int], str, Optional[float]]:
        """One connection's life: (close code or None, reason, seconds it was established or None)."""
        try:
            self._current = self.client.connect()
            est = await self._current
        except ConnectionClosed as e:
            return e.code, e.reason, None
        except ServerKeyChanged:
            raise
        except HandshakeError as e:
            return None, "handshake failed: {}".format(e), None
        except (ConnectError, DNSLookupError, DeferTimeoutError) as e:
            return ABNORMAL_CLOSE, str(e) or e.__class__.__name__, None
        started = self.reactor.seconds()
        if self.on_connected is not None:
            self.on_connected(est)
        try:
            self._current = self.client.catch_up()
            events = await self._current
            if self.on_caught_up is not None:
                self.on_caught_up(events)
        except ConnectionClosed:
            pass
        self._current = self.client.closed
        code, reason = await self._current
        return code, reason, self.reactor.seconds() - started

    async def _run(self) -> None:
        """The reconnect loop."""
        attempt = 0
        while not self._stopping:
            try:
                code, reason, lived = await self._attempt()
            except CancelledError:
                if self._stopping:
                    break
                raise
            if self._stopping:
                break
            if lived is not None and (lived >= self.stable_after or code in RECONNECT_SOON):
                attempt = 0  # a useful session (see the class docstring) resets the backoff
            decision = self.policy.decide(code, reason, attempt)
            log.info("Connection ended ({code} {reason}); retry={retry} in {delay:.1f}s",
                     code=code, reason=reason, retry=decision.retry, delay=decision.delay)
            if self.on_disconnected is not None:
                self.on_disconnected(code, reason, decision)
            if not decision.retry:
                raise DeviceRevoked(code or 0, reason)
            attempt += 1
            self._current = deferLater(self.reactor, decision.delay, lambda: None)
            try:
                await self._current
            except CancelledError:
                if self._stopping:
                    break
                raise
        self._current = None
        await self._close_cleanly()

    async def _close_cleanly(self) -> None:
        """Finish the closing handshake so acks already written reach the server."""
        raw = self.client.raw
        if raw is None or raw.close_info is not None:
            return
        d = self.client.close()
        d.addTimeout(self.close_timeout, self.reactor)
        try:
            await d
        except DeferTimeoutError:
            raw.abort()
