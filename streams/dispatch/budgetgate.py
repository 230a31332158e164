"""Waiting for a tenant's budget: one line per tenant, best first, the head alone asks Redis.

A request of a tenant with budgets holds a reservation (``budgets.py``) before it asks for
an endpoint. Refused with ``on_exhausted: wait``, it joins its tenant's line (priority, then
arrival: offset order within a partition) without holding any in-flight slot; the head of
the line asks again when the refusing window ends, when a refund of this worker may have made
room, and at least every ``POLL_SECONDS`` (other workers' refunds are not heard). Refused
with ``reject``, or when the estimate alone exceeds a whole window: ``BudgetExceeded``.

Usage::

    hold = gate.hold(req.tenant, model, messages, params, req.priority)  # None: no budgets
    if hold is not None and not await gate.reserve(hold, req.deadline):
        ...  # the deadline came first
    ...   # the call
    gate.settle(hold, body, endpoint)   # or gate.release(hold) when the call failed
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from streams.config import Settings
from streams.config_tenants import tenant_config, tenant_name
from streams.contract import ChatMessages, Params, upstream_usage
from streams.dispatch.budgets import Budgets, Refusal, Reservation
from streams.dispatch.pump import wait_event
from streams.dispatch.tenantmetrics import BudgetMetrics
from streams.dispatch.tokens import estimate_parts
from streams.errors import BudgetExceeded
from streams.pricing import Pricing

POLL_SECONDS = 1.0


@dataclass(eq=False, slots=True)
class Hold:
    """One request's claim on its tenant's budgets, kept across its retries."""

    tenant: str
    model: str
    tokens: int
    cost: float
    priority: int
    enqueued: float
    policy: str
    res: Reservation | None = None


@dataclass(eq=False, slots=True)
class _Waiter:
    key: tuple[int, float, int]
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    live: bool = True

    def __lt__(self, other: _Waiter) -> bool:
        return self.key < other.key


class BudgetGate:
    """See the module docstring."""

    def __init__(self, settings: Settings, budgets: Budgets, *,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 metrics: BudgetMetrics | None = None) -> None:
        self._tenants = settings.tenants
        self._budgets = budgets
        self._pricing = Pricing(settings.pricing)
        self._clock = clock
        self._sleep = sleep
        self._metrics = metrics
        self._lines: dict[str, list[_Waiter]] = {}
        self._seq = itertools.count()
        budgets.on_refund = self._wake_head
        if metrics is not None:
            self.use_metrics(metrics)

    def use_metrics(self, metrics: BudgetMetrics) -> None:
        """Report budgets remaining and requests waiting on ``metrics``."""
        self._metrics = metrics
        self._budgets.on_change = metrics.seen

    def hold(self, tenant: str | None, model: str, messages: ChatMessages, params: Params,
             priority: int) -> Hold | None:
        """The request's claim, or None when its tenant has no budgets (nothing to do)."""
        return self.hold_tokens(tenant, model, priority, lambda: estimate_parts(messages, params))

    def hold_tokens(self, tenant: str | None, model: str, priority: int,
                    estimate: Callable[[], tuple[int, int]]) -> Hold | None:
        """``hold`` from estimated (prompt, completion) tokens, estimated only for a tenant with
        budgets (an embedding input: its own estimate, no completion)."""
        name = tenant_name(tenant)
        cfg = tenant_config(self._tenants, name)
        if not cfg.budgets:
            return None
        prompt, completion = estimate()
        cost = self._pricing.estimate(model, prompt, completion)
        return Hold(name, model, prompt + completion, cost, priority, self._clock(),
                    cfg.on_exhausted)

    async def reserve(self, hold: Hold, deadline: int | None) -> bool:
        """Until ``hold`` covers a call starting now: True, or False if the deadline came
        first. Raises ``BudgetExceeded`` (reject, or it could never fit)."""
        if hold.res is not None:
            if self._budgets.valid_at(hold.res, self._clock()):
                return True
            self.release(hold)  # the wait carried the call into another window
        if not self._lines.get(hold.tenant):  # nobody waiting: nobody to overtake
            got = await self._budgets.try_reserve(hold.tenant, hold.tokens, hold.cost)
            if isinstance(got, Reservation):
                hold.res = got
                return True
            self._refused(hold, got)
        return await self._wait(hold, deadline)

    def covers(self, hold: Hold) -> bool:
        """Does the hold's reservation still cover a call starting now?"""
        return hold.res is not None and self._budgets.valid_at(hold.res, self._clock())

    def settle(self, hold: Hold, body: dict[str, Any], endpoint: str) -> None:
        """Correct the charge with the answer's usage (the estimate stands when unknown)."""
        res = hold.res
        if res is None:
            return
        usage = upstream_usage(body)
        if usage is None:
            self._budgets.settle(res, hold.tokens, hold.cost)
            return
        tokens = usage["total_tokens"] or usage["prompt_tokens"] + usage["completion_tokens"]
        cost = self._pricing.price(hold.model, endpoint, body.get("usage"))
        self._budgets.settle(res, tokens, hold.cost if cost is None else cost.total)

    def release(self, hold: Hold) -> None:
        """Give the whole reservation back (the call failed or never happened)."""
        if hold.res is not None:
            self._budgets.settle(hold.res, 0, 0.0)
            hold.res = None

    # ---- the line --------------------------------------------------------------------------

    def _refused(self, hold: Hold, got: Refusal) -> None:
        if got.never:
            raise BudgetExceeded(f"tenant {hold.tenant!r}: {got.reason}; it could never run",
                                 never=True)
        if hold.policy == "reject":
            raise BudgetExceeded(f"tenant {hold.tenant!r}: {got.reason}")

    def _head(self, tenant: str) -> _Waiter | None:
        line = self._lines.get(tenant)
        while line and not line[0].live:
            heapq.heappop(line)
        return line[0] if line else None

    def _wake_head(self, tenant: str) -> None:
        head = self._head(tenant)
        if head is not None:
            head.wake.set()

    async def _wait(self, hold: Hold, deadline: int | None) -> bool:
        waiter = _Waiter((hold.priority, hold.enqueued, next(self._seq)))
        heapq.heappush(self._lines.setdefault(hold.tenant, []), waiter)
        gauge = None if self._metrics is None else self._metrics.waiting.labels(
            self._metrics.label(hold.tenant))
        if gauge is not None:
            gauge.inc()
        try:
            while True:
                delay: float | None = None
                if self._head(hold.tenant) is waiter:
                    got = await self._budgets.try_reserve(hold.tenant, hold.tokens, hold.cost)
                    if isinstance(got, Reservation):
                        hold.res = got
                        return True
                    self._refused(hold, got)
                    delay = min(max(got.wait, 0.001), POLL_SECONDS)
                if deadline is not None:
                    remaining = deadline / 1000.0 - self._clock()
                    if remaining <= 0:
                        return False
                    delay = remaining if delay is None else min(delay, remaining)
                waiter.wake.clear()
                await wait_event(waiter.wake, delay, self._sleep)
        finally:
            waiter.live = False
            if gauge is not None:
                gauge.dec()
            if self._head(hold.tenant) is None:
                self._lines.pop(hold.tenant, None)
            else:
                self._wake_head(hold.tenant)
