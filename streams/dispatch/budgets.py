"""Tenant budgets: tokens and cost per calendar window (UTC), reserved before the call.

A reservation charges the request's estimate (prompt ~chars/4 + ``max_tokens``, and its price)
against every budget window of its tenant in one atomic Lua script: all or nothing, so
concurrent requests on any number of workers never overshoot. After the call the charge is
corrected with the real usage (refund or extra charge); a failed call gives it all back.

Windows are calendar-aligned in UTC (minute, hour, day, month) and a counter's key names its
window's start, so a window resets on time without any job. A request reserved within
``GUARD_SECONDS`` of a window's end is charged to the next window too (its call may well land
there), and ``valid_at`` tells the dispatcher when a wait (rate limit, retry) carried the call
into a window the reservation does not cover: it is then reserved again.

Every key of a tenant shares its Redis Cluster hash tag ``{t:<hash>}`` (``tenancy.py``). Redis
down: each worker keeps local windows at ``limits.local_fallback_fraction`` of each budget.

Usage::

    budgets = Budgets(settings, redis, clock=time.time)
    got = await budgets.try_reserve("team-a", tokens=900, cost=0.0004)  # Reservation | Refusal
    budgets.settle(got, tokens=640, cost=0.00031)                        # after the call
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from streams.config import Settings
from streams.config_tenants import BudgetConfig, tenant_config
from streams.dispatch.gcra import run_script
from streams.redis_guard import REDIS_ERRORS, CommandErrorLog, RedisGuard
from streams.tenancy import tenant_slot

log = logging.getLogger("streams.budgets")

GUARD_SECONDS = 0.5
NANO = 1_000_000_000  # cost is counted in 1e-9 of the currency (integers in Redis)
_FIXED = {"minute": 60, "hour": 3600, "day": 86_400}
_KEY_SLACK_MS = 3_600_000  # a counter outlives its window by this much (late corrections)

# KEYS: counters; ARGV: (limit, amount, ttl_ms) per key. All or nothing.
# Returns {0, used...} when charged, or {i, used} for the first counter without room.
RESERVE_LUA = """
local used = {}
for i = 1, #KEYS do
  local cur = tonumber(redis.call('GET', KEYS[i]) or '0')
  local amount = tonumber(ARGV[3 * i - 1])
  if cur + amount > tonumber(ARGV[3 * i - 2]) then
    return {i, cur}
  end
  used[i] = cur + amount
end
for i = 1, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[3 * i - 1])
  redis.call('PEXPIRE', KEYS[i], ARGV[3 * i])
end
table.insert(used, 1, 0)
return used
"""

# KEYS: counters; ARGV: one delta per key. A counter that expired is left alone; none goes
# below zero.
ADJUST_LUA = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local v = redis.call('INCRBY', KEYS[i], ARGV[i])
    if v < 0 then redis.call('INCRBY', KEYS[i], -v) end
  end
end
return 1
"""


def window_span(window: str, t: float) -> tuple[float, float]:
    """The UTC calendar window of kind ``window`` holding epoch time ``t``: (start, end)."""
    size = _FIXED.get(window)
    if size is not None:
        start = math.floor(t / size) * size
        return float(start), float(start + size)
    when = datetime.fromtimestamp(t, UTC)
    first = datetime(when.year, when.month, 1, tzinfo=UTC)
    nxt = datetime(when.year + when.month // 12, when.month % 12 + 1, 1, tzinfo=UTC)
    return float(calendar.timegm(first.timetuple())), float(calendar.timegm(nxt.timetuple()))


@dataclass(slots=True)
class Charge:
    """One counter charged by a reservation: a budget's window and measure."""

    key: str
    window: str
    kind: str  # "tokens" or "cost"
    start: float
    end: float
    limit: int  # units: tokens, or 1e-9 of the currency
    amount: int


@dataclass(slots=True)
class Reservation:
    tenant: str
    charges: list[Charge]
    shared: bool
    settled: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    """No room now. ``wait``: seconds until the refusing window ends; ``never``: the
    estimate alone exceeds a whole window's budget (it could never run)."""

    wait: float
    reason: str
    never: bool = False


@dataclass(slots=True)
class _Local:
    used: dict[str, int] = field(default_factory=dict)
    ends: dict[str, float] = field(default_factory=dict)


class Budgets:
    """The budget counters (Redis, or local windows while Redis is down)."""

    def __init__(self, settings: Settings, redis: Any | None, *,
                 clock: Callable[[], float] = time.time,
                 on_change: Callable[[Reservation, Sequence[int]], None] | None = None) -> None:
        self._tenants = settings.tenants
        self._redis = redis
        self._clock = clock
        self._prefix = settings.redis.key_prefix
        self._timeout = settings.redis.socket_timeout_seconds
        self._fraction = settings.limits.local_fallback_fraction
        self._local = _Local()
        self.on_change = on_change  # (reservation, used per charge): for the gauges
        self.on_refund: Callable[[str], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._guard = RedisGuard(
            clock=time.monotonic, retry_seconds=0.5, max_retry_seconds=10.0,
            on_down=lambda exc: log.warning(
                "redis unreachable for budgets (%s); each worker keeps %.0f%% of every budget "
                "locally", type(exc).__name__, self._fraction * 100),
            on_up=lambda: log.warning("redis reachable again; budgets are shared again"),
            commands=CommandErrorLog(log, "budgets", clock=time.monotonic),
        )

    def budgets(self, tenant: str) -> list[BudgetConfig]:
        return tenant_config(self._tenants, tenant).budgets

    def charges(self, tenant: str, tokens: int, cost: float, t: float) -> list[Charge]:
        """The counters a reservation at time ``t`` charges (two windows near a boundary)."""
        out = []
        units = {"tokens": tokens, "cost": round(cost * NANO)}
        for budget in self.budgets(tenant):
            spans = {window_span(budget.window, t), window_span(budget.window, t + GUARD_SECONDS)}
            for kind, cap in (("tokens", budget.tokens), ("cost", budget.cost)):
                if cap is None:
                    continue
                limit = cap if kind == "tokens" else round(cap * NANO)
                for start, end in sorted(spans):
                    key = f"{self._prefix}:b:{tenant_slot(tenant)}:{budget.window}:{int(start)}:{kind}"
                    out.append(Charge(key, budget.window, kind, start, end, int(limit), units[kind]))
        return out

    def valid_at(self, res: Reservation, t: float) -> bool:
        """Does ``res`` still cover a call starting at ``t`` (and landing within the guard)?"""
        windows = {c.window for c in res.charges}
        return all(any(c.window == w and c.start <= u < c.end for c in res.charges)
                   for w in windows for u in (t, t + GUARD_SECONDS))

    async def try_reserve(self, tenant: str, tokens: int, cost: float) -> Reservation | Refusal:
        """Charge the estimate to every window of the tenant, or say why not."""
        now = self._clock()
        charges = self.charges(tenant, tokens, cost, now)
        for c in charges:
            if c.amount > c.limit:
                return Refusal(0.0, f"estimate of {_shown(c.kind, c.amount)} exceeds the whole "
                                    f"{c.window} budget of {_shown(c.kind, c.limit)}", never=True)
        if self._redis is not None and self._guard.available():
            try:
                reply = await self._eval(RESERVE_LUA, [c.key for c in charges],
                                         [v for c in charges for v in
                                          (c.limit, c.amount, _ttl_ms(c, now))])
            except REDIS_ERRORS as exc:
                self._guard.failed("reserve", exc)
            else:
                self._guard.succeeded()
                return self._verdict(tenant, charges, [int(x) for x in reply], True, now)
        return self._reserve_local(tenant, charges, now)

    def settle(self, res: Reservation, tokens: int, cost: float) -> None:
        """Correct the charge with the real usage (0, 0: give it all back). Once; the Redis
        write runs in the background (safe in ``finally`` blocks)."""
        if res.settled:
            return
        res.settled = True
        deltas = [(tokens if c.kind == "tokens" else round(cost * NANO)) - c.amount
                  for c in res.charges]
        if not any(deltas):
            return
        if res.shared:
            task = asyncio.get_running_loop().create_task(self._adjust(res, deltas))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        for c, d in zip(res.charges, deltas, strict=True):
            if c.key in self._local.used:
                self._local.used[c.key] = max(0, self._local.used[c.key] + d)
        self._refunded(res, deltas)

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self._timeout * 2)

    # ---- internals -------------------------------------------------------------------------

    def _verdict(self, tenant: str, charges: list[Charge], reply: list[int], shared: bool,
                 now: float) -> Reservation | Refusal:
        if reply[0] == 0:
            res = Reservation(tenant, charges, shared)
            if self.on_change is not None:
                self.on_change(res, reply[1:])
            return res
        c = charges[reply[0] - 1]
        return Refusal(max(c.end - now, 0.0), f"{c.window} budget spent ({_shown(c.kind, reply[1])} "
                                              f"of {_shown(c.kind, c.limit)} used)")

    def _reserve_local(self, tenant: str, charges: list[Charge], now: float
                       ) -> Reservation | Refusal:
        local = self._local
        for key in [k for k, end in local.ends.items() if end < now]:
            del local.ends[key], local.used[key]
        for i, c in enumerate(charges, 1):
            used = local.used.get(c.key, 0)
            if used + c.amount > max(1, math.floor(c.limit * self._fraction)):
                return self._verdict(tenant, charges, [i, used], False, now)
        for c in charges:
            local.used[c.key] = local.used.get(c.key, 0) + c.amount
            local.ends[c.key] = c.end
        return self._verdict(tenant, charges, [0, *(local.used[c.key] for c in charges)], False,
                             now)

    async def _adjust(self, res: Reservation, deltas: list[int]) -> None:
        try:
            await self._eval(ADJUST_LUA, [c.key for c in res.charges], deltas)
        except REDIS_ERRORS as exc:  # the window's counter then errs on the safe side
            log.debug("budget correction not written to redis: %s", type(exc).__name__)
        self._refunded(res, deltas)

    def _refunded(self, res: Reservation, deltas: list[int]) -> None:
        if any(d < 0 for d in deltas) and self.on_refund is not None:
            self.on_refund(res.tenant)

    async def _eval(self, src: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        assert self._redis is not None
        return await run_script(self._redis, src, keys, args, self._timeout)


def _ttl_ms(c: Charge, now: float) -> int:
    return max(int((c.end - now) * 1000), 1) + _KEY_SLACK_MS


def _shown(kind: str, units: int) -> str:
    return f"{units} tokens" if kind == "tokens" else f"cost {units / NANO:.9f}"
