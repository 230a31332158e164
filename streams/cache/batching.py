"""Micro-batching: items submitted in one event-loop tick share one Redis round trip.

Usage::

    reads = Batcher(mget_many, max_items=256, tasks=tasks)
    value = await reads.submit(key)   # resolved when the tick's batch comes back
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Collects items submitted in one loop tick (or up to ``max_items``) into one call."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R]]],
        max_items: int,
        tasks: set[asyncio.Task[None]],
    ) -> None:
        self._run = run
        self._max = max_items
        self._tasks = tasks
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._scheduled = False

    def submit(self, item: T) -> asyncio.Future[R]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, fut))
        if len(self._pending) >= self._max:
            self.flush()
        elif not self._scheduled:
            # call_soon runs after every callback already queued for this tick, so all
            # tasks woken together (e.g. one Kafka batch) land in the same round trip.
            self._scheduled = True
            loop.call_soon(self.flush)
        return fut

    def flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _execute(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._run([item for item, _ in batch])
        except BaseException as exc:  # a bug, or cancellation: never leave a caller hanging
            for _, fut in batch:
                if fut.done():
                    continue
                if isinstance(exc, Exception):
                    fut.set_exception(exc)
                else:
                    fut.cancel()
            raise
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():  # the caller may have been cancelled meanwhile
                fut.set_result(result)
