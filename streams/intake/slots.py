"""Counted slots: the worker's in-flight slots and batch gate, with a public count of what is free.

Usage::

    slots = Slots(2000)
    await slots.acquire()   # waits while none is free
    slots.release()
    slots.free              # for the state dump, without reading asyncio's private fields
"""

from __future__ import annotations

import asyncio


class Slots:
    """``size`` slots taken and given back: an ``asyncio.Semaphore`` that counts them itself."""

    def __init__(self, size: int) -> None:
        self._sem = asyncio.Semaphore(size)
        self._size = size
        self._taken = 0

    @property
    def free(self) -> int:
        """Slots not taken now."""
        return self._size - self._taken

    def locked(self) -> bool:
        """True if an ``acquire()`` would wait."""
        return self._sem.locked()

    async def acquire(self) -> None:
        await self._sem.acquire()
        self._taken += 1  # no await since the semaphore was taken: a cancel cannot fall between

    def release(self) -> None:
        if self._taken <= 0:
            raise ValueError("Slots released more often than acquired")
        self._taken -= 1
        self._sem.release()
