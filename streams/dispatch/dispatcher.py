"""The dispatcher: one request's way to an answer: admission, the attempt, retries, deadlines.

One ``dispatch()`` call per request (each its own asyncio task; thousands may run at once):

1. Get a grant (``admission.py``): an endpoint serving the model, picked by weight
   (``balancer.py``) among those usable now: not cooling down (``cooldown.py``), not
   saturated (``ratelimit.py``), and for a retry not already tried if another healthy
   endpoint exists. If none is usable the request waits in the priority scheduler
   (``fairqueue.py``: priority levels with aging, fair share between tenants).
2. Call the endpoint (``client.complete``, through ``calls.py``: the wait for a reserved
   slot, the call's metrics, the endpoint's health verdict); on a retryable failure back off
   (``retry.py``) and go to 1; on a terminal one, or when ``retry.max_attempts`` attempts
   are spent, or the request's deadline has passed, raise ``DispatchFailed``.

The parts (balancer, limiter, cooldowns, backoff, scheduler, clock) are passed in
(``parts.py`` builds the defaults).

Usage::

    async with build_dispatcher(settings, UpstreamClient(session), redis, registry) as dispatcher:
        completion = await dispatcher.dispatch(request)   # or raises DispatchFailed
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry

from streams.config import EndpointConfig, Settings
from streams.config_tenants import tenant_name
from streams.contract import ChatMessages, Completion, Params, Request
from streams.dispatch.admission import Admission, Grant, Ticket, fits
from streams.dispatch.budgetgate import Hold
from streams.dispatch.calls import Caller
from streams.dispatch.claim import check_claim
from streams.dispatch.embeddings import EmbeddingBatcher
from streams.dispatch.retry import error_class, is_retryable
from streams.dispatch.telemetry import DispatchMetrics, DispatchSnapshot, StateCollector
from streams.dispatch.tenantmetrics import BudgetMetrics, TenantQueueCollector
from streams.dispatch.tokens import estimate_tokens
from streams.errors import (
    AttemptsExhausted,
    BudgetExceeded,
    DeadlineExpired,
    DispatcherStopped,
    DispatchFailed,
    NoEndpoint,
    StreamsError,
    ValidationFailed,
)
from streams.logs import request_extra
from streams.tenancy import TenantLabels

if TYPE_CHECKING:
    from streams.dispatch.parts import DispatchParts

log = logging.getLogger("streams.dispatcher")

# How often cooldown state is exchanged with the other workers through Redis.
SYNC_INTERVAL_SECONDS = 0.25


class CompletionClient(Protocol):
    """What the dispatcher calls: one attempt, no retries (see ``upstream.UpstreamClient``)."""

    async def complete(self, endpoint: EndpointConfig, model: str, messages: ChatMessages,
                       params: Params) -> dict[str, Any]: ...


def _too_large(candidates: list[EndpointConfig], tokens: int) -> ValidationFailed | None:
    """A request larger than every endpoint's whole ``tpm`` could never be served, and
    charging it would push the shared schedule minutes ahead for everyone."""
    if any(fits(ep, tokens) for ep in candidates):
        return None
    largest = max(ep.tpm or 0 for ep in candidates)
    return ValidationFailed(
        f"request of ~{tokens} tokens (prompt + n x max_tokens) is too large for any "
        f"endpoint (largest tpm {largest})"
    )


class Dispatcher:
    """Routes requests to endpoints within limits, with retries and cooldowns.

    ``parts.clock`` returns epoch seconds (deadlines are epoch ms); ``parts.sleep`` and the
    backoff's random are injectable so tests run on virtual time.
    """

    def __init__(
        self,
        settings: Settings,
        client: CompletionClient,
        parts: DispatchParts,
        registry: CollectorRegistry,
    ) -> None:
        self._settings = settings
        self._client = client
        self.parts = parts
        self._clock = parts.clock
        self._sleep = parts.sleep
        self._cooldowns = parts.cooldowns
        self._max_attempts = settings.retry.max_attempts
        self._default_model = settings.worker.default_model
        self._metrics = DispatchMetrics(registry, settings.endpoints)
        self._admission = Admission(settings, parts, self._metrics)
        self._caller = Caller(self._admission, parts, self._metrics)
        self.embeddings = EmbeddingBatcher(settings, client, self, self._admission, registry)
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False
        registry.register(StateCollector(self.snapshot))
        labels = TenantLabels(settings.tenants)
        registry.register(TenantQueueCollector(parts.scheduler.tenant_depth, labels))
        budget_metrics = BudgetMetrics(registry, labels)  # exported with or without budgets
        if parts.budgets is not None:
            parts.budgets.use_metrics(budget_metrics)

    # ---- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Dispatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the background tasks (the pump; the cooldown sync when Redis is given)."""
        self._ensure_started()

    async def stop(self) -> None:
        """Stop background tasks; ``dispatch()`` calls still waiting raise CancelledError.

        In-flight attempts are not interrupted: callers wait for those (shutdown grace).
        """
        self._closed = True
        self.embeddings.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        # Cancelled, not failed: the record is then neither answered nor dead-lettered,
        # so it is redelivered after a restart.
        self._admission.cancel_waiting()
        if self._cooldowns.shared:
            await self._cooldowns.sync()  # leave our latest verdicts for the others
        await self.parts.limiter.aclose()

    def snapshot(self) -> DispatchSnapshot:
        """What this dispatcher is doing now: queue depth, attempts in flight, endpoint states."""
        now = self._clock()
        return DispatchSnapshot(
            depth=self.parts.scheduler.depth(),
            inflight=dict(self._admission.inflight),
            states={ep.name: self._cooldowns.state(ep.name, now) for ep in self._settings.endpoints},
            limits_degraded=self.parts.limiter.degraded,
            waiting=len(self.parts.scheduler),
        )

    # ---- the main API ------------------------------------------------------------------------

    async def dispatch(self, req: Request) -> Completion:
        """Answer ``req`` from an endpoint, or raise ``DispatchFailed`` (see module doc)."""
        if self._closed:
            raise DispatcherStopped("dispatcher stopped")
        self._ensure_started()
        if req.kind == "embedding":  # batched with others into one call (embeddings.py)
            return await self.embeddings.embed(req)
        model = req.model or self._default_model
        if not self.parts.balancer.candidates(model):
            self._metrics.outcome["no_endpoint"].inc()
            raise DispatchFailed(NoEndpoint(f"no endpoint serves model {model!r}"), 0, [])
        messages = req.chat_messages()
        ticket = Ticket(model, req.priority, self._clock(), estimate_tokens(messages, req.params),
                        tenant=tenant_name(req.tenant))
        if (too_large := _too_large(self.parts.balancer.candidates(model), ticket.tokens)) is not None:
            self._metrics.outcome["too_large"].inc()
            raise DispatchFailed(too_large, 0, [])
        gate = self.parts.budgets
        hold = None if gate is None else gate.hold(req.tenant, model, messages, req.params,
                                                   req.priority)
        try:
            return await self._attempts(req, model, messages, ticket, hold)
        finally:
            if gate is not None and hold is not None:
                gate.release(hold)  # nothing once settled: a failed call gives it all back

    async def _attempts(self, req: Request, model: str, messages: ChatMessages, ticket: Ticket,
                        hold: Hold | None) -> Completion:
        attempts = 0
        gate = self.parts.budgets
        while True:
            self._check_deadline(req.deadline, attempts, ticket.tried)
            if hold is not None and not await self._reserve(hold, req.deadline, attempts, ticket):
                continue  # the deadline came while waiting for the budget
            grant = await self._admission.acquire(ticket, req.deadline)
            if grant is None:  # the deadline came while waiting
                self._check_deadline(req.deadline, attempts, ticket.tried)
                continue
            try:  # the last look (the lock may have gone while we waited), before the slot:
                await check_claim()  # a slow answer (a Redis failover) then delays the wait
            except BaseException:    # for the slot, never the send after it
                self._admission.release(grant, None)
                raise
            if grant.at and not await self._caller.until_slot(grant, ticket):
                continue  # cooling down since, or woke too late for the slot: ask again
            if self._expired(req.deadline):
                self._admission.release(grant, None)
                self._check_deadline(req.deadline, attempts, ticket.tried)
            if gate is not None and hold is not None and not gate.covers(hold):
                self._admission.release(grant, None)  # the wait crossed a budget window
                continue
            attempts += 1
            ticket.tried.append(grant.endpoint.name)
            try:
                body = await self._caller.call(
                    grant, self._client.complete(grant.endpoint, model, messages, req.params))
            except StreamsError as exc:
                if not is_retryable(exc):
                    self._metrics.outcome["upstream"].inc()
                    raise DispatchFailed(exc, attempts, list(ticket.tried)) from exc
                if attempts >= self._max_attempts:
                    self._metrics.outcome["exhausted"].inc()
                    tried = ", ".join(ticket.tried)
                    error = AttemptsExhausted(
                        f"gave up after {attempts} attempts ({tried}); last error: {exc}", exc
                    )
                    raise DispatchFailed(error, attempts, list(ticket.tried)) from exc
                self._metrics.retries.labels(grant.endpoint.name, error_class(exc)).inc()
                # Retry-After binds the endpoint that sent it (its cooldown enforces it); when
                # another endpoint can serve the retry, jittered backoff is enough.
                other = self._other_usable(model, grant.endpoint.name)
                delay = self.parts.backoff.delay(attempts, None if other else exc)
                log.debug("attempt %d on %s failed (%s); retrying in %.2f s", attempts,
                          grant.endpoint.name, exc, delay, extra=request_extra(req.id))
                await self._backoff_sleep(delay, req.deadline)
                continue
            self._metrics.outcome["ok"].inc()
            if gate is not None and hold is not None:
                gate.settle(hold, body, grant.endpoint.name)
            return Completion(
                model=model,
                body=body,
                endpoint=grant.endpoint.name,
                attempts=attempts,
                endpoints=list(ticket.tried),
            )

    async def _reserve(self, hold: Hold, deadline: int | None, attempts: int, ticket: Ticket
                       ) -> bool:
        """The tenant's budget for the next attempt (``budgetgate.py``); False: deadline."""
        assert self.parts.budgets is not None
        try:
            return await self.parts.budgets.reserve(hold, deadline)
        except BudgetExceeded as exc:
            self._metrics.outcome["budget"].inc()
            raise DispatchFailed(exc, attempts, list(ticket.tried)) from exc

    async def until_slot(self, grant: Grant, ticket: Ticket) -> bool:
        """``Caller.until_slot`` (``calls.py``), for the embedding batcher."""
        return await self._caller.until_slot(grant, ticket)

    async def attempt_call(self, grant: Grant, call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        """``Caller.call`` (``calls.py``), for the embedding batcher."""
        return await self._caller.call(grant, call)

    def other_usable(self, model: str, failed: str) -> bool:
        """Could another endpoint serving ``model`` take a retry now?"""
        return self._other_usable(model, failed)

    def _other_usable(self, model: str, failed: str) -> bool:
        return any(
            ep.name != failed and ep.weight > 0 and self._cooldowns.usable(ep.name)
            for ep in self.parts.balancer.candidates(model)
        )

    # ---- deadlines ---------------------------------------------------------------------------

    def _expired(self, deadline: int | None) -> bool:
        return deadline is not None and self._clock() * 1000.0 >= deadline

    def _check_deadline(self, deadline: int | None, attempts: int, tried: list[str]) -> None:
        if self._expired(deadline):
            self._metrics.outcome["expired"].inc()
            error = DeadlineExpired(f"deadline {deadline} passed before attempt {attempts + 1}")
            raise DispatchFailed(error, attempts, list(tried))

    async def _backoff_sleep(self, delay: float, deadline: int | None) -> None:
        if deadline is not None:  # no point sleeping past the deadline
            delay = min(delay, max(deadline / 1000.0 - self._clock(), 0.0))
        if delay > 0:
            await self._sleep(delay)

    # ---- one attempt -------------------------------------------------------------------------

    # ---- background ----------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._started:
            return
        self._started = True
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._admission.pump(), name="dispatcher-pump"))
        if self._cooldowns.shared:
            self._tasks.append(loop.create_task(self._sync_loop(), name="dispatcher-sync"))

    async def _sync_loop(self) -> None:
        while True:
            try:
                if await self._cooldowns.sync():
                    self._admission.wake()
            except Exception:
                log.exception("cooldown sync failed")
            await self._sleep(SYNC_INTERVAL_SECONDS)


__all__ = ["CompletionClient", "Dispatcher"]
