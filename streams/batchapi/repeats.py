"""Requests delivered twice to a parked partition: paid for once.

A request is parked twice when its producer retried it, or when a worker died between
parking it and committing its source offset (the new owner reads and parks it again). Within
one cut identical requests share a line (``runner.CutRunner._lines``); across cuts:

- a new cut first republishes the remembered output of a request answered already (by an
  earlier cut's job or a normal call), as the processor does for a redelivery, and gives it no
  line;
- a request whose first delivery sits in a line of a cut still running rides on that line
  (``PartitionJobs.lines``, keyed by the request's idempotency key and content fingerprint,
  so an id reused with other content is apart): it is answered from that line's result, or
  sent down the normal path with it if the line fails;
- so does a request of another id with the same content, where answers may be shared (the
  cache on, and not ``no_cache``), as the normal path's content lock makes it wait for the
  call in flight. Lines are keyed the same way within a cut (``ident``): with the cache off
  or ``no_cache``, identical requests of different ids each pay their own line, as they pay
  their own call on the normal path.

Of the requests a line answers, one is its payer; the others are published as the normal
path publishes a coalesced answer: ``cached``, their cost counted as saved (``runner``).

A cut is done only once every request of it is settled (``settled``): a done cut's requests
are skipped when the partition is read again after a restart, so one still on its way down
the normal path (a failed line, a deadline) or riding on another cut's line would otherwise
get no output at all.

Usage::

    repeats = Repeats(settings, cache, publisher)
    await repeats.replay_answered(pj, active)          # a new cut, before its lines
    if not repeats.ride(pj, active, held, this_cuts_lines): ...   # in _lines
    repeats.offer(pj, held, line)                       # the line ``held`` opened or joined
    repeats.close(pj, {tag: by_key})                    # before answering those lines
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from streams.batchapi.partition import ActiveCut, Held, PartitionJobs
from streams.cache.idempotency import IdemRef
from streams.cache.responses import Prefetched
from streams.config import Settings
from streams.contract import Completion, Request
from streams.output.records import OutRecord, Publisher

CHUNK = 512  # requests looked up, answers remembered and published, together


class BatchCache(Protocol):
    """What the batch path needs of ``streams.cache.ResponseCache``."""

    def key(self, req: Request) -> str: ...
    def ref(self, req: Request, topic: str) -> IdemRef: ...
    def note_replay(self) -> None: ...
    async def prefetch(self, reqs: list[Request], topics: list[str]) -> list[Prefetched]: ...
    async def store(self, req: Request, comp: Completion, key: str | None = None) -> None: ...
    async def remember(self, ref: IdemRef, value: bytes) -> bool: ...


class Repeats:
    """See the module docstring."""

    def __init__(self, settings: Settings, cache: BatchCache, publisher: Publisher) -> None:
        self._responses = settings.topics.responses
        self._shared = settings.cache.enabled
        self._cache = cache
        self._publisher = publisher

    async def replay_answered(self, pj: PartitionJobs, active: ActiveCut) -> None:
        """Republish the remembered outputs of the cut's requests answered already."""
        helds = [h for h in active.held if h.req is not None and h.rec.offset not in pj.handled]
        out: list[OutRecord] = []
        done: list[int] = []
        for i in range(0, len(helds), CHUNK):
            chunk = helds[i:i + CHUNK]
            found = await self._cache.prefetch([h.req for h in chunk if h.req is not None],
                                               [h.rec.source.topic for h in chunk])
            for held, got in zip(chunk, found, strict=True):
                if got.recalled is not None and got.recalled.kind == "response":
                    out.append(OutRecord(self._responses, held.rec.key, got.recalled.value))
                    done.append(held.rec.offset)
        if not done:
            return
        pj.handled.update(done)  # no line for them, and no late answer
        await self._publisher.publish_many(out)
        for offset in done:
            self._cache.note_replay()
            pj.settle(offset)

    def ride(self, pj: PartitionJobs, active: ActiveCut, held: Held,
             own: dict[str, list[Held]]) -> bool:
        """Put ``held`` on the line of its first delivery if that line is in another cut
        still running (``own``: this cut's lines of the same endpoint and model)."""
        line = pj.lines.get(self.ident(held))
        if line is None or any(line is helds for helds in own.values()):
            return False
        line.append(held)
        active.riders.append(held)
        return True

    def offer(self, pj: PartitionJobs, held: Held, line: list[Held]) -> None:
        """``line`` (of a cut about to run) answers ``held``'s later deliveries too."""
        pj.lines.setdefault(self.ident(held), line)

    def close(self, pj: PartitionJobs, lines: dict[Any, dict[str, list[Held]]]) -> None:
        """No more riders for these lines (by part, then custom id): they are being answered
        (or sent to the normal path) now. Synchronous, so no rider can join between this and
        the answer."""
        for by_key in lines.values():
            for helds in by_key.values():
                for held in helds:
                    if held.req is not None:
                        ident = self.ident(held)
                        if pj.lines.get(ident) is helds:
                            del pj.lines[ident]

    def abandon(self, pj: PartitionJobs, active: ActiveCut,
                lines: dict[Any, dict[str, list[Held]]]) -> None:
        """The cut failed before answering its lines (it is run again from its state): their
        riders from other cuts, still unanswered, take the normal path (the run again builds
        new lines, which they are not on)."""
        self.close(pj, lines)
        mine = {id(h) for h in active.held}
        riders = [h for by_key in lines.values() for helds in by_key.values() for h in helds
                  if id(h) not in mine and h.rec.offset in pj.open
                  and h.rec.offset not in pj.handled]
        if riders:
            pj.handled.update(h.rec.offset for h in riders)
            pj.normal(riders, "job_failed")

    async def settled(self, pj: PartitionJobs, active: ActiveCut, poll: float) -> None:
        """Return once every request of the cut has its output acknowledged: those answered
        by its lines, those riding on another cut's line, those sent down the normal path."""
        while any(h.rec.offset in pj.open for h in (*active.held, *active.riders)):
            await asyncio.sleep(min(poll, 1.0))

    def ident(self, held: Held) -> tuple[str, ...]:
        """What makes parked requests one line: their content where answers may be shared
        (the cache on, and not ``no_cache``: as the normal path's content lock), else their
        id and content (one request delivered twice; as the normal path's id lock)."""
        req = held.req
        assert req is not None
        if self._shared and not req.cache.no_cache:
            return ("content", self._cache.key(req))
        ref = self._cache.ref(req, held.rec.source.topic)
        return ("id", ref.key, ref.fingerprint.hex())
