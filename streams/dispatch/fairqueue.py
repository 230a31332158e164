"""The waiting room's order: priority levels with aging, fair share between tenants within one.

Between levels nothing changes from ``scheduler.py``: a level's rank is that of its oldest
waiting entry, ``priority * aging_ms + enqueued_ms`` (``aging_ms == 0``: strict priority), so
priority 0 goes first and a waiting request gains one level per ``aging_ms``.

Within a level, tenants share in proportion to their ``weight`` by weighted fair queuing
(start-time fair queuing over per-tenant queues): a tenant's head carries the virtual finish
tag ``start + 1 / weight``, where ``start`` is its previous head's finish, or the level's
virtual time when the tenant was idle; the smallest tag goes first and the level's virtual time
becomes the start tag of what it served. A tenant alone gets everything; two backlogged
tenants of weights 3 and 1 get 3/4 and 1/4 of the grants; a tenant arriving behind a flood
waits for about one grant of each other tenant, not for the flood. Within one tenant's queue
the order is FIFO by first arrival (offset order within a partition; a retry keeps its place).

Usage: as ``scheduler.Scheduler`` (its docstring shows the walk of a pass), plus the tenant::

    fq: FairQueue[Ticket] = FairQueue(aging_ms=10_000, weight=lambda tenant: 1.0)
    entry = fq.add(ticket, priority=3, enqueued_ms=now_ms, tenant="team-a")
    # in the walk over fq.begin_pass(), before trying to grant e:
    if over_its_cap(e.tenant):
        cursor.skip_tenant(e.tenant)      # none of its entries this pass
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from streams.dispatch.scheduler import LEVELS

T = TypeVar("T")

MAX_IDLE_FLOWS = 1024  # per level: idle tenants whose service credit is remembered


@dataclass(eq=False, slots=True)
class Entry(Generic[T]):
    """One waiting item. ``live`` turns False once taken or discarded."""

    key: tuple[float, int]  # (first arrival ms, sequence)
    item: T
    priority: int
    tenant: str
    live: bool = True
    skipped: bool = False  # set aside for the rest of the current pass

    def __lt__(self, other: Entry[T]) -> bool:
        return self.key < other.key


# An entry in a heap, behind its key: (first arrival ms, sequence) are unique, so the heaps
# compare keys as tuples in C and never reach ``Entry.__lt__``.
Queued = tuple[tuple[float, int], Entry[T]]

@dataclass(eq=False, slots=True)
class _Flow(Generic[T]):
    """One tenant's queue within one level."""

    tenant: str
    step: float  # 1 / weight
    queue: list[Queued[T]] = field(default_factory=list)
    live: int = 0
    finish: float = 0.0  # the head's virtual finish tag (or the last one served, when idle)
    version: int = 0  # bumped whenever its place in the level's heap changes


@dataclass(eq=False, slots=True)
class _Level(Generic[T]):
    flows: dict[str, _Flow[T]] = field(default_factory=dict)
    ready: list[tuple[float, int, int, _Flow[T]]] = field(default_factory=list)
    age: list[Queued[T]] = field(default_factory=list)
    vtime: float = 0.0
    live: int = 0


class FairQueue(Generic[T]):
    """See the module docstring."""

    def __init__(self, aging_ms: int, weight: Callable[[str], float] = lambda _: 1.0) -> None:
        self._aging_ms = aging_ms
        self._weight = weight
        self._levels: list[_Level[T]] = [_Level() for _ in range(LEVELS)]
        self._seq = itertools.count()
        self._tenants: dict[str, int] = {}
        self._live = 0
        self._cursor: Cursor[T] | None = None
        # The virtual time of the grant being served now, per level (``slots.SlotBook``):
        # grants are made ahead of their slots, so a tenant arriving idle starts from what
        # is being served, not from the last grant.
        self.service_tag: Callable[[int], float | None] | None = None

    def __len__(self) -> int:
        return self._live

    def depth(self) -> list[int]:
        """Number of waiting entries per priority level (index = priority)."""
        return [level.live for level in self._levels]

    def tenant_depth(self) -> dict[str, int]:
        """Number of waiting entries per tenant."""
        return dict(self._tenants)

    def add(self, item: T, priority: int, enqueued_ms: float, tenant: str = "default"
            ) -> Entry[T]:
        """Queue ``item``; a retried request passes its first enqueue time to keep its place."""
        priority = min(max(priority, 0), LEVELS - 1)
        entry = Entry((enqueued_ms, next(self._seq)), item, priority, tenant)
        level = self._levels[priority]
        flow = level.flows.get(tenant)
        if flow is None:
            flow = level.flows[tenant] = _Flow(tenant, 1.0 / self._weight(tenant))
        if flow.live == 0:  # idle until now: it starts at the level's virtual time
            vtime = level.vtime
            serving = self.service_tag(priority) if self.service_tag is not None else None
            if serving is not None:
                vtime = min(vtime, serving)
            flow.finish = max(vtime, flow.finish) + flow.step
            self._push(level, flow)
        queued = (entry.key, entry)  # the key orders the heaps (in C: no Entry.__lt__ calls)
        heapq.heappush(flow.queue, queued)
        heapq.heappush(level.age, queued)
        flow.live += 1
        level.live += 1
        self._live += 1
        self._tenants[tenant] = self._tenants.get(tenant, 0) + 1
        return entry

    def discard(self, entry: Entry[T], served: bool = False) -> None:
        """Forget an entry (granted: ``served``; cancelled, expired). Idempotent; lazy."""
        if not entry.live:
            return
        entry.live = False
        level = self._levels[entry.priority]
        flow = level.flows[entry.tenant]
        flow.live -= 1
        level.live -= 1
        self._live -= 1
        left = self._tenants[entry.tenant] - 1
        if left:
            self._tenants[entry.tenant] = left
        else:
            del self._tenants[entry.tenant]
        if served:
            level.vtime = max(level.vtime, flow.finish - flow.step)
            if flow.live:
                flow.finish += flow.step
                self._push(level, flow)
        if flow.live == 0:
            flow.version += 1  # out of the ready heap
            flow.queue.clear()
            if not served:  # its head was never served: the tag it held is given back
                flow.finish -= flow.step
            # An idle tenant is remembered only while it owes service (served ahead of the
            # level's virtual time), and only so many: tenants are named by requests.
            if flow.finish <= level.vtime or len(level.flows) > MAX_IDLE_FLOWS:
                del level.flows[entry.tenant]
        if self._cursor is None:
            self._compact(level, flow)

    def head_tag(self, entry: Entry[T]) -> float:
        """The virtual finish tag ``entry`` is served at (it heads its tenant's queue)."""
        return self._levels[entry.priority].flows[entry.tenant].finish

    def credit(self, tenant: str, priority: int) -> None:
        """Give back one grant's worth of ``tenant``'s share (its grant was taken back)."""
        level = self._levels[min(max(priority, 0), LEVELS - 1)]
        flow = level.flows.get(tenant)
        if flow is not None:
            flow.finish = max(flow.finish - flow.step, level.vtime + flow.step * (flow.live > 0))
            if flow.live:
                self._push(level, flow)

    def peek(self) -> Entry[T] | None:
        """The entry a pass would offer first."""
        cursor = self.begin_pass()
        try:
            return cursor.next()
        finally:
            cursor.end()

    def drain(self) -> list[T]:
        """Remove and return every live item (best first), e.g. to fail them on shutdown."""
        items = []
        while (entry := self.peek()) is not None:
            self.discard(entry)
            items.append(entry.item)
        return items

    def begin_pass(self) -> Cursor[T]:
        """Walk live entries best-first; entries added during the pass are seen too."""
        self._cursor = Cursor(self)
        return self._cursor

    # ---- internals -------------------------------------------------------------------------

    def _push(self, level: _Level[T], flow: _Flow[T]) -> None:
        flow.version += 1
        heapq.heappush(level.ready, (flow.finish, next(self._seq), flow.version, flow))

    def _rank(self, entry: Entry[T]) -> tuple[float, float]:
        if self._aging_ms > 0:
            return (entry.priority * self._aging_ms + entry.key[0], 0.0)
        return (float(entry.priority), entry.key[0])

    @staticmethod
    def _compact(level: _Level[T], flow: _Flow[T]) -> None:
        # Dead entries stay in the heaps until popped; rebuild when they dominate, so a burst
        # of cancellations cannot grow them without bound.
        if len(level.age) > 64 and level.live * 2 < len(level.age):
            level.age = [q for q in level.age if q[1].live]
            heapq.heapify(level.age)
        if len(flow.queue) > 64 and flow.live * 2 < len(flow.queue):
            flow.queue = [q for q in flow.queue if q[1].live]
            heapq.heapify(flow.queue)
        if len(level.ready) > 64 and len(level.ready) > 2 * len(level.flows):
            level.ready = [r for r in level.ready if r[2] == r[3].version]
            heapq.heapify(level.ready)


class Cursor(Generic[T]):
    """One ordered walk over a FairQueue. Call ``end()`` (also on error) to restore skips."""

    def __init__(self, fq: FairQueue[T]) -> None:
        self._fq = fq
        self._set_aside: list[Entry[T]] = []
        self._excluded: set[str] = set()
        self._popped: list[tuple[list[Queued[T]], Queued[T]]] = []  # live, to push back at end
        self._parked: list[tuple[_Level[T], tuple[float, int, int, _Flow[T]]]] = []

    def next(self) -> Entry[T] | None:
        best: tuple[tuple[float, float], Entry[T]] | None = None
        for level in self._fq._levels:
            if not level.live:  # nothing waits here (dead entries are popped when it has some)
                continue
            oldest = self._top(level.age)
            if oldest is not None and (best is None or self._fq._rank(oldest) < best[0]):
                best = (self._fq._rank(oldest), oldest)
        if best is None:
            return None
        level = self._fq._levels[best[1].priority]
        while level.ready:
            _, _, version, flow = level.ready[0]
            if version != flow.version or flow.live == 0:
                heapq.heappop(level.ready)
            elif flow.tenant in self._excluded or (head := self._top(flow.queue)) is None:
                self._parked.append((level, heapq.heappop(level.ready)))
            else:
                return head
        return best[1]  # only when added during this pass behind a parked tenant

    def take(self, entry: Entry[T]) -> None:
        """Granted: served in its tenant's fair share."""
        self._fq.discard(entry, served=True)

    def skip(self, entry: Entry[T]) -> None:
        """Not now: the rest of this pass goes on without it."""
        entry.skipped = True
        self._set_aside.append(entry)

    def skip_tenant(self, tenant: str) -> None:
        """None of ``tenant``'s entries this pass (it is at its ``max_inflight``). O(1)."""
        self._excluded.add(tenant)

    def end(self) -> None:
        for entry in self._set_aside:
            entry.skipped = False
        for heap, queued in self._popped:
            if queued[1].live:
                heapq.heappush(heap, queued)
        for level, ready in self._parked:
            heapq.heappush(level.ready, ready)
        self._set_aside.clear()
        self._popped.clear()
        self._parked.clear()
        self._fq._cursor = None

    def _top(self, heap: list[Queued[T]]) -> Entry[T] | None:
        while heap:
            top = heap[0][1]
            if top.live and not top.skipped and top.tenant not in self._excluded:
                return top
            queued = heapq.heappop(heap)
            if top.live:  # set aside for this pass only
                self._popped.append((heap, queued))
        return None
