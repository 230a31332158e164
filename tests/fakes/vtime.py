"""Run a coroutine on an event loop with virtual time: sleeps take no real time.

The loop's selector never blocks: when asyncio would wait for the next timer, the virtual
clock jumps to it. Every ``asyncio.sleep``, ``asyncio.wait(timeout=...)`` and timeout
then completes instantly, in the right order. No real I/O is possible on this loop (unit
tests use fakes), and a test that would wait forever fails instead of hanging.

Usage::

    def test_something() -> None:
        async def main(clock: VirtualClock) -> None:
            await asyncio.sleep(10)
            assert clock() == EPOCH + 10
        run(main)
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

EPOCH = 1_700_000_000.0  # what clock() returns at virtual time 0 (epoch seconds)


class _VirtualSelector(selectors.BaseSelector):
    def __init__(self) -> None:
        self._map: dict[Any, selectors.SelectorKey] = {}
        self.loop: VirtualLoop | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = selectors.SelectorKey(fileobj, _fd(fileobj), events, data)
        self._map[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._map.pop(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise RuntimeError("virtual loop would block forever: the test deadlocked")
        assert self.loop is not None
        self.loop.advance(timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._map

    def close(self) -> None:
        self._map.clear()


def _fd(fileobj: Any) -> int:
    return fileobj if isinstance(fileobj, int) else int(fileobj.fileno())


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        self._vnow = 0.0

    def time(self) -> float:
        return self._vnow

    def advance(self, seconds: float) -> None:
        self._vnow += max(seconds, 0.0)


class VirtualClock:
    """Epoch seconds on the virtual loop; pass it as the dispatcher's clock."""

    def __init__(self, loop: VirtualLoop) -> None:
        self._loop = loop

    def __call__(self) -> float:
        return EPOCH + self._loop.time()

    def elapsed(self) -> float:
        return self._loop.time()


def run(main: Callable[[VirtualClock], Awaitable[T]], limit: float = 3600.0) -> T:
    """Run ``main(clock)`` on a fresh virtual loop; fail if it needs > ``limit`` virtual s."""
    loop = VirtualLoop()
    clock = VirtualClock(loop)

    async def guarded() -> T:
        async with asyncio.timeout(limit):
            return await main(clock)

    try:
        return loop.run_until_complete(guarded())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
