"""Priority queue for requests waiting on limits or cooldowns: 0 (most urgent) .. 9.

Order: FIFO within a level; with aging, each ``aging_ms`` waited is worth one level, so a
priority-9 request is overtaken only by requests that arrived less than 9 x ``aging_ms``
after it, and nothing starves. ``aging_ms == 0`` means strict priority (no aging).

Aging is continuous: the effective rank of an entry is ``priority - waited / aging_ms``.
Because every entry ages at the same speed, ordering by ``priority * aging_ms + enqueued_ms``
is the same as ordering by effective rank at any instant, so one heap with a static key
suffices (no re-sorting as time passes).

Usage::

    sched: Scheduler[Ticket] = Scheduler(aging_ms=10_000)
    entry = sched.add(ticket, priority=3, enqueued_ms=now_ms)
    cursor = sched.begin_pass()
    while (e := cursor.next()) is not None:
        if grant(e.item):
            cursor.take(e)
        else:
            cursor.skip(e)
    cursor.end()
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

LEVELS = 10


@dataclass(eq=False, slots=True)
class Entry(Generic[T]):
    """One waiting item. ``live`` turns False once taken or discarded."""

    key: tuple[float, float, int]
    item: T
    priority: int
    live: bool = True

    # Heap ordering compares keys only (items need not be comparable).
    def __lt__(self, other: Entry[T]) -> bool:
        return self.key < other.key


class Scheduler(Generic[T]):
    """A heap of entries with lazy deletion and per-priority depth counts."""

    def __init__(self, aging_ms: int) -> None:
        self._aging_ms = aging_ms
        self._heap: list[Entry[T]] = []
        self._seq = itertools.count()
        self._depth = [0] * LEVELS
        self._live = 0
        self._in_pass = False

    def __len__(self) -> int:
        return self._live

    def depth(self) -> list[int]:
        """Number of waiting entries per priority level (index = priority)."""
        return list(self._depth)

    def key(self, priority: int, enqueued_ms: float) -> tuple[float, float, int]:
        seq = next(self._seq)
        if self._aging_ms > 0:
            return (priority * self._aging_ms + enqueued_ms, 0.0, seq)
        return (float(priority), enqueued_ms, seq)

    def add(self, item: T, priority: int, enqueued_ms: float) -> Entry[T]:
        """Queue ``item``; a retried request passes its first enqueue time to keep its place."""
        priority = min(max(priority, 0), LEVELS - 1)
        entry = Entry(self.key(priority, enqueued_ms), item, priority)
        heapq.heappush(self._heap, entry)
        self._depth[priority] += 1
        self._live += 1
        return entry

    def discard(self, entry: Entry[T]) -> None:
        """Forget an entry (granted, cancelled, expired). Idempotent; O(1) (lazy deletion)."""
        if not entry.live:
            return
        entry.live = False
        self._depth[entry.priority] -= 1
        self._live -= 1
        # Dead entries stay in the heap until popped; compact when they dominate so a burst
        # of cancellations cannot make the heap grow without bound.
        if not self._in_pass and len(self._heap) > 64 and self._live * 2 < len(self._heap):
            self._heap = [e for e in self._heap if e.live]
            heapq.heapify(self._heap)

    def peek(self) -> Entry[T] | None:
        while self._heap and not self._heap[0].live:
            heapq.heappop(self._heap)
        return self._heap[0] if self._heap else None

    def drain(self) -> list[T]:
        """Remove and return every live item (best first), e.g. to fail them on shutdown."""
        items = []
        while (entry := self.peek()) is not None:
            heapq.heappop(self._heap)
            self.discard(entry)
            items.append(entry.item)
        return items

    def begin_pass(self) -> Cursor[T]:
        """Walk live entries best-first; entries added during the pass are seen too."""
        return Cursor(self)


class Cursor(Generic[T]):
    """One ordered walk over a Scheduler. Call ``end()`` (also on error) to re-queue skips."""

    def __init__(self, sched: Scheduler[T]) -> None:
        self._sched = sched
        self._skipped: list[Entry[T]] = []
        sched._in_pass = True

    def next(self) -> Entry[T] | None:
        heap = self._sched._heap
        while heap:
            entry = heapq.heappop(heap)
            if entry.live:
                return entry
        return None

    def take(self, entry: Entry[T]) -> None:
        self._sched.discard(entry)

    def skip(self, entry: Entry[T]) -> None:
        self._skipped.append(entry)

    def end(self) -> None:
        heap = self._sched._heap
        for entry in self._skipped:
            if entry.live:
                heapq.heappush(heap, entry)
        self._skipped.clear()
        self._sched._in_pass = False
