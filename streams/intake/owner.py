"""Which source partitions this worker owns, so an answer whose partition went to another
worker is left to its new owner to publish.

A rebalance revokes every partition and assigns them again, most often to the same worker;
work in flight goes on meanwhile (``acks.py``). An answer that finishes for a partition now
owned by another worker would be published twice: here, and by the new owner, which starts
at the committed offset (no commit of ours passes an unfinished record) and republishes it
from the idempotency store. So once an answer is in that store, the processor asks
``keeps``: is its partition still ours? If not, it is not published here, and the new owner
publishes it once, from the store, with no upstream call. While a rebalance is under way the
answer waits for the assignment, at most ``hold_seconds``; then it is published, as before
(a duplicate at worst, never a loss).

Usage::

    owner = Ownership(hold_seconds=20.0)
    owner.revoked()                           # faust's on_partitions_revoked
    owner.assigned({(topic, partition)})      # faust's on_partitions_assigned
    if await owner.keeps(topic, partition): ...   # publish
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

HANDED_OVER = "handed_over"  # the outcome of an answer left to the new owner


class Ownership:
    """The partitions of the last assignment, and whether a rebalance is under way."""

    def __init__(self, hold_seconds: float) -> None:
        self._hold = hold_seconds
        self._owned: frozenset[tuple[str, int]] | None = None  # None: not assigned yet
        self._settled = asyncio.Event()
        self._settled.set()

    def revoked(self) -> None:
        """A rebalance began: whose each partition is, is known at its assignment."""
        self._settled.clear()

    def assigned(self, partitions: Iterable[tuple[str, int]]) -> None:
        """The rebalance ended with ``partitions`` (topic, partition) ours."""
        self._owned = frozenset(partitions)
        self._settled.set()

    async def keeps(self, topic: str, partition: int) -> bool:
        """Is (``topic``, ``partition``) still ours? Waits out a rebalance (at most
        ``hold_seconds``: then True, as before any assignment)."""
        if not self._settled.is_set():
            try:
                async with asyncio.timeout(self._hold):
                    await self._settled.wait()
            except TimeoutError:
                return True
        return self._owned is None or (topic, partition) in self._owned
