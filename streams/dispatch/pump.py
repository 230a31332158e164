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
from dataclasses import dataclass, field
from typing import Any

from streams.dispatch.cooldown import Cooldowns
from streams.dispatch.refusals import Refusals

log = logging.getLogger("streams.dispatcher")

SAFETY_POLL_SECONDS = 1.0
MIN_WAKE_SECONDS = 0.0005


@dataclass(eq=False)
class Pump:
    """See the module docstring. ``waiting()``: is anything queued; ``grant_pass()``: one pass."""

    _waiting: Callable[[], int]
    _pass: Callable[[], Awaitable[None]]
    _refusals: Refusals
    _cooldowns: Cooldowns
    _clock: Callable[[], float]
    _sleep: Callable[[float], Awaitable[Any]]
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

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
            await wait_event(self._wake, delay, self._sleep)


async def wait_event(event: asyncio.Event, delay: float | None,
                     sleep: Callable[[float], Awaitable[Any]]) -> None:
    """Until ``event`` is set or ``delay`` seconds (None: no limit) have passed on ``sleep``'s
    clock (tests inject a virtual one)."""
    if delay is None:
        await event.wait()
        return
    if sleep is asyncio.sleep:
        # One timer rather than two tasks and an ``asyncio.wait``: with requests queued
        # (read-ahead) the pump passes about once per finished call.
        timer = asyncio.get_running_loop().call_later(delay, event.set)
        try:
            await event.wait()
        finally:
            timer.cancel()
        return
    waiter = asyncio.ensure_future(event.wait())
    sleeper = asyncio.ensure_future(sleep(delay))
    try:
        await asyncio.wait((waiter, sleeper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        sleeper.cancel()
