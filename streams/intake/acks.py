"""Per-partition in-flight tracker: release acks only for the contiguous prefix of finished offsets.

faust commits whatever offsets it is told are acked, and its head-gap guard can commit past
a single unfinished message (faust-streaming #606). So we never hand it an out-of-order ack:
work finishes in any order, but an offset is released only when every earlier tracked offset
of its partition has finished too.

Rebalances: on revoke, every token of the partition goes stale (faust has reset its
bookkeeping); the work keeps running. When faust redelivers an offset we already track, the
new token is bound to the existing entry instead of starting the work again. The first offset
redelivered after a revoke is faust's committed position, so anything tracked below it was
committed already and is dropped.

Memory: ``len(tracker)`` counts every tracked offset (in flight, and finished but behind an
unfinished one); the worker stops taking records at ``limits.max_tracked``. An entry holds its
token and a flag, so the token should be only what the ack needs (the worker passes faust's
message with its key and value dropped).

Usage::

    tracker = AckTracker()
    if tracker.add(tp, offset, message):   # True: new work, start it
        ...
    for message in tracker.finish(tp, offset):
        message.ack(consumer)              # in offset order, contiguous
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
TP = Hashable


@dataclass(slots=True)
class _Entry(Generic[T]):
    token: T | None
    done: bool = False


@dataclass(slots=True)
class _Partition(Generic[T]):
    offsets: list[int] = field(default_factory=list)  # sorted; usually appended in order
    entries: dict[int, _Entry[T]] = field(default_factory=dict)
    fresh: bool = False  # revoked: the next add() tells us faust's committed position

    def release(self) -> list[T]:
        out: list[T] = []
        n = 0
        for off in self.offsets:
            entry = self.entries[off]
            if not entry.done:
                break
            del self.entries[off]
            n += 1
            if entry.token is not None:
                out.append(entry.token)
        if n:
            del self.offsets[:n]
        return out


class AckTracker(Generic[T]):
    """Tracks in-flight offsets per partition; see the module docstring."""

    def __init__(self) -> None:
        self._parts: dict[TP, _Partition[T]] = {}
        self._size = 0

    def __len__(self) -> int:
        """Tracked offsets over every partition (in flight and finished, not yet released)."""
        return self._size

    def add(self, tp: TP, offset: int, token: T) -> bool:
        """Track an offset; return False when it is already tracked (a redelivery)."""
        part = self._parts.get(tp)
        if part is None:
            part = self._parts[tp] = _Partition()
        if part.fresh:
            part.fresh = False
            cut = bisect.bisect_left(part.offsets, offset)
            for off in part.offsets[:cut]:
                del part.entries[off]
            del part.offsets[:cut]
            self._size -= cut
        entry = part.entries.get(offset)
        if entry is not None:
            entry.token = token
            return False
        part.entries[offset] = _Entry(token)
        self._size += 1
        if not part.offsets or offset > part.offsets[-1]:
            part.offsets.append(offset)
        else:
            bisect.insort(part.offsets, offset)
        return True

    def finish(self, tp: TP, offset: int) -> list[T]:
        """Mark an offset finished; return the tokens now safe to ack, in offset order."""
        part = self._parts.get(tp)
        if part is None:
            return []
        entry = part.entries.get(offset)
        if entry is None:
            return []
        entry.done = True
        if part.offsets[0] != offset:
            return []
        return self._release(part)

    def forget(self, tp: TP, offset: int) -> list[T]:
        """Stop tracking an offset whose output is another owner's to publish (``owner.py``):
        if its partition comes back, its redelivery is new work, not a finished entry. Returns
        the tokens now safe to ack, in offset order."""
        part = self._parts.get(tp)
        if part is None or part.entries.pop(offset, None) is None:
            return []
        del part.offsets[bisect.bisect_left(part.offsets, offset)]
        self._size -= 1
        return self._release(part)

    def pending(self, tp: TP) -> list[T]:
        """Tokens whose offset is finished, now releasable (after a redelivery rebind)."""
        part = self._parts.get(tp)
        return self._release(part) if part is not None else []

    def _release(self, part: _Partition[T]) -> list[T]:
        before = len(part.offsets)
        out = part.release()
        self._size -= before - len(part.offsets)
        return out

    def finished_from(self, tp: TP, base: int) -> list[int]:
        """Offsets at or above ``base`` that are finished but not yet released, in order."""
        part = self._parts.get(tp)
        if part is None:
            return []
        entries = part.entries
        return [off for off in part.offsets[bisect.bisect_left(part.offsets, base):]
                if entries[off].done]

    def revoke(self, tps: set[TP] | list[TP]) -> None:
        """Partitions were revoked: drop every token, keep the work."""
        for tp in tps:
            part = self._parts.get(tp)
            if part is None:
                continue
            part.fresh = True
            for entry in part.entries.values():
                entry.token = None

    def describe(self) -> dict[str, tuple[int, int | None, int]]:
        """Per partition: tracked offsets, the lowest one, how many of them are finished."""
        return {
            str(tp): (len(p.offsets), p.offsets[0] if p.offsets else None,
                      sum(e.done for e in p.entries.values()))
            for tp, p in self._parts.items()
        }
