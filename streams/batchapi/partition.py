"""One parked partition: its requests, its cuts, what is settled and the offset to commit.

Requests are read in offset order. Those past the last cut wait in ``pending`` until
``max_requests_per_job`` of them are there or the oldest has waited ``max_wait_seconds``;
then they become a new cut (one job per endpoint and model, run by ``runner.CutRunner``).
Requests re-read after a restart are attached to the cut stored for their offset. A request
is settled once its output is acknowledged by the broker; the partition commits up to its
first unsettled offset, so nothing is committed past an unpublished answer and a request
waiting for its job never blocks the source topic (only this parked partition). A request
whose deadline comes within ``fallback_slack_seconds`` while it waits is answered by a
normal call at once; its late batch result is then dropped (``handled``).

Usage::

    part = PartitionJobs(partition, stored_cuts, deps)
    part.feed(held); part.tick(now)            # the coordinator's loop
    offset = part.commit_offset()
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from streams.batchapi.jobs import Cut, Part
from streams.batchapi.parking import ParkedRecord
from streams.contract import Request

log = logging.getLogger("streams.batchapi")


@dataclass(slots=True)
class Held:
    """A parked request held by its partition: the record and the request it parses to."""

    rec: ParkedRecord
    req: Request | None  # None: it no longer parses (a config change): the normal path says why


@dataclass(slots=True)
class ActiveCut:
    cut: Cut
    held: list[Held]
    task: asyncio.Task[None] | None = None
    riders: list[Held] = field(default_factory=list)  # answered by another cut's lines


class PartitionJobs:
    """See the module docstring. ``start_cut(self, active)`` runs a cut to its end (a task);
    ``normal(self, helds, reason)`` answers requests by normal calls (a task)."""

    def __init__(
        self,
        partition: int,
        stored: list[Cut],
        start_cut: Callable[[PartitionJobs, ActiveCut], asyncio.Task[None]],
        normal: Callable[[PartitionJobs, list[Held], str], None],
        max_per_job: int,
        max_wait: float,
        fallback_slack: float,
    ) -> None:
        self.partition = partition
        self.cuts = [ActiveCut(c, []) for c in sorted(stored, key=lambda c: c.start)]
        self.pending: list[Held] = []
        self.open: dict[int, None] = {}  # unsettled offsets, ascending
        self.handled: set[int] = set()  # answered by a normal call while in a job
        # The lines of this partition's running cuts, by what they answer (``Repeats.ident``:
        # a content where answers may be shared, else an id and content): a request delivered
        # twice (a producer's retry, a redelivery parked again), or one of the same shared
        # content, rides on that line instead of paying a line of its own in a later cut.
        self.lines: dict[tuple[str, ...], list[Held]] = {}
        self.position = -1  # next offset to read; -1 until known
        self._deadlines: list[tuple[int, int]] = []  # (deadline ms, offset): a heap
        self._by_offset: dict[int, Held] = {}
        self._start_cut = start_cut
        self._normal = normal
        self._max_per_job = max_per_job
        self._max_wait = max_wait
        self._fallback_ms = int(fallback_slack * 1000)

    def normal(self, helds: list[Held], reason: str) -> None:
        """Answer ``helds`` by normal calls (a task); each is settled when its output is acked."""
        self._normal(self, helds, reason)

    def held_count(self) -> int:
        return len(self.open)

    def feed(self, held: Held) -> None:
        """A request read from the partition, in offset order."""
        offset = held.rec.offset
        self.position = max(self.position, offset + 1)
        for active in self.cuts:
            if active.cut.start <= offset < active.cut.end:
                if active.cut.done:
                    return  # answered before a restart, not yet committed: nothing to do
                active.held.append(held)
                break
        else:
            self.pending.append(held)
        self.open[offset] = None
        self._by_offset[offset] = held
        if held.req is not None and held.req.deadline is not None:
            heapq.heappush(self._deadlines, (held.req.deadline, offset))

    def settle(self, offset: int) -> None:
        """The request's output is acknowledged (or it needs none)."""
        self.open.pop(offset, None)
        self._by_offset.pop(offset, None)

    def commit_offset(self) -> int | None:
        """The offset to commit: the first unsettled one, or the read position."""
        for offset in self.open:
            return offset
        return self.position if self.position >= 0 else None

    def tick(self, now: float) -> None:
        """Fall back for deadlines, cut what is due, start the cuts that can run."""
        self._fall_back(now)
        pending = self.pending
        if pending and (len(pending) >= self._max_per_job
                        or now - pending[0].rec.parked_at >= self._max_wait):
            take, self.pending = pending[:self._max_per_job], pending[self._max_per_job:]
            start, end = take[0].rec.offset, take[-1].rec.offset + 1
            cut = Cut(self.partition, start, end, len(take), created=now)
            self.cuts.append(ActiveCut(cut, take))
        for active in self.cuts:
            if active.task is None and not active.cut.done and self.position >= active.cut.end:
                active.task = self._start_cut(self, active)

    def finished_cuts(self, committed: int) -> list[Cut]:
        """Done cuts the committed offset has passed (to drop from the store); forgotten here."""
        gone = [a.cut for a in self.cuts if a.cut.done and committed >= a.cut.end]
        if gone:
            self.handled = {o for o in self.handled if o >= committed}
        self.cuts = [a for a in self.cuts if not (a.cut.done and committed >= a.cut.end)]
        return gone

    def parts(self) -> list[tuple[Part, float]]:
        """Every part of the running cuts, with its cut's creation time."""
        return [(p, a.cut.created) for a in self.cuts if not a.cut.done for p in a.cut.parts]

    def cancel(self) -> None:
        for active in self.cuts:
            if active.task is not None:
                active.task.cancel()

    def _fall_back(self, now: float) -> None:
        due_ms = int(now * 1000) + self._fallback_ms
        late: list[Held] = []
        while self._deadlines and self._deadlines[0][0] <= due_ms:
            _, offset = heapq.heappop(self._deadlines)
            held = self._by_offset.get(offset)
            if held is None or offset in self.handled:
                continue  # settled already
            self.handled.add(offset)
            late.append(held)
        if late:
            gone = {h.rec.offset for h in late}
            self.pending = [h for h in self.pending if h.rec.offset not in gone]
            self.normal(late, "deadline")
