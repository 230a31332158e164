"""The admission's pump: one background task that grants waiting requests as limits free up.

It runs a pass (``Admission`` grants best-first until nothing more can be granted) whenever
something may have changed: a grant released, a refusal or a cooldown ended, a new request
queued. Between events it sleeps until the next refusal or cooldown ends, and never longer than
``SAFETY_POLL_SECONDS`` (belt and braces), never shorter than ``MIN_WAKE_SECONDS`` (no spin).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from streams.dispatch.cooldown import Cooldowns
from streams.dispatch.refusals import Refusals

log = logging.getLogger("streams.dispatcher")

SAFETY_POLL_SECONDS = 1.0
MIN_WAKE_SECONDS = 0.0005


class Pump:
    """See the module docstring. ``waiting()``: is anything queued; ``grant_pass()``: one pass."""

    def __init__(self, waiting: Callable[[], int], grant_pass: Callable[[], Awaitable[None]],
                 refusals: Refusals, cooldowns: Cooldowns, clock: Callable[[], float],
                 sleep: Callable[[float], Awaitable[Any]]) -> None:
        self._waiting = waiting
        self._pass = grant_pass
        self._refusals = refusals
        self._cooldowns = cooldowns
        self._clock = clock
        self._sleep = sleep
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Something changed: pass again."""
        self._wake.set()

    def _next_wake(self) -> float | None:
        """Seconds until a refusal or cooldown ends (events wake the pump sooner)."""
        if not self._waiting():
            return None
        now = self._clock()
        times = self._refusals.ends(now)
        cooling = self._cooldowns.next_change(now)
        if cooling is not None:
            times.append(cooling)
        if not times:
            return SAFETY_POLL_SECONDS
        return min(max(min(times) - now, MIN_WAKE_SECONDS), SAFETY_POLL_SECONDS)

    async def run(self) -> None:
        """Run forever (a background task)."""
        while True:
            self._wake.clear()
            if self._waiting():
                try:
                    await self._pass()
                except Exception:  # a bug here must not strand every waiting request
                    log.exception("dispatcher pass failed")
            delay = self._next_wake()
            if self._wake.is_set():
                continue
            if delay is None:
                await self._wake.wait()
                continue
            if self._sleep is asyncio.sleep:
                # One timer rather than two tasks and an ``asyncio.wait`` per pass: with
                # requests queued (read-ahead) the pump passes about once per finished call.
                timer = asyncio.get_running_loop().call_later(delay, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    timer.cancel()
                continue
            waiter = asyncio.ensure_future(self._wake.wait())
            sleeper = asyncio.ensure_future(self._sleep(delay))
            try:
                await asyncio.wait((waiter, sleeper), return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                sleeper.cancel()
