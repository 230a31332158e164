"""The dispatcher: picks an endpoint for each request, respects limits, retries, cools down.

One ``dispatch()`` call per request (each its own asyncio task; thousands may run at once):

1. Pick an endpoint serving the model by weight (``balancer.py``) among those usable now:
   not cooling down (``cooldown.py``), not saturated (``ratelimit.py``), and for a retry
   not already tried if another healthy endpoint exists.
2. If none is usable the request waits in the priority scheduler (``scheduler.py``); a
   background "pump" grants waiting requests best-first as limits free up. Our own limits
   never produce an error, only waiting.
3. Call the endpoint (``client.complete``); on a retryable failure back off
   (``retry.py``) and go to 1; on a terminal one, or when ``retry.max_attempts`` attempts
   are spent, or the request's deadline has passed, raise ``DispatchFailed``.

Fast path: while nobody is queued, a request whose endpoint has no rpm/tpm/rps limit is
granted synchronously, without Redis and without touching the pump.

Usage::

    async with Dispatcher(settings, UpstreamClient(session), redis, registry) as dispatcher:
        completion = await dispatcher.dispatch(request)   # or raises DispatchFailed
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from streams.balancer import Balancer
from streams.config import EndpointConfig, Settings
from streams.contract import Completion, Request, upstream_usage
from streams.cooldown import Cooldowns, EndpointState
from streams.errors import (
    AttemptsExhausted,
    DeadlineExpired,
    DispatchFailed,
    NoEndpoint,
    StreamsError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamStatusError,
    ValidationFailed,
)
from streams.logs import request_extra
from streams.ratelimit import LATE_SLOT_SECONDS, Permit, RateLimiter, estimate_tokens
from streams.retry import Backoff, error_class, hurts_health, is_rate_limited, is_retryable
from streams.scheduler import Scheduler

log = logging.getLogger(__name__)

# How often cooldown state is exchanged with the other workers through Redis.
SYNC_INTERVAL_SECONDS = 0.25
# The pump re-checks at least this often even without events (belt and braces).
SAFETY_POLL_SECONDS = 1.0
# Never spin: a computed wake-up sooner than this is rounded up.
MIN_WAKE_SECONDS = 0.0005
# A refusal's wait is cached per endpoint for at most this long before Redis is asked again:
# another worker's refund or released lease may have ended it sooner (we hear no event).
MAX_CACHED_WAIT_SECONDS = 1.0

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class CompletionClient(Protocol):
    """What the dispatcher calls: one attempt, no retries (see ``upstream.UpstreamClient``)."""

    async def complete(
        self,
        endpoint: EndpointConfig,
        model: str,
        messages: list[dict[str, Any]],
        params: Mapping[str, Any],
    ) -> dict[str, Any]: ...


class DispatcherStopped(RuntimeError):
    """``dispatch()`` was called after ``stop()`` (a bug in the caller)."""


@dataclass(eq=False, slots=True)
class _Ticket:
    model: str
    priority: int
    enqueued: float  # first arrival (clock seconds): keeps its place across retries
    tokens: int
    tried: list[str] = field(default_factory=list)
    since: float = 0.0  # start of the current wait, for the wait metric
    future: asyncio.Future[_Grant] | None = None
    late: bool = False  # once woke too late for a reserved slot (the next one is taken anyway)


@dataclass(eq=False, slots=True)
class _Grant:
    endpoint: EndpointConfig
    permit: Permit
    probe: bool
    at: float = 0.0  # clock time of the reserved slot (0: unlimited): the attempt starts then
    released: bool = False


class _Metrics:
    def __init__(self, registry: CollectorRegistry, endpoints: Iterable[EndpointConfig]) -> None:
        self.requests = Counter(
            "llm_streams_endpoint_requests",
            "Attempts sent to each endpoint",
            ["endpoint"],
            registry=registry,
        )
        self.errors = Counter(
            "llm_streams_endpoint_errors",
            "Failed attempts by endpoint and error class",
            ["endpoint", "error"],
            registry=registry,
        )
        self.latency = Histogram(
            "llm_streams_endpoint_latency_seconds",
            "Duration of each attempt (the upstream call)",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.wait = Histogram(
            "llm_streams_limiter_wait_seconds",
            "Time a request waited for limits, cooldowns and capacity before an attempt",
            ["endpoint"],
            buckets=_WAIT_BUCKETS,
            registry=registry,
        )
        self.denied = Counter(
            "llm_streams_limiter_denied",
            "Times a limit refused an endpoint to a request (which then waited)",
            ["endpoint", "limit"],
            registry=registry,
        )
        self.retries = Counter(
            "llm_streams_retries",
            "Retries by the endpoint whose attempt failed and the reason",
            ["endpoint", "reason"],
            registry=registry,
        )
        self.outcomes = Counter(
            "llm_streams_dispatch",
            "Finished dispatches by outcome (ok, upstream, exhausted, expired, no_endpoint, "
            "too_large)",
            ["outcome"],
            registry=registry,
        )
        # Children bound once: label lookups are not free on the per-request path.
        names = [e.name for e in endpoints]
        self.requests_by = {n: self.requests.labels(n) for n in names}
        self.latency_by = {n: self.latency.labels(n) for n in names}
        self.wait_by = {n: self.wait.labels(n) for n in names}
        self.outcome = {
            o: self.outcomes.labels(o)
            for o in ("ok", "upstream", "exhausted", "expired", "no_endpoint", "too_large")
        }


class _StateCollector(Collector):
    """Gauges computed at scrape time (no per-request cost, never stale)."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._d = dispatcher

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families(fill=True)

    def _families(self, fill: bool = False) -> list[Metric]:
        depth = GaugeMetricFamily(
            "llm_streams_dispatcher_queue_depth",
            "Requests waiting in the dispatcher, by priority",
            labels=["priority"],
        )
        inflight = GaugeMetricFamily(
            "llm_streams_endpoint_inflight", "Attempts in flight per endpoint", labels=["endpoint"]
        )
        state = GaugeMetricFamily(
            "llm_streams_endpoint_state",
            "1 for the endpoint's current state (healthy, cooling, probing)",
            labels=["endpoint", "state"],
        )
        fallback = GaugeMetricFamily(
            "llm_streams_limiter_fallback",
            "1 while Redis is unreachable and limits are enforced per worker",
        )
        if fill:
            d = self._d
            for priority, n in enumerate(d._sched.depth()):
                depth.add_metric([str(priority)], n)
            now = d._clock()
            for ep in d._settings.endpoints:
                inflight.add_metric([ep.name], d._inflight[ep.name])
                current = d._cooldowns.state(ep.name, now)
                for s in EndpointState:
                    state.add_metric([ep.name, s.value], 1.0 if s is current else 0.0)
            fallback.add_metric([], 1.0 if d._limiter.degraded else 0.0)
        return [depth, inflight, state, fallback]


def _used_tokens(body: Mapping[str, Any]) -> int | None:
    """Tokens the answer used, for the tpm charge; None when unknown (the estimate stands)."""
    usage = upstream_usage(body)
    if usage is None:
        return None
    return usage["total_tokens"] or (usage["prompt_tokens"] + usage["completion_tokens"]) or None


def _fits(ep: EndpointConfig, tokens: int) -> bool:
    """Could ``ep``'s tpm ever take a request of ~``tokens`` tokens?"""
    return ep.tpm is None or tokens <= ep.tpm


def _not_processed(exc: StreamsError) -> bool:
    """The endpoint did no work for this attempt, so its tpm charge is given back."""
    if isinstance(exc, UpstreamConnectionError):
        return True
    return isinstance(exc, UpstreamStatusError) and 400 <= (exc.status or 0) < 500


class Dispatcher:
    """Routes requests to endpoints within limits, with retries and cooldowns.

    ``clock`` returns epoch seconds (deadlines are epoch ms); ``sleep`` and ``random``
    are injectable so tests run on virtual time.
    """

    def __init__(
        self,
        settings: Settings,
        client: CompletionClient,
        redis: Any | None,
        registry: CollectorRegistry,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self._settings = settings
        self._client = client
        self._redis = redis
        self._clock = clock
        self._sleep = sleep
        self._max_attempts = settings.retry.max_attempts
        self._max_inflight = settings.limits.max_inflight
        self._default_model = settings.worker.default_model
        self._endpoints = [e for e in settings.endpoints if e.weight > 0]
        self._balancer = Balancer(settings.endpoints)
        self._limiter = RateLimiter(settings, redis, clock=clock, on_release=self._released)
        self._cooldowns = Cooldowns(
            settings.endpoints,
            settings.retry,
            redis,
            key_prefix=settings.redis.key_prefix,
            clock=clock,
            op_timeout=settings.redis.socket_timeout_seconds,
        )
        self._backoff = Backoff(settings.retry, random)
        self._sched: Scheduler[_Ticket] = Scheduler(settings.limits.priority_aging_ms)
        self._waiting_models: dict[str, int] = {}
        self._blocked = {e.name: 0.0 for e in settings.endpoints}  # hint: refused until
        self._blocked_by = {e.name: "" for e in settings.endpoints}  # the limit that refused
        self._global_blocked = 0.0
        self._acquiring: set[str] = set()  # endpoints with a limiter call under way
        self._inflight = {e.name: 0 for e in settings.endpoints}
        self._inflight_total = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False
        self._metrics = _Metrics(registry, settings.endpoints)
        registry.register(_StateCollector(self))

    # ---- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Dispatcher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the background tasks (the pump; the cooldown sync when Redis is given)."""
        self._ensure_started()

    async def stop(self) -> None:
        """Stop background tasks; ``dispatch()`` calls still waiting raise CancelledError.

        In-flight attempts are not interrupted: callers wait for those (shutdown grace).
        """
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for ticket in self._sched.drain():
            # Cancelled, not failed: the record is then neither answered nor dead-lettered,
            # so it is redelivered after a restart.
            if ticket.future is not None:
                ticket.future.cancel()
        if self._redis is not None:
            await self._cooldowns.sync()  # leave our latest verdicts for the others
        await self._limiter.aclose()

    @property
    def waiting(self) -> int:
        """Requests waiting for an endpoint right now."""
        return len(self._sched)

    def endpoint_state(self, name: str) -> str:
        """healthy, cooling or probing (this worker's view)."""
        return self._cooldowns.state(name).value

    # ---- the main API ------------------------------------------------------------------------

    async def dispatch(self, req: Request) -> Completion:
        """Answer ``req`` from an endpoint, or raise ``DispatchFailed`` (see module doc)."""
        if self._closed:
            raise DispatcherStopped("dispatcher stopped")
        self._ensure_started()
        model = req.model or self._default_model
        if not self._balancer.candidates(model):
            self._metrics.outcome["no_endpoint"].inc()
            raise DispatchFailed(NoEndpoint(f"no endpoint serves model {model!r}"), 0, [])
        messages = req.chat_messages()
        ticket = _Ticket(model, req.priority, self._clock(), estimate_tokens(messages, req.params))
        self._check_size(ticket)
        attempts = 0
        while True:
            self._check_deadline(req.deadline, attempts, ticket.tried)
            grant = await self._acquire(ticket, req.deadline)
            if grant is None:  # the deadline came while waiting
                self._check_deadline(req.deadline, attempts, ticket.tried)
                continue
            if grant.at and not await self._until_slot(grant, ticket):
                continue  # cooling down since, or woke too late for the slot: ask again
            if self._expired(req.deadline):
                self._release(grant, None)
                self._check_deadline(req.deadline, attempts, ticket.tried)
            attempts += 1
            ticket.tried.append(grant.endpoint.name)
            try:
                body = await self._attempt(grant, model, messages, req.params)
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
                delay = self._backoff.delay(attempts, None if other else exc)
                log.debug("attempt %d on %s failed (%s); retrying in %.2f s", attempts,
                          grant.endpoint.name, exc, delay, extra=request_extra(req.id))
                await self._backoff_sleep(delay, req.deadline)
                continue
            self._metrics.outcome["ok"].inc()
            return Completion(
                model=model,
                body=body,
                endpoint=grant.endpoint.name,
                attempts=attempts,
                endpoints=list(ticket.tried),
            )

    def _check_size(self, ticket: _Ticket) -> None:
        """A request larger than every endpoint's whole ``tpm`` could never be served, and
        charging it would push the shared schedule minutes ahead for everyone."""
        if any(_fits(ep, ticket.tokens) for ep in self._balancer.candidates(ticket.model)):
            return
        self._metrics.outcome["too_large"].inc()
        largest = max(ep.tpm or 0 for ep in self._balancer.candidates(ticket.model))
        error = ValidationFailed(
            f"request of ~{ticket.tokens} tokens (prompt + n x max_tokens) is too large for any "
            f"endpoint (largest tpm {largest})"
        )
        raise DispatchFailed(error, 0, [])

    async def _until_slot(self, grant: _Grant, ticket: _Ticket) -> bool:
        """Sleep until the grant's reserved slot (the limiter granted it ahead of time), and
        after a late wake-up until the pacer lets it go (``RateLimiter.pace``). False, with
        the slot given up, if the endpoint began cooling down meanwhile (a 429 told us to), or
        if we woke more than ``LATE_SLOT_SECONDS`` after the slot (once per request: see
        ``ratelimit.LATE_SLOT_SECONDS``)."""
        try:
            if (delay := grant.at - self._clock()) > 0:
                await self._sleep(delay)
                name = grant.endpoint.name
                if not grant.probe and self._cooldowns.state(name) is not EndpointState.HEALTHY:
                    self._release(grant, None)
                    return False
            if not ticket.late and self._clock() - grant.at > LATE_SLOT_SECONDS:
                ticket.late = True
                self._release(grant, None)
                return False
            if (delay := self._limiter.pace(grant.permit) - self._clock()) > 0:
                await self._sleep(delay)
        except BaseException:
            self._release(grant, None)
            raise
        return True

    def _other_usable(self, model: str, failed: str) -> bool:
        return any(
            ep.name != failed and ep.weight > 0 and self._cooldowns.usable(ep.name)
            for ep in self._balancer.candidates(model)
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

    async def _attempt(
        self,
        grant: _Grant,
        model: str,
        messages: list[dict[str, Any]],
        params: Mapping[str, Any],
    ) -> dict[str, Any]:
        name = grant.endpoint.name
        self._metrics.requests_by[name].inc()
        used: int | None = None
        start = self._clock()
        try:
            body = await self._client.complete(grant.endpoint, model, messages, params)
        except StreamsError as exc:
            self._metrics.errors.labels(name, error_class(exc)).inc()
            if hurts_health(exc):
                retry_after = exc.retry_after if isinstance(exc, UpstreamError) else None
                self._cooldowns.record_failure(
                    name,
                    probe=grant.probe,
                    rate_limited=is_rate_limited(exc),
                    retry_after=retry_after,
                )
            else:  # it answered (a terminal 4xx is the request's fault): it is alive
                self._cooldowns.record_success(name, probe=grant.probe)
            if _not_processed(exc):
                used = 0
            raise
        except BaseException as exc:  # cancelled, or a client bug: no verdict on the endpoint
            if not isinstance(exc, asyncio.CancelledError):
                self._metrics.errors.labels(name, "other").inc()
            if grant.probe:
                self._cooldowns.abandon_probe(name)
            raise
        else:
            self._cooldowns.record_success(name, probe=grant.probe)
            used = _used_tokens(body)
            return body
        finally:
            self._metrics.latency_by[name].observe(max(self._clock() - start, 0.0))
            self._release(grant, used)

    # ---- granting ----------------------------------------------------------------------------

    async def _acquire(self, ticket: _Ticket, deadline: int | None) -> _Grant | None:
        """A grant for the ticket's next attempt; None if the deadline came first."""
        ticket.since = self._clock()
        if not len(self._sched):  # nobody queued: we may not overtake anyone
            grant = await self._try_grant(ticket)
            if grant is not None:
                return grant
        fut: asyncio.Future[_Grant] = asyncio.get_running_loop().create_future()
        ticket.future = fut
        entry = self._sched.add(ticket, ticket.priority, ticket.enqueued * 1000.0)
        self._waiting_models[ticket.model] = self._waiting_models.get(ticket.model, 0) + 1
        self._wake.set()
        try:
            if deadline is None:
                return await fut
            remaining = deadline / 1000.0 - self._clock()
            if remaining <= 0:
                return None
            sleeper = asyncio.ensure_future(self._sleep(remaining))
            try:
                await asyncio.wait((fut, sleeper), return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
            return fut.result() if fut.done() else None
        except asyncio.CancelledError:
            # The pump may have granted us just before the cancellation landed.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release(fut.result(), None)
            raise
        finally:
            if not fut.done():
                fut.cancel()  # the pump releases a grant it made for a cancelled future
            self._sched.discard(entry)
            left = self._waiting_models[ticket.model] - 1
            if left:
                self._waiting_models[ticket.model] = left
            else:
                del self._waiting_models[ticket.model]

    def _ready(self, ep: EndpointConfig, now: float) -> bool:
        """Could ``ep`` take a request now, as far as this worker knows without Redis?"""
        return (
            self._blocked[ep.name] <= now
            and ep.name not in self._acquiring
            and self._cooldowns.usable(ep.name, now)
            and self._limiter.has_capacity(ep)
        )

    def _eligible(self, ticket: _Ticket, now: float) -> set[str] | None:
        """For a retry: the healthy endpoints not tried yet if any, else the healthy ones
        but the one that failed last (None = no restriction)."""
        if not ticket.tried:
            return None
        healthy = {
            e.name
            for e in self._balancer.candidates(ticket.model)
            if self._cooldowns.state(e.name, now) is EndpointState.HEALTHY
        }
        fresh = healthy.difference(ticket.tried)
        if fresh:
            return fresh
        healthy.discard(ticket.tried[-1])
        return healthy or None

    async def _try_grant(self, ticket: _Ticket) -> _Grant | None:
        now = self._clock()
        if self._inflight_total >= self._max_inflight or self._global_blocked > now:
            return None
        only = self._eligible(ticket, now)
        rejected: set[str] = set()

        def usable(ep: EndpointConfig) -> bool:
            return (
                (only is None or ep.name in only)
                and ep.name not in rejected
                and _fits(ep, ticket.tokens)
                and self._ready(ep, now)
            )

        while (ep := self._balancer.pick(ticket.model, usable)) is not None:
            probe = self._cooldowns.needs_probe(ep.name, now)
            if probe and not await self._cooldowns.try_probe(ep.name):
                rejected.add(ep.name)
                continue
            if self._limiter.unlimited(ep):
                decision = await self._limiter.acquire(ep, ticket.tokens)
            else:
                # While one request asks Redis about ``ep``, a burst of new arrivals must not
                # all ask too: they queue and the pump asks for them one at a time.
                self._acquiring.add(ep.name)
                try:
                    decision = await self._limiter.acquire(ep, ticket.tokens)
                finally:
                    self._acquiring.discard(ep.name)
            now = self._clock()
            if decision.permit is None:
                if probe:
                    self._cooldowns.abandon_probe(ep.name)
                self._metrics.denied.labels(ep.name, decision.limit).inc()
                wait = min(decision.wait, MAX_CACHED_WAIT_SECONDS)
                if decision.limit == "rps" and wait > 0:
                    self._global_blocked = now + wait  # binds every endpoint
                    return None
                if wait > 0:
                    self._blocked[ep.name] = now + wait
                    self._blocked_by[ep.name] = decision.limit
                rejected.add(ep.name)
                continue
            self._inflight_total += 1
            self._inflight[ep.name] += 1
            at = 0.0 if self._limiter.unlimited(ep) else now + decision.wait  # 0: no pacing
            self._metrics.wait_by[ep.name].observe(max(now + decision.wait - ticket.since, 0.0))
            return _Grant(ep, decision.permit, probe, at)
        return None

    def _release(self, grant: _Grant, used_tokens: int | None) -> None:
        if grant.released:
            return
        grant.released = True
        name = grant.endpoint.name
        self._inflight_total -= 1
        self._inflight[name] -= 1
        self._limiter.release(grant.permit, used_tokens)
        if len(self._sched):
            self._wake.set()

    def _released(self, name: str, refund: bool) -> None:
        """The limiter took back a permit of ``name``: a cached refusal it may have ended (the
        slot it freed, the tokens it gave back) is asked again at once."""
        blocked_by = self._blocked_by[name]
        if blocked_by == "concurrency" or (refund and blocked_by == "tpm"):
            self._blocked[name] = 0.0
            self._blocked_by[name] = ""
            if len(self._sched):
                self._wake.set()

    # ---- background --------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._started:
            return
        self._started = True
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._pump(), name="dispatcher-pump"))
        if self._redis is not None:
            self._tasks.append(loop.create_task(self._sync_loop(), name="dispatcher-sync"))

    def _stuck(self, now: float) -> bool:
        """Nothing waiting can be granted now: no ready endpoint serves a waiting model."""
        if self._inflight_total >= self._max_inflight or self._global_blocked > now:
            return True
        models = self._waiting_models
        return not any(
            self._ready(ep, now) and any(ep.serves(m) for m in models) for ep in self._endpoints
        )

    async def _pass(self) -> None:
        """Grant waiting requests best-first until nothing more can be granted."""
        cursor = self._sched.begin_pass()
        try:
            while not self._stuck(self._clock()):
                entry = cursor.next()
                if entry is None:
                    break
                ticket = entry.item
                fut = ticket.future
                if fut is None or fut.done():
                    cursor.take(entry)
                    continue
                grant = await self._try_grant(ticket)
                if grant is None:
                    cursor.skip(entry)
                    continue
                cursor.take(entry)
                if fut.done():  # the waiter gave up while we were asking Redis
                    self._release(grant, None)
                else:
                    fut.set_result(grant)
        finally:
            cursor.end()

    def _next_wake(self) -> float | None:
        """Seconds until a refusal or cooldown ends (events wake the pump sooner)."""
        if not len(self._sched):
            return None
        now = self._clock()
        times = [t for t in self._blocked.values() if t > now]
        if self._global_blocked > now:
            times.append(self._global_blocked)
        cooling = self._cooldowns.next_change(now)
        if cooling is not None:
            times.append(cooling)
        if not times:
            return SAFETY_POLL_SECONDS
        return min(max(min(times) - now, MIN_WAKE_SECONDS), SAFETY_POLL_SECONDS)

    async def _pump(self) -> None:
        while True:
            self._wake.clear()
            if len(self._sched):
                try:
                    await self._pass()
                except Exception:  # a bug here must not strand every waiting request
                    log.exception("dispatcher pass failed")
            delay = self._next_wake()
            if self._wake.is_set():
                continue
            if delay is None:
                await self._wake.wait()
                continue
            waiter = asyncio.ensure_future(self._wake.wait())
            sleeper = asyncio.ensure_future(self._sleep(delay))
            try:
                await asyncio.wait((waiter, sleeper), return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                sleeper.cancel()

    async def _sync_loop(self) -> None:
        while True:
            try:
                if await self._cooldowns.sync():
                    self._wake.set()
            except Exception:
                log.exception("cooldown sync failed")
            await self._sleep(SYNC_INTERVAL_SECONDS)


__all__ = ["CompletionClient", "Dispatcher", "DispatcherStopped"]
