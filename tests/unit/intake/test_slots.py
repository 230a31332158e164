"""Slots: a semaphore that counts what is free itself (the state dump reads no private field)."""

from __future__ import annotations

import asyncio

import pytest

from streams.intake.slots import Slots


async def test_free_counts_taken_and_given_back_slots_and_waiting_acquirers() -> None:
    slots = Slots(2)
    assert slots.free == 2 and not slots.locked()
    await slots.acquire()
    await slots.acquire()
    assert slots.free == 0 and slots.locked()
    waiter = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    assert not waiter.done() and slots.free == 0
    slots.release()  # handed to the waiter
    await waiter
    assert slots.free == 0
    slots.release()
    slots.release()
    assert slots.free == 2


async def test_a_cancelled_acquire_takes_nothing() -> None:
    slots = Slots(1)
    await slots.acquire()
    waiter = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    slots.release()
    assert slots.free == 1 and not slots.locked()


async def test_more_releases_than_acquires_is_a_bug_said_at_once() -> None:
    slots = Slots(1)
    with pytest.raises(ValueError, match="more often"):
        slots.release()
    assert slots.free == 1
