"""One embedding batch's calls (``BatchCalls``): its grant, the ``/embeddings`` call, and retry, split or fail.

Failures, per batch: a retryable one is retried as a batch (backoff, another endpoint when
one is free, ``retry.max_attempts``); a 400/413/422 splits it in halves, each retried on its
own, so one bad input fails alone after at most 2 x log2(n) + 1 calls; split calls do not
count toward ``retry.max_attempts``. Other 4xx, a bad answer or exhaustion fail every input
of the batch. An input's ``attempts`` are the calls that included it.

The batches are formed by ``EmbeddingBatcher`` (``embeddings.py``), which hands each to
``BatchCalls.send`` with its first grant.

Usage::

    calls = BatchCalls(client, dispatcher, admission, metrics, max_attempts, spawn)
    spawn(calls.send(EmbedBatch(model, params, items, ticket), await calls.grant(ticket)))
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from streams.config import EndpointConfig
from streams.contract import Completion, Params, Request, upstream_usage
from streams.dispatch.admission import Admission, Grant, Ticket
from streams.dispatch.retry import error_class, is_retryable
from streams.dispatch.scheduler import Entry
from streams.dispatch.telemetry import EmbeddingMetrics
from streams.dispatch.vectors import read_vectors, split_usage
from streams.embedding import embedding_body
from streams.errors import (
    AttemptsExhausted,
    DispatchFailed,
    StreamsError,
    UpstreamStatusError,
)

if TYPE_CHECKING:
    from streams.dispatch.parts import DispatchParts

log = logging.getLogger("streams.embeddings")

# A 4xx with one of these statuses may be one input's fault: the batch is split to find it.
SPLIT_STATUSES = frozenset({400, 413, 422})


class EmbedClient(Protocol):
    """One ``/embeddings`` call for many inputs (``upstream.UpstreamClient.embed``)."""

    async def embed(self, endpoint: EndpointConfig, model: str, inputs: list[str],
                    params: Params) -> dict[str, Any]: ...


class Attempts(Protocol):
    """What the batcher uses of the dispatcher: its parts and its per-call bookkeeping."""

    parts: DispatchParts

    async def until_slot(self, grant: Grant, ticket: Ticket) -> bool: ...
    def other_usable(self, model: str, failed: str) -> bool: ...
    async def attempt_call(self, grant: Grant, call: Awaitable[dict[str, Any]]
                           ) -> dict[str, Any]: ...


@dataclass(eq=False, slots=True)
class EmbedInput:
    req: Request
    tokens: int
    arrived: float  # clock seconds
    future: asyncio.Future[Completion]
    attempts: int = 0
    tried: list[str] = field(default_factory=list)
    entry: Entry[EmbedInput] | None = None


@dataclass(eq=False, slots=True)
class EmbedBatch:
    model: str
    params: dict[str, Any]
    items: list[EmbedInput]
    ticket: Ticket
    failures: int = 0  # retryable failures so far (split calls do not count)


class BatchCalls:
    """Calls for the batches it is given until each input has its vector or its error."""

    def __init__(self, client: EmbedClient, attempts: Attempts, admission: Admission,
                 metrics: EmbeddingMetrics, max_attempts: int,
                 spawn: Callable[[Awaitable[None]], asyncio.Task[None]]) -> None:
        self._client = client
        self._d = attempts
        self._admission = admission
        self.metrics = metrics
        self._max_attempts = max_attempts
        self._spawn = spawn

    async def grant(self, ticket: Ticket) -> Grant:
        """A grant for ``ticket`` from the dispatcher's admission, its slot's time waited out."""
        while True:
            grant = await self._admission.acquire(ticket, None)
            if grant is None:  # only with a deadline, which batches do not have
                continue
            if grant.at and not await self._d.until_slot(grant, ticket):
                continue  # cooling down since, or woke too late for the slot: ask again
            return grant

    async def send(self, batch: EmbedBatch, grant: Grant | None) -> None:
        """Call until every input of the batch has its vector or its error."""
        try:
            while True:
                if grant is None:
                    grant = await self.grant(batch.ticket)
                batch.items = [i for i in batch.items if not i.future.done()]
                if not batch.items:
                    self._admission.release(grant, None)
                    return
                again = await self._call(batch, grant)
                if not again:
                    return
                grant = None
        except asyncio.CancelledError:
            cancel(batch.items)
            raise
        except Exception as exc:  # a bug: each input gets it (an internal dead letter)
            log.exception("embedding batch of %d inputs failed", len(batch.items))
            crash(batch.items, exc)

    async def _call(self, batch: EmbedBatch, grant: Grant) -> bool:
        """One call for the batch; True when it is to be called again (after a backoff)."""
        items, name = batch.items, grant.endpoint.name
        for item in items:
            item.attempts += 1
            item.tried.append(name)
        batch.ticket.tried.append(name)
        self.metrics.batch_inputs.observe(len(items))
        texts = [i.req.input or "" for i in items]

        async def call() -> dict[str, Any]:
            body = await self._client.embed(grant.endpoint, batch.model, texts, batch.params)
            vectors = read_vectors(body, len(texts), endpoint=name, status=200)
            return {"vectors": vectors, "usage": body.get("usage")}

        try:
            got = await self._d.attempt_call(grant, call())
        except StreamsError as exc:
            return await self._failed(batch, name, exc)
        self.metrics.calls.labels(name, "ok").inc()
        usage = upstream_usage(got)
        total = (usage["total_tokens"] or usage["prompt_tokens"]) if usage else None
        shares = split_usage(total, [i.tokens for i in items])
        for item, (vector, dims), share in zip(items, got["vectors"], shares, strict=True):
            if not item.future.done():
                item.future.set_result(Completion(
                    model=batch.model, body=embedding_body(vector, dims, share, len(items)),
                    endpoint=name, attempts=item.attempts, endpoints=list(item.tried)))
                self.metrics.inputs.labels("ok").inc()
        return False

    async def _failed(self, batch: EmbedBatch, name: str, exc: StreamsError) -> bool:
        items = batch.items
        if (len(items) > 1 and isinstance(exc, UpstreamStatusError)
                and exc.status in SPLIT_STATUSES):
            self.metrics.calls.labels(name, "split").inc()
            half = len(items) // 2
            for part in (items[:half], items[half:]):
                t = batch.ticket
                ticket = Ticket(t.model, t.priority, t.enqueued, sum(i.tokens for i in part),
                                tried=list(t.tried))
                self._spawn(self.send(EmbedBatch(batch.model, batch.params, part, ticket,
                                              batch.failures), None))
            return False
        if not is_retryable(exc):
            self.metrics.calls.labels(name, "failed").inc()
            for item in items:
                self.fail(item, exc, "upstream")
            return False
        batch.failures += 1
        if batch.failures >= self._max_attempts:
            self.metrics.calls.labels(name, "failed").inc()
            tried = ", ".join(batch.ticket.tried)
            for item in items:
                self.fail(item, AttemptsExhausted(
                    f"gave up after {batch.failures} attempts ({tried}); last error: {exc}", exc
                ), "exhausted")
            return False
        self.metrics.calls.labels(name, "retry").inc()
        parts = self._d.parts
        log.debug("embedding batch of %d on %s failed (%s: %s); retrying", len(items), name,
                  error_class(exc), exc)
        other = self._d.other_usable(batch.model, name)
        await parts.sleep(parts.backoff.delay(batch.failures, None if other else exc))
        return True

    def fail(self, item: EmbedInput, error: StreamsError, outcome: str) -> None:
        if not item.future.done():
            item.future.set_exception(DispatchFailed(error, item.attempts, list(item.tried)))
            self.metrics.inputs.labels(outcome).inc()


def cancel(items: list[EmbedInput]) -> None:
    """Cancel each input's wait (a stop: its record is redelivered)."""
    for item in items:
        item.future.cancel()


def crash(items: list[EmbedInput], exc: Exception) -> None:
    """Fail each unanswered input with ``exc`` (a bug: an internal dead letter)."""
    for item in items:
        if not item.future.done():
            item.future.set_exception(exc)
