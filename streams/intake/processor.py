"""Turns each consumed record into exactly one published output record.

The runtime calls ``process_batch`` (one Redis round trip per batch, hits published
together; each miss goes on as a task of its own). It never raises (except on cancellation):
every failure becomes a dead letter, so nothing a record contains can crash the agent or
skip its offset (faust-streaming #315/#527). A record is done only once its output is
acknowledged by the broker; the caller acks the offset after that. A miss that can wait is
parked instead (``parking``, work that can wait: ``streams.batchapi``); the parked record is
its output.

Usage::

    processor = Processor(settings, publisher, dispatcher, cache, metrics)
    await processor.process_batch(records, done=lambda rec, outcome: ack(rec))
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from streams.cache.idempotency import IdemRef
from streams.cache.responses import Prefetched
from streams.config import Settings
from streams.contract import (
    Completion,
    Request,
    Source,
    peek_id,
)
from streams.errors import (
    DispatchFailed,
    OutputTooLarge,
    ValidationFailed,
)
from streams.intake.front import Front, NativeFront
from streams.intake.owner import Ownership
from streams.metrics import PipelineMetrics
from streams.output.deadletters import DeadLetters
from streams.output.records import OutRecord, Publisher
from streams.pricing import Cost, Pricing

log = logging.getLogger("streams.processor")


def cancelling() -> bool:
    """True when the current task is being cancelled (a stop), False for a CancelledError
    raised from below while nobody cancelled us: that one is a failure of its record, which
    must still get its one output, or its offset would be tracked with no task to finish it."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


@dataclass(slots=True, frozen=True)
class InRecord:
    source: Source
    key: bytes | None
    value: bytes | None
    headers: Any = None  # the consumed record's headers (what the client gave: list or None)


class Later(Protocol):
    """``later(rec, work, req)``: the record's work goes on as a task of its own."""

    def __call__(self, rec: InRecord, work: Coroutine[None, None, str],
                 req: Request | None = None, /) -> None: ...


class Answerer(Protocol):
    async def dispatch(self, req: Request) -> Completion: ...


class Cache(Protocol):
    """The response cache and idempotency store (``streams.cache.ResponseCache``)."""

    async def remember(self, ref: IdemRef, value: bytes) -> bool: ...
    def note_replay(self) -> None: ...
    async def prefetch(self, reqs: list[Request], topics: list[str]) -> list[Prefetched]:
        """The remembered output and the cached answer of many requests in one round trip."""
    def coalesce(
        self, req: Request, key: str, compute: Callable[[], Awaitable[Completion]],
        ref: IdemRef | None = None,
    ) -> Awaitable[Completion]: ...


class Parker(Protocol):
    """Work that can wait (``streams.batchapi.parking.Parking``): requests parked for a batch job."""

    def wants(self, req: Request) -> bool: ...
    async def park(self, rec: InRecord, req: Request) -> str: ...


class Processor:
    """See the module docstring."""

    def __init__(
        self,
        settings: Settings,
        publisher: Publisher,
        dispatcher: Answerer,
        cache: Cache | None,
        metrics: PipelineMetrics,
        clock: Callable[[], float] = time.time,
        front: Front | None = None,
        parking: Parker | None = None,
        owner: Ownership | None = None,
    ) -> None:
        self._parking = parking
        self._owner = owner  # which source partitions are ours (owner.py); None: all of them
        self._publisher = publisher
        self._dispatch = dispatcher.dispatch  # bound once: one lookup less per miss
        self._cache = cache
        self._metrics = metrics
        self._clock = clock
        self._topics = settings.topics
        self._letters = DeadLetters(settings, publisher, metrics)
        self._pricing = Pricing(settings.pricing)
        # How a record becomes a request and an answer its output (a pipeline's own, or the
        # request topic's): the one record path below is the same for both.
        self._front = front or NativeFront(settings)

    async def process_batch(
        self,
        recs: list[InRecord],
        done: Callable[[InRecord, str], None],
        fast_done: Callable[[], None] = lambda: None,
    ) -> None:
        """Process records together; ``done(rec, outcome)`` once each output is acknowledged.

        The hot path of a worker: one Redis round trip recalls and looks up every request of
        the batch, and the cache hits and replays are published together without a task each.
        Misses go on as one task each (``_miss``); ``fast_done()`` is
        called once they are started and the rest is published. ``done`` is called exactly
        once per record: a record's failure (even inside its error handling) becomes its own
        ``internal`` dead letter and never cancels the others. Never raises except on
        cancellation, which cancels the batch's unfinished records (redelivered later).
        """
        slow: list[asyncio.Task[None]] = []
        handed: set[int] = set()  # records given a task or finished

        def finish(rec: InRecord, outcome: str) -> None:
            handed.add(id(rec))
            try:
                done(rec, outcome)
                self._front.observe(rec, outcome)  # after: its failure must not keep the ack
            except Exception:  # the caller's bug must not take the other records down
                log.exception("done callback failed for offset %d", rec.source.offset)

        def later(rec: InRecord, work: Coroutine[None, None, str], req: Request | None = None
                  ) -> None:
            handed.add(id(rec))
            slow.append(asyncio.ensure_future(self._then(rec, work, finish, req)))

        try:
            try:
                await self._fan_out(recs, later, finish)
            except Exception as exc:  # a bug in the batch path: each record left gets its letter
                log.exception("batch of %d records failed", len(recs))
                for rec in recs:
                    if id(rec) not in handed:
                        later(rec, self.fail(rec, exc))
            fast_done()
            del recs  # finished records' values are not kept while a slow one runs
            if slow:
                await asyncio.gather(*slow)
        except BaseException:
            for task in slow:
                task.cancel()
            raise
        finally:
            fast_done()

    async def _fan_out(
        self,
        recs: list[InRecord],
        later: Later,
        finish: Callable[[InRecord, str], None],
    ) -> None:
        parsed: list[tuple[InRecord, Request]] = []
        for rec in recs:
            try:
                parsed.append((rec, self._front.parse(rec)))
            except ValidationFailed as exc:
                rid = getattr(exc, "request_id", None) or peek_id(rec.value)
                later(rec, self._letters.write(rec, exc, None, rid, 0, []))
        cache = self._cache
        if cache is None or not parsed:
            for rec, req in parsed:
                later(rec, self._miss(rec, req, None), req)
        else:
            await self._fast(cache, parsed, later, finish)

    async def _fast(
        self,
        cache: Cache,
        parsed: list[tuple[InRecord, Request]],
        later: Later,
        done: Callable[[InRecord, str], None],
    ) -> None:
        ready: list[tuple[InRecord, Request, Completion | None, Cost | None]] = []
        out: list[OutRecord] = []
        responses = self._topics.responses
        for rec, req, got in await self._prefetch(cache, parsed, later):
            if got.recalled is not None and got.recalled.kind == "response":
                ready.append((rec, req, None, None))
                out.append(OutRecord(responses, rec.key, got.recalled.value,
                                     self._front.headers(rec)))
            elif got.hit is not None:
                try:
                    cost = self._pricing.of_completion(got.hit)
                    value = self._front.record(rec, req, got.hit, self._latency_ms(rec),
                                               None if cost is None else cost.record())
                except Exception as exc:  # a cached body we cannot write back: this record only
                    later(rec, self.fail(rec, exc, req))
                    continue
                ready.append((rec, req, got.hit, cost))
                out.append(OutRecord(responses, rec.key, value, self._front.headers(rec)))
            elif self._parking is not None and self._parking.wants(req):  # answered from a batch job
                later(rec, self._parking.park(rec, req), req)
            else:
                later(rec, self._miss(rec, req, got), req)
        if not out:
            return
        refused = await self._publisher.publish_many(out)
        for (rec, req, comp, cost), too_large in zip(ready, refused, strict=True):
            if too_large is not None:
                later(rec, self._letters.write(rec, too_large, req, req.id, 0, []))
            elif comp is None:
                cache.note_replay()
                self._metrics.output("replayed")
                done(rec, "replayed")
            else:
                done(rec, self._count(rec, req, comp, cost))

    async def _prefetch(
        self,
        cache: Cache,
        parsed: list[tuple[InRecord, Request]],
        later: Later,
    ) -> list[tuple[InRecord, Request, Prefetched]]:
        """What Redis knows of each record; a record whose prefetch failed is never dispatched
        unchecked (it might be a redelivery already paid for): it gets an ``internal`` letter."""
        try:
            found = await cache.prefetch(
                [req for _, req in parsed], [rec.source.topic for rec, _ in parsed]
            )
            return [(rec, req, got) for (rec, req), got in zip(parsed, found, strict=True)]
        except (Exception, asyncio.CancelledError) as exc:  # a bug: find the records it concerns
            if isinstance(exc, asyncio.CancelledError) and cancelling():
                raise
            log.exception("batch prefetch failed; prefetching its %d records one by one",
                          len(parsed))
        alone = await asyncio.gather(
            *(cache.prefetch([req], [rec.source.topic]) for rec, req in parsed),
            return_exceptions=True,
        )
        kept = []
        for (rec, req), got in zip(parsed, alone, strict=True):
            if isinstance(got, Exception) or (
                isinstance(got, asyncio.CancelledError) and not cancelling()
            ):
                later(rec, self.fail(rec, got, req))
            elif isinstance(got, BaseException):
                raise got
            else:
                kept.append((rec, req, got[0]))
        return kept

    async def _miss(self, rec: InRecord, req: Request, got: Prefetched | None) -> str:
        """A request not answered from Redis: dispatched once for all identical ones in flight
        (``cache.coalesce``), remembered, published. ``got`` is None without a cache."""
        ref = None
        try:
            answer = self._front.answer
            if got is None or self._cache is None:
                comp = await answer(req, self._dispatch)
            else:
                ref = got.ref
                comp = await self._cache.coalesce(
                    req, got.key, partial(answer, req, self._dispatch), ref
                )
        except DispatchFailed as failed:
            return await self._letters.write(
                rec, failed.error, req, req.id, failed.attempts, failed.endpoints
            )
        return await self._respond(rec, req, comp, ref)

    async def _then(self, rec: InRecord, work: Coroutine[None, None, str],
                    done: Callable[[InRecord, str], None], req: Request | None) -> None:
        """Run one record's work to its one output (the agent's edge: a bug becomes a dead
        letter, not a skip), then ``done``. One task, no wrapper coroutine: each coroutine is
        ~3 objects for the garbage collector to walk while the record waits."""
        try:
            try:
                outcome = await work
            except asyncio.CancelledError as exc:
                if cancelling():
                    raise
                outcome = await self.fail(rec, exc, req)  # a stray one, not a stop (cancelling())
            except Exception as exc:
                outcome = await self.fail(rec, exc, req)
        except asyncio.CancelledError as exc:
            if cancelling():
                raise
            outcome = await self.fail(rec, exc)  # failed in its own error handling: still one output
        except Exception as exc:
            outcome = await self.fail(rec, exc)
        done(rec, outcome)

    async def fail(self, rec: InRecord, exc: BaseException, req: Request | None = None) -> str:
        """An ``internal`` dead letter (``DeadLetters.internal``); the outcome label."""
        return await self._letters.internal(rec, exc, req)

    def _latency_ms(self, rec: InRecord) -> int:
        return max(0, int(self._clock() * 1000) - rec.source.timestamp)

    async def _respond(
        self, rec: InRecord, req: Request, comp: Completion, ref: IdemRef | None
    ) -> str:
        cost = self._pricing.of_completion(comp)
        value = self._front.record(rec, req, comp, self._latency_ms(rec),
                                   None if cost is None else cost.record())
        cache = self._cache
        try:
            if cache is not None and ref is not None and not comp.cached:
                # Remembered before it is published (and so before its offset is committed):
                # whoever saw this answer, a redelivery of the id never pays for it again.
                if (await cache.remember(ref, value) and self._owner is not None
                        and not await self._owner.keeps(rec.source.topic, rec.source.partition)):
                    return self._metrics.handed_over_answer(req.tenant, comp, cost)
            await self._publisher.publish(self._topics.responses, rec.key, value,
                                          self._front.headers(rec))
        except OutputTooLarge as exc:
            return await self._letters.write(rec, exc, req, req.id, comp.attempts, comp.endpoints)
        return self._count(rec, req, comp, cost)

    def _count(self, rec: InRecord, req: Request, comp: Completion, cost: Cost | None) -> str:
        return self._metrics.published(req.tenant, comp, cost, self._latency_ms(rec) / 1000.0)
