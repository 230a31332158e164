"""The dispatcher's parts, passed into its constructor, and the factory that builds the defaults.

Usage::

    dispatcher = build_dispatcher(settings, UpstreamClient(session), redis, registry)
    # or, with parts of one's own (tests):
    parts = default_parts(settings, redis, clock=clock, sleep=sleep)
    dispatcher = Dispatcher(settings, client, parts, registry)
"""

from __future__ import annotations

import asyncio
import random as _random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from streams.config import Settings
from streams.config_tenants import tenant_config
from streams.dispatch.admission import Ticket
from streams.dispatch.balancer import Balancer
from streams.dispatch.budgetgate import BudgetGate
from streams.dispatch.budgets import Budgets
from streams.dispatch.cooldown import Cooldowns
from streams.dispatch.dispatcher import CompletionClient, Dispatcher
from streams.dispatch.fairqueue import FairQueue
from streams.dispatch.ratelimit import RateLimiter
from streams.dispatch.retry import Backoff


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchParts:
    """Which endpoint (balancer), within which limits (limiter, cooldowns), in which order
    (scheduler), how long between attempts (backoff), on which clock (epoch seconds)."""

    balancer: Balancer
    limiter: RateLimiter
    cooldowns: Cooldowns
    backoff: Backoff
    scheduler: FairQueue[Ticket]
    clock: Callable[[], float]
    sleep: Callable[[float], Awaitable[Any]]
    budgets: BudgetGate | None = None  # None: no tenant has budgets


def default_parts(
    settings: Settings,
    redis: Any | None,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    random: Callable[[], float] = _random.random,
) -> DispatchParts:
    """The parts from settings; ``redis`` (or None: this worker alone) shares limits and cooldowns."""
    return DispatchParts(
        balancer=Balancer(settings.endpoints),
        limiter=RateLimiter(settings, redis, clock=clock),
        cooldowns=Cooldowns(
            settings.endpoints,
            settings.retry,
            redis,
            key_prefix=settings.redis.key_prefix,
            clock=clock,
            op_timeout=settings.redis.socket_timeout_seconds,
        ),
        backoff=Backoff(settings.retry, random),
        scheduler=FairQueue(settings.limits.priority_aging_ms,
                            lambda tenant: tenant_config(settings.tenants, tenant).weight),
        clock=clock,
        sleep=sleep,
        budgets=BudgetGate(settings, Budgets(settings, redis, clock=clock), clock=clock,
                           sleep=sleep) if any(t.budgets for t in settings.tenants.values()) else None,
    )


def build_dispatcher(
    settings: Settings,
    client: CompletionClient,
    redis: Any | None,
    registry: CollectorRegistry,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    random: Callable[[], float] = _random.random,
) -> Dispatcher:
    """A dispatcher with the default parts (``default_parts``)."""
    parts = default_parts(settings, redis, clock=clock, sleep=sleep, random=random)
    return Dispatcher(settings, client, parts, registry)
