"""Rate and concurrency limits shared by every worker of the consumer group, via Redis.

Limits: per endpoint ``rpm``, ``tpm`` and ``max_concurrency``; globally
``limits.max_requests_per_second``. Rates use GCRA (the generic cell rate algorithm): one
"theoretical arrival time" per key, advanced by ``interval x cost`` on each grant. A request's
slot is that time minus the burst tolerance (``(limits.rate_burst - 1) x interval``; the
default burst 1 spaces requests evenly, so rpm 600 means at most 10 in any second, never 600
at once). ``tpm`` charges an estimate before the call (``tokens.estimate_tokens``) and is corrected
with the real usage afterwards.

Grants are reservations: a slot that starts within ``RESERVE_AHEAD_SECONDS`` (at least four
slots) is granted at once and the caller sleeps until it (``Decision.wait``). The schedule so
runs on whole slots however late a worker is to ask or to send, and the limit is served in
full under saturation; a slot further ahead is refused with the time to ask again, when the
slot is half that horizon away (room for several workers to reserve in turn).
``max_concurrency`` is a sorted set of leases that expire on their own, so a crashed
worker cannot leak slots for longer than the endpoint timeout plus a margin.

Every check-and-charge of one request runs in one Lua script (atomic across workers) using
Redis' own clock, so workers never disagree about time. A refusal says how long until the
request could be allowed (``Decision.wait``): callers wait, limits never raise.

Redis unreachable: each worker falls back to an in-process limiter with the same rules,
scaled by ``limits.local_fallback_fraction`` (set it to 1/number-of-workers to keep the
group's total within the limit while Redis is down). Redis is retried with backoff (0.5 s
doubling to 10 s) and shared limiting resumes as soon as it answers. Redis errors are
translated here and never reach callers; an error about one command's arguments is not an
outage: that request alone is limited locally (``redis_io.is_outage``).

Usage::

    limiter = RateLimiter(settings, redis)
    decision = await limiter.acquire(endpoint, tokens)
    if decision.permit is None:
        await asyncio.sleep(decision.wait)       # or queue and come back later
    else:
        await asyncio.sleep(decision.wait)       # until the reserved slot
        ...call the endpoint...
        limiter.release(decision.permit, used_tokens=body["usage"]["total_tokens"])
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from itertools import count
from typing import Any

from streams.config import EndpointConfig, Settings
from streams.dispatch.gcra import ACQUIRE_LUA, ADJUST_LUA, run_script
from streams.redis_cluster import shared_tag
from streams.redis_guard import REDIS_ERRORS, CommandErrorLog, RedisGuard

log = logging.getLogger("streams.ratelimit")

# Another worker's concurrency lease can end at any time and we hear no event for it.
CONCURRENCY_POLL_SECONDS = 0.05
# A lease outlives the endpoint's hard timeout by this much before Redis drops it.
LEASE_MARGIN_SECONDS = 10.0
# Rates are scheduled at 98% of the configured value. A request reaches the endpoint a few
# milliseconds after its slot, and that lateness varies; at 98% the spacing absorbs up to 20 ms
# of it in any one-second window (rpm 600: 11 slots span 1.02 s), so the endpoint never sees
# one request too many.
RATE_HEADROOM = 0.98
# A worker's own sends are paced at 99 % of each limit (not 100 %): a train of sends at the
# pacer's spacing then absorbs up to 10 ms of network and endpoint jitter per window.
PACE_SHARE = 0.99
# A request that wakes this long after its reserved slot does not take it: sent now, it could
# meet the next second's slots of other workers in one window (the 98 % schedule leaves 20 ms
# per second). It asks for a new slot instead, once; the late slot is not given back.
LATE_SLOT_SECONDS = 0.010
# A grant reserves a slot up to this far ahead (at least 4 slots): the request sleeps until its
# slot, so the time we take between "allowed" and "sent" never costs the schedule a slot.
RESERVE_AHEAD_SECONDS = 0.25
_REDIS_RETRY_MIN = 0.5
_REDIS_RETRY_MAX = 10.0

@dataclass(slots=True)
class Permit:
    """What one granted request holds until ``RateLimiter.release``."""

    endpoint: EndpointConfig
    tokens: int
    shared: bool  # charged in Redis, else in the local fallback limiter
    lease: str | None = None  # Redis concurrency lease
    released: bool = False


@dataclass(slots=True, frozen=True)
class Decision:
    """A grant (``permit``) or a refusal, and ``wait`` seconds.

    A grant's ``wait`` is the time until its reserved slot: send then, not before. A refusal's
    is the time until asking again may succeed; 0 when we cannot predict it (a local
    concurrency slot: the caller hears of it when a permit is released).
    """

    permit: Permit | None
    wait: float = 0.0
    limit: str = ""  # which limit refused: rps, rpm, tpm, concurrency


@dataclass(slots=True, frozen=True)
class _Rate:
    limit: str
    key: str
    interval: float  # seconds per unit
    tolerance: float  # seconds of burst
    per_token: bool


class RateLimiter:
    """Per-endpoint and global limits; shared through Redis, local when Redis is down."""

    def __init__(
        self,
        settings: Settings,
        redis: Any | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        key_prefix: str | None = None,
        on_release: Callable[[str, bool], None] | None = None,
    ) -> None:
        """``on_release(endpoint name, refund)`` is called once a release has taken effect
        (written to Redis when shared): a refusal it may have ended can be asked again."""
        self._redis = redis
        self._on_release = on_release
        self._clock = clock
        self._timeout = settings.redis.socket_timeout_seconds
        self._fraction = settings.limits.local_fallback_fraction
        prefix = key_prefix if key_prefix is not None else settings.redis.key_prefix
        # One hash tag for every key: a script's keys must share a slot on Redis Cluster.
        self._base = f"{shared_tag(prefix)}:rl"
        burst = settings.limits.rate_burst
        rps = settings.limits.max_requests_per_second
        self._global: list[_Rate] = []
        if rps is not None:
            interval = 1.0 / (rps * RATE_HEADROOM)
            key = f"{self._base}:*:rps"
            self._global.append(_Rate("rps", key, interval, interval * (burst - 1), False))
        self._rates: dict[str, list[_Rate]] = {}
        for ep in settings.endpoints:
            rates = list(self._global)
            if ep.rpm is not None:
                interval = 60.0 / (ep.rpm * RATE_HEADROOM)
                key = f"{self._base}:{ep.name}:rpm"
                rates.append(_Rate("rpm", key, interval, interval * (burst - 1), False))
            if ep.tpm is not None:
                interval = 60.0 / (ep.tpm * RATE_HEADROOM)
                rates.append(_Rate("tpm", f"{self._base}:{ep.name}:tpm", interval, 0.0, True))
            self._rates[ep.name] = rates
        self._local_tat: dict[str, float] = {}
        self._paced: dict[str, float] = {}  # per key: this worker's next send at 100 % of it
        self._inflight: dict[str, int] = {ep.name: 0 for ep in settings.endpoints}
        self._lease_ids = count()
        self._lease_prefix = uuid.uuid4().hex[:12]
        self._guard = RedisGuard(
            clock=clock, retry_seconds=_REDIS_RETRY_MIN, max_retry_seconds=_REDIS_RETRY_MAX,
            on_down=lambda exc: log.warning(
                "redis unreachable for rate limits (%s); falling back to this worker's "
                "local limiter at %.0f%% of each limit", type(exc).__name__, self._fraction * 100,
            ),
            on_up=lambda: log.warning(
                "redis reachable again; rate limits are shared across workers again"
            ),
            commands=CommandErrorLog(log, "rate limits", clock=clock),
        )
        self._tasks: set[asyncio.Task[None]] = set()

    def on_release(self, callback: Callable[[str, bool], None]) -> None:
        """Call ``callback(endpoint name, refund)`` once a release has taken effect."""
        self._on_release = callback

    # ---- cheap, synchronous views for the dispatcher's fast path -------------------------

    def unlimited(self, endpoint: EndpointConfig) -> bool:
        """No rate or concurrency limit applies: ``acquire`` never waits or hits Redis."""
        return not self._rates[endpoint.name] and endpoint.max_concurrency is None

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable and limits are enforced per worker."""
        return self._guard.degraded

    def inflight(self, endpoint: EndpointConfig) -> int:
        return self._inflight[endpoint.name]

    def has_capacity(self, endpoint: EndpointConfig) -> bool:
        """This worker's own view of ``max_concurrency`` (no Redis)."""
        cap = endpoint.max_concurrency
        if cap is None:
            return True
        if self._use_redis():
            return self._inflight[endpoint.name] < cap
        return self._inflight[endpoint.name] < self._local_cap(cap)

    # ---- acquire / release -----------------------------------------------------------------

    async def acquire(self, endpoint: EndpointConfig, tokens: int) -> Decision:
        """Take a permit for one request of ~``tokens`` tokens, or say how long to wait."""
        if self.unlimited(endpoint):
            self._inflight[endpoint.name] += 1
            return Decision(Permit(endpoint, tokens, shared=False))
        if not self.has_capacity(endpoint):
            return Decision(None, 0.0, "concurrency")
        if self._use_redis():
            try:
                return await self._acquire_shared(endpoint, tokens)
            except REDIS_ERRORS as exc:
                if not self._guard.failed("acquire", exc):  # this request's command only
                    return self._acquire_local(endpoint, tokens)
                if not self.has_capacity(endpoint):  # the local cap is lower
                    return Decision(None, 0.0, "concurrency")
        return self._acquire_local(endpoint, tokens)

    def release(self, permit: Permit, used_tokens: int | None = None) -> None:
        """Give back the concurrency slot and correct the tpm charge. Synchronous and
        idempotent, so it is safe in ``finally`` blocks of cancelled tasks; Redis work is
        done in the background."""
        if permit.released:
            return
        permit.released = True
        name = permit.endpoint.name
        self._inflight[name] -= 1
        delta = 0
        if used_tokens is not None and permit.endpoint.tpm is not None:
            delta = used_tokens - permit.tokens
        tpm = next((r for r in self._rates[name] if r.per_token), None)
        if delta and tpm is not None and tpm.key in self._paced:
            self._paced[tpm.key] += delta * tpm.interval * RATE_HEADROOM
        if permit.shared:
            if permit.lease is not None or (delta and tpm is not None):
                self._spawn(self._release_shared(permit, tpm, delta))
                return
        elif delta and tpm is not None:
            tat = self._local_tat.get(tpm.key)
            if tat is not None:
                self._local_tat[tpm.key] = max(
                    tat + delta * tpm.interval / self._fraction, self._clock()
                )
        self._released(name, delta < 0)

    def pace(self, permit: Permit) -> float:
        """When to send a granted request, called once at (or after) its slot: now, or later
        if this worker's recent sends leave no room at ``PACE_SHARE`` of the limits (the shared
        schedule runs at ``RATE_HEADROOM``). A worker that woke late so catches up within the
        headroom instead of sending what fell due at once, a burst the endpoint would count
        above the limit. Clock seconds."""
        rates = self._rates[permit.endpoint.name]
        send = self._clock()
        for r in rates:
            send = max(send, self._paced.get(r.key, send) - r.tolerance)
        for r in rates:
            step = r.interval * RATE_HEADROOM / PACE_SHARE * (permit.tokens if r.per_token else 1)
            self._paced[r.key] = max(self._paced.get(r.key, send), send) + step
        return send

    async def aclose(self) -> None:
        """Wait (briefly) for background Redis releases."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self._timeout * 2)

    # ---- internals -------------------------------------------------------------------------

    def _local_cap(self, cap: int) -> int:
        return max(1, math.floor(cap * self._fraction))

    def _use_redis(self) -> bool:
        return self._redis is not None and self._guard.available()

    async def _eval(self, src: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        assert self._redis is not None
        return await run_script(self._redis, src, keys, args, self._timeout)

    @staticmethod
    def _ahead(rates: Sequence[_Rate], tokens: int, scale: float = 1.0) -> float:
        """How far ahead a slot may be reserved: at least four slots of this request."""
        step = max((r.interval * (tokens if r.per_token else 1) for r in rates), default=0.0)
        return max(RESERVE_AHEAD_SECONDS, 4 * step / scale)

    @staticmethod
    def _refusal(delay: float, ahead: float, limit: str) -> Decision:
        """Ask again when the slot is half the horizon away: lateness up to that much costs no
        slot, and the other half leaves room for several workers to reserve in turn."""
        return Decision(None, max(delay - ahead / 2, 0.0), limit)

    async def _acquire_shared(self, endpoint: EndpointConfig, tokens: int) -> Decision:
        rates = self._rates[endpoint.name]
        ahead = self._ahead(rates, tokens)
        keys = [r.key for r in rates]
        cap = endpoint.max_concurrency or 0
        lease = None
        lease_us = 0
        if cap:
            keys.append(f"{self._base}:{endpoint.name}:conc")
            lease = f"{self._lease_prefix}:{next(self._lease_ids)}"
            lease_us = round((endpoint.timeout_seconds + LEASE_MARGIN_SECONDS) * 1e6)
        poll_us = round(CONCURRENCY_POLL_SECONDS * 1e6)
        args: list[Any] = [len(rates), cap, lease or "", lease_us, poll_us, round(ahead * 1e6)]
        for r in rates:
            args += [r.interval * 1e6, r.tolerance * 1e6, tokens if r.per_token else 1]
        allowed, delay_us, index = await self._eval(ACQUIRE_LUA, keys, args)
        self._guard.succeeded()
        delay = float(delay_us) / 1e6
        if int(allowed) != 1:
            index = int(index)
            if index > len(rates):
                return Decision(None, delay, "concurrency")
            return self._refusal(delay, ahead, rates[index - 1].limit)
        self._inflight[endpoint.name] += 1
        return Decision(Permit(endpoint, tokens, shared=True, lease=lease), delay)

    def _acquire_local(self, endpoint: EndpointConfig, tokens: int) -> Decision:
        """The same reservations as ``ACQUIRE_LUA``, on this worker's share of each limit."""
        now = self._clock()
        rates = self._rates[endpoint.name]
        ahead = self._ahead(rates, tokens, self._fraction)
        slot, limit = now, ""
        for r in rates:
            start = self._local_tat.get(r.key, now) - r.tolerance / self._fraction
            if start > slot:
                slot, limit = start, r.limit
        if slot - now > ahead:
            return self._refusal(slot - now, ahead, limit)
        for r in rates:
            # The fallback keeps this worker's share of each limit: a longer interval.
            step = r.interval / self._fraction * (tokens if r.per_token else 1)
            self._local_tat[r.key] = max(self._local_tat.get(r.key, now), slot) + step
        self._inflight[endpoint.name] += 1
        return Decision(Permit(endpoint, tokens, shared=False), slot - now)

    async def _release_shared(self, permit: Permit, tpm: _Rate | None, delta: int) -> None:
        try:
            if permit.lease is not None:
                key = f"{self._base}:{permit.endpoint.name}:conc"
                async with asyncio.timeout(self._timeout):
                    await self._redis.zrem(key, permit.lease)  # type: ignore[union-attr]
            if delta and tpm is not None:
                await self._eval(ADJUST_LUA, [tpm.key], [delta * tpm.interval * 1e6])
        except REDIS_ERRORS as exc:
            # The lease expires by itself; a missed tpm correction only errs for a minute.
            log.debug("rate limit release not written to redis: %s", type(exc).__name__)
        self._released(permit.endpoint.name, delta < 0)

    def _released(self, name: str, refund: bool) -> None:
        if self._on_release is not None:
            self._on_release(name, refund)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
