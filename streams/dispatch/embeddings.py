"""The embedding batcher: embedding requests of one model and parameters share one ``/embeddings`` call.

Each embedding request still goes its own way through the processor (cache, coalescing,
idempotency per input); only its dispatch lands here (``Dispatcher.dispatch`` hands it
over). Inputs wait in their group (model + parameters) in priority order (with the
scheduler's aging) until the group holds ``embeddings.max_batch_inputs`` inputs or
``max_batch_tokens`` estimated tokens (never more than one second of the smallest ``tpm``
among the model's endpoints), or its oldest input has waited ``max_wait_ms``: then the best
inputs form a batch, which takes one grant from the dispatcher's admission (one request
against ``rpm``, its total tokens against ``tpm``) while the next batch fills. Results are
matched back by ``index`` (``vectors.py``), and the call's usage is split across its inputs.

Failures, per batch: a retryable one is retried as a batch (backoff, another endpoint when
one is free, ``retry.max_attempts``); a 400/413/422 splits it in halves, each retried on its
own, so one bad input fails alone after at most 2 x log2(n) + 1 calls; split calls do not
count toward ``retry.max_attempts``. Other 4xx, a bad answer or exhaustion fail every input
of the batch. An input's ``attempts`` are the calls that included it.

Usage::

    batcher = EmbeddingBatcher(settings, client, dispatcher, admission, registry)
    completion = await batcher.embed(request)    # or raises DispatchFailed
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from prometheus_client import CollectorRegistry

from streams.config import EndpointConfig, Settings
from streams.contract import Completion, Params, Request, upstream_usage
from streams.dispatch.admission import Admission, Grant, Ticket, fits
from streams.dispatch.retry import error_class, is_retryable
from streams.dispatch.scheduler import Entry, Scheduler
from streams.dispatch.telemetry import EmbeddingMetrics
from streams.dispatch.vectors import read_vectors, split_usage
from streams.embedding import embedding_body, estimate_input_tokens
from streams.errors import (
    AttemptsExhausted,
    DeadlineExpired,
    DispatchFailed,
    NoEndpoint,
    StreamsError,
    UpstreamStatusError,
    ValidationFailed,
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
class _Input:
    req: Request
    tokens: int
    arrived: float  # clock seconds
    future: asyncio.Future[Completion]
    attempts: int = 0
    tried: list[str] = field(default_factory=list)
    entry: Entry[_Input] | None = None


@dataclass(eq=False, slots=True)
class _Group:
    """Inputs waiting for a batch: one model and one set of parameters."""

    model: str
    params: dict[str, Any]
    pending: Scheduler[_Input]
    fifo: deque[_Input] = field(default_factory=deque)  # arrival order, for the oldest
    tokens: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass(eq=False, slots=True)
class _Batch:
    model: str
    params: dict[str, Any]
    items: list[_Input]
    ticket: Ticket
    failures: int = 0  # retryable failures so far (split calls do not count)


class EmbeddingBatcher:
    """See the module docstring. One per dispatcher."""

    def __init__(self, settings: Settings, client: Any, attempts: Attempts,
                 admission: Admission, registry: CollectorRegistry) -> None:
        cfg = settings.embeddings
        self._max_inputs = cfg.max_batch_inputs
        self._max_tokens = cfg.max_batch_tokens
        self._max_wait = cfg.max_wait_ms / 1000.0
        self._max_attempts = settings.retry.max_attempts
        self._aging_ms = settings.limits.priority_aging_ms
        self._default_model = settings.worker.default_model
        self._client: EmbedClient = client
        self._d = attempts
        self._admission = admission
        self.metrics = EmbeddingMetrics(registry)
        self._groups: dict[tuple[str, bytes], _Group] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- the API -------------------------------------------------------------------------------

    async def embed(self, req: Request) -> Completion:
        """The vector of ``req.input``, computed in a batch; raises ``DispatchFailed``."""
        model = req.model or self._default_model
        parts = self._d.parts
        candidates = parts.balancer.candidates(model)
        if not candidates:
            self.metrics.inputs.labels("no_endpoint").inc()
            raise DispatchFailed(NoEndpoint(f"no endpoint serves model {model!r}"), 0, [])
        tokens = estimate_input_tokens(req.input or "")
        if not any(fits(ep, tokens) for ep in candidates):
            self.metrics.inputs.labels("too_large").inc()
            largest = max(ep.tpm or 0 for ep in candidates)
            raise DispatchFailed(ValidationFailed(
                f"input of ~{tokens} tokens is too large for any endpoint (largest tpm {largest})"
            ), 0, [])
        params = dict(req.params)
        key = (model, orjson.dumps(params, option=orjson.OPT_SORT_KEYS))
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(model, params, Scheduler(self._aging_ms))
        now = parts.clock()
        item = _Input(req, tokens, now, asyncio.get_running_loop().create_future())
        item.entry = group.pending.add(item, req.priority, now * 1000.0)
        group.fifo.append(item)
        group.tokens += tokens
        group.arrived.set()
        if group.task is None:
            group.task = self._spawn(self._collect(key, group))
        try:
            return await item.future
        finally:
            if item.entry.live:  # cancelled while waiting for its batch
                group.pending.discard(item.entry)
                group.tokens -= tokens

    def stop(self) -> None:
        """Cancel what waits for a batch or a grant (redelivered later); calls under way finish."""
        for group in self._groups.values():
            for item in group.pending.drain():
                item.future.cancel()
            group.tokens = 0
            if group.task is not None:
                group.task.cancel()

    # ---- forming batches -------------------------------------------------------------------

    async def _collect(self, key: tuple[str, bytes], group: _Group) -> None:
        """Form the group's batches while it has inputs; each takes its grant in turn."""
        try:
            while len(group.pending):
                await self._fill(group)
                items = self._take(group)
                if not items:
                    continue
                ticket = Ticket(group.model, min(i.req.priority for i in items),
                                min(i.arrived for i in items), sum(i.tokens for i in items))
                batch = _Batch(group.model, group.params, items, ticket)
                try:
                    grant = await self._grant(ticket)
                except asyncio.CancelledError:
                    self._cancel(items)
                    raise
                except Exception as exc:
                    self._crash(items, exc)
                    raise
                self._spawn(self._send(batch, grant))
        except Exception as exc:  # a bug: every waiting input gets it (an internal dead letter)
            log.exception("embedding batches of %s failed", group.model)
            self._crash(group.pending.drain(), exc)
        finally:
            group.task = None
            if not len(group.pending) and self._groups.get(key) is group:
                del self._groups[key]

    def _cap(self, model: str) -> int:
        """Most estimated tokens in one batch: the config's, and one second of the smallest tpm.

        Not kept per model: model names come from requests (the balancer's sets are bounded)."""
        tpms = [ep.tpm for ep in self._d.parts.balancer.candidates(model)
                if ep.tpm is not None and ep.weight > 0]
        return min([self._max_tokens, *(max(t // 60, 1) for t in tpms)])

    async def _fill(self, group: _Group) -> None:
        """Wait until the group holds a full batch or its oldest input has waited max_wait."""
        cap = self._cap(group.model)
        clock = self._d.parts.clock
        while len(group.pending) < self._max_inputs and group.tokens < cap:
            fifo = group.fifo
            while fifo and (fifo[0].entry is None or not fifo[0].entry.live):
                fifo.popleft()
            if not fifo:
                return
            wait = fifo[0].arrived + self._max_wait - clock()
            if wait <= 0:
                return
            group.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(group.arrived.wait(), wait)

    def _take(self, group: _Group) -> list[_Input]:
        """The best waiting inputs (priority, then arrival) up to the batch limits."""
        cap = self._cap(group.model)
        now = self._d.parts.clock()
        items: list[_Input] = []
        tokens = 0
        cursor = group.pending.begin_pass()
        try:
            while len(items) < self._max_inputs and (entry := cursor.next()) is not None:
                item = entry.item
                if items and tokens + item.tokens > cap:
                    cursor.skip(entry)
                    break
                cursor.take(entry)
                group.tokens -= item.tokens
                if item.future.done():
                    continue
                deadline = item.req.deadline
                if deadline is not None and now * 1000.0 >= deadline:
                    self._fail(item, DeadlineExpired(f"deadline {deadline} passed before "
                                                     f"attempt {item.attempts + 1}"), "expired")
                    continue
                items.append(item)
                tokens += item.tokens
                self.metrics.batch_wait.observe(max(now - item.arrived, 0.0))
        finally:
            cursor.end()
        return items

    async def _grant(self, ticket: Ticket) -> Grant:
        while True:
            grant = await self._admission.acquire(ticket, None)
            if grant is None:  # only with a deadline, which batches do not have
                continue
            if grant.at and not await self._d.until_slot(grant, ticket):
                continue  # cooling down since, or woke too late for the slot: ask again
            return grant

    # ---- calling ---------------------------------------------------------------------------

    async def _send(self, batch: _Batch, grant: Grant | None) -> None:
        """Call until every input of the batch has its vector or its error."""
        try:
            while True:
                if grant is None:
                    grant = await self._grant(batch.ticket)
                batch.items = [i for i in batch.items if not i.future.done()]
                if not batch.items:
                    self._admission.release(grant, None)
                    return
                again = await self._call(batch, grant)
                if not again:
                    return
                grant = None
        except asyncio.CancelledError:
            self._cancel(batch.items)
            raise
        except Exception as exc:  # a bug: each input gets it (an internal dead letter)
            log.exception("embedding batch of %d inputs failed", len(batch.items))
            self._crash(batch.items, exc)

    async def _call(self, batch: _Batch, grant: Grant) -> bool:
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

    async def _failed(self, batch: _Batch, name: str, exc: StreamsError) -> bool:
        items = batch.items
        if (len(items) > 1 and isinstance(exc, UpstreamStatusError)
                and exc.status in SPLIT_STATUSES):
            self.metrics.calls.labels(name, "split").inc()
            half = len(items) // 2
            for part in (items[:half], items[half:]):
                t = batch.ticket
                ticket = Ticket(t.model, t.priority, t.enqueued, sum(i.tokens for i in part),
                                tried=list(t.tried))
                self._spawn(self._send(_Batch(batch.model, batch.params, part, ticket,
                                              batch.failures), None))
            return False
        if not is_retryable(exc):
            self.metrics.calls.labels(name, "failed").inc()
            for item in items:
                self._fail(item, exc, "upstream")
            return False
        batch.failures += 1
        if batch.failures >= self._max_attempts:
            self.metrics.calls.labels(name, "failed").inc()
            tried = ", ".join(batch.ticket.tried)
            for item in items:
                self._fail(item, AttemptsExhausted(
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

    # ---- helpers ---------------------------------------------------------------------------

    def _fail(self, item: _Input, error: StreamsError, outcome: str) -> None:
        if not item.future.done():
            item.future.set_exception(DispatchFailed(error, item.attempts, list(item.tried)))
            self.metrics.inputs.labels(outcome).inc()

    @staticmethod
    def _cancel(items: list[_Input]) -> None:
        for item in items:
            item.future.cancel()

    @staticmethod
    def _crash(items: list[_Input], exc: Exception) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(exc)

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


__all__ = ["EmbeddingBatcher", "SPLIT_STATUSES"]
