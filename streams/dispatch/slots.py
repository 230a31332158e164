"""Fair share for slots already granted: the slots reserved ahead go in fair-queue order.

The rate limiter grants slots up to 0.25 s ahead (``ratelimit.RESERVE_AHEAD_SECONDS``), and
each granted request sleeps until its slot. Under a flood those slots all belong to the
flooding tenant, so a request of another tenant, however fair its place in the queue, would
wait for all of them. So each grant carries its fair-queue tag (priority level, virtual
finish tag: ``fairqueue.py``), and within a level this worker's future slots of an endpoint go
to the grants in tag order: a grant whose tag is smaller than those of grants holding earlier
slots takes the earliest of those slots, and they each move one slot back (their order kept).
When no slot can be had at all (the horizon is full), the fair queue's best waiting request
takes over the future slot of the grant with the largest tag above its own (``steal``): that
request is told to ask again (``Grant.revoked``) and keeps its place in the queue.

The slots themselves are not changed, only who sends in them, so every limit holds as before.
Endpoints with a ``tpm`` limit are left alone (their slots are sized by each request's tokens).

Usage::

    book = SlotBook(clock)
    book.place(grant)                  # may move grant.at earlier and other grants later
    old = book.steal(tag, serves)      # a revoked grant whose slot (permit, at) to take over
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streams.dispatch.admission import Grant

# A slot this close is left to its request (it may be waking already).
LEAD_SECONDS = 0.002

Tag = tuple[int, float]  # (priority level, virtual finish tag)


class SlotBook:
    """This worker's granted, not yet due slots per endpoint; see the module docstring."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._sleeping: dict[str, list[Grant]] = {}  # by slot time; released ones linger
        self._top: dict[str, float] = {}  # at least the largest tag in the book

    def _book(self, name: str) -> list[Grant]:
        """The endpoint's future grants, without those due (a few at the front: O(1) each)."""
        book = self._sleeping.setdefault(name, [])
        soon = self._clock() + LEAD_SECONDS
        i = 0
        while i < len(book) and (book[i].released or book[i].at <= soon):
            i += 1
        if i:
            del book[:i]
        if not book:
            self._top[name] = -math.inf
        return book

    def service_tag(self, priority: int) -> float | None:
        """The smallest tag among the future grants of level ``priority`` (None: none)."""
        # Within a level the book is in tag order: the first of the level has the least.
        found: float | None = None
        for name in list(self._sleeping):
            for g in self._book(name):
                if g.tag is not None and g.tag[0] == priority and not g.released:
                    found = g.tag[1] if found is None else min(found, g.tag[1])
                    break
        return found

    def place(self, grant: Grant) -> None:
        """Record ``grant``, in tag order among the future slots of its endpoint and level."""
        if not grant.at or grant.endpoint.tpm is not None:
            return
        name = grant.endpoint.name
        book = self._book(name)
        tag = grant.tag
        # Grants of one backlogged tenant come in tag order: nothing to scan for.
        if tag is not None and self._top.get(name, -math.inf) > tag[1]:
            behind = [g for g in book if g.tag is not None and g.tag[0] == tag[0]
                      and g.tag[1] > tag[1] and g.at < grant.at and not g.released]
            if behind:
                times = [g.at for g in behind] + [grant.at]
                grant.at = times[0]
                for g, at in zip(behind, times[1:], strict=True):
                    g.at = at
        bisect.insort(book, grant, key=lambda g: g.at)
        if tag is not None:
            self._top[name] = max(self._top.get(name, -math.inf), tag[1])

    def steal(self, tag: Tag, serves: Callable[[Grant], bool]) -> Grant | None:
        """The future grant with the largest tag above ``tag`` in its level that ``serves``
        accepts, revoked (its request asks again); None if there is none."""
        best: Grant | None = None
        for name in list(self._sleeping):
            if self._top.get(name, -math.inf) <= tag[1]:
                continue  # nothing tagged after it here
            for g in self._book(name):
                if (g.tag is not None and g.tag[0] == tag[0] and g.tag[1] > tag[1]
                        and not g.probe and not g.released and serves(g)
                        and (best is None or best.tag is None or g.tag[1] > best.tag[1])):
                    best = g
        if best is not None:
            self._sleeping[best.endpoint.name].remove(best)
            best.revoked = best.released = True
        return best
