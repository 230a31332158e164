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

Failures are handled per batch (retried, split in halves, failed) by ``BatchCalls``
(``embedcalls.py``).

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
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from streams.config import Settings
from streams.contract import Completion, Request
from streams.dispatch.admission import Admission, Ticket, fits
from streams.dispatch.embedcalls import (
    SPLIT_STATUSES,
    Attempts,
    BatchCalls,
    EmbedBatch,
    EmbedInput,
    cancel,
    crash,
)
from streams.dispatch.scheduler import Scheduler
from streams.dispatch.telemetry import EmbeddingMetrics
from streams.embedding import estimate_input_tokens
from streams.errors import (
    BudgetExceeded,
    DeadlineExpired,
    DispatchFailed,
    NoEndpoint,
    ValidationFailed,
)

log = logging.getLogger("streams.embeddings")


@dataclass(eq=False, slots=True)
class _Group:
    """Inputs waiting for a batch: one model and one set of parameters."""

    model: str
    params: dict[str, Any]
    pending: Scheduler[EmbedInput]
    fifo: deque[EmbedInput] = field(default_factory=deque)  # arrival order, for the oldest
    tokens: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class EmbeddingBatcher:
    """See the module docstring. One per dispatcher."""

    def __init__(self, settings: Settings, client: Any, attempts: Attempts,
                 admission: Admission, registry: CollectorRegistry) -> None:
        cfg = settings.embeddings
        self._max_inputs = cfg.max_batch_inputs
        self._max_tokens = cfg.max_batch_tokens
        self._max_wait = cfg.max_wait_ms / 1000.0
        self._aging_ms = settings.limits.priority_aging_ms
        self._default_model = settings.worker.default_model
        self._d = attempts
        self.metrics = EmbeddingMetrics(registry)
        self._groups: dict[tuple[str, bytes], _Group] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._calls = BatchCalls(client, attempts, admission, self.metrics,
                                 settings.retry.max_attempts, self._spawn)

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
        gate = parts.budgets  # the tenant's budgets, reserved as for a chat call
        hold = None if gate is None else gate.hold_tokens(req.tenant, model, req.priority,
                                                          lambda: (tokens, 0))
        if gate is None or hold is None:
            return await self._batched(req, model, tokens)
        try:
            if not await gate.reserve(hold, req.deadline):
                self.metrics.inputs.labels("expired").inc()
                raise DispatchFailed(DeadlineExpired(
                    f"deadline {req.deadline} passed while waiting for the tenant's budget"), 0, [])
        except BudgetExceeded as exc:
            self.metrics.inputs.labels("budget").inc()
            raise DispatchFailed(exc, 0, []) from exc
        try:
            comp = await self._batched(req, model, tokens)
        except BaseException:
            gate.release(hold)
            raise
        gate.settle(hold, comp.body, comp.endpoint or "")
        return comp

    async def _batched(self, req: Request, model: str, tokens: int) -> Completion:
        parts = self._d.parts
        params = dict(req.params)
        key = (model, orjson.dumps(params, option=orjson.OPT_SORT_KEYS))
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(model, params, Scheduler(self._aging_ms))
        now = parts.clock()
        item = EmbedInput(req, tokens, now, asyncio.get_running_loop().create_future())
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
                batch = EmbedBatch(group.model, group.params, items, ticket)
                try:
                    grant = await self._calls.grant(ticket)
                except asyncio.CancelledError:
                    cancel(items)
                    raise
                except Exception as exc:
                    crash(items, exc)
                    raise
                self._spawn(self._calls.send(batch, grant))
        except Exception as exc:  # a bug: every waiting input gets it (an internal dead letter)
            log.exception("embedding batches of %s failed", group.model)
            crash(group.pending.drain(), exc)
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

    def _take(self, group: _Group) -> list[EmbedInput]:
        """The best waiting inputs (priority, then arrival) up to the batch limits."""
        cap = self._cap(group.model)
        now = self._d.parts.clock()
        items: list[EmbedInput] = []
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
                    self._calls.fail(item, DeadlineExpired(f"deadline {deadline} passed before "
                                                           f"attempt {item.attempts + 1}"), "expired")
                    continue
                items.append(item)
                tokens += item.tokens
                self.metrics.batch_wait.observe(max(now - item.arrived, 0.0))
        finally:
            cursor.end()
        return items

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


__all__ = ["EmbeddingBatcher", "SPLIT_STATUSES"]
