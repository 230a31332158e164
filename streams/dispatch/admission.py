"""Admission: which waiting request may call which endpoint now, within limits and cooldowns.

A request that finds no usable endpoint waits in the priority scheduler; a background pump
(``pump.py``) grants waiting requests best-first as limits free up. The limiter's refusals
are remembered per endpoint (``refusals.py``) and tenants' calls in flight counted
(``tenantcap.py``), so a pass asks Redis only where a grant may be had. Our own limits never produce an error,
only waiting. Fast path: while nobody is queued, a request whose endpoint has no
rpm/tpm/rps limit is granted synchronously, without Redis and without touching the pump.

Usage::

    admission = Admission(settings, parts, metrics)
    grant = await admission.acquire(ticket, deadline)   # None: the deadline came first
    ...
    admission.release(grant, used_tokens)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from streams.config import EndpointConfig, Settings
from streams.config_tenants import DEFAULT_TENANT
from streams.dispatch.cooldown import EndpointState
from streams.dispatch.pump import Pump
from streams.dispatch.ratelimit import Permit
from streams.dispatch.refusals import Refusals
from streams.dispatch.slots import SlotBook, Tag
from streams.dispatch.telemetry import DispatchMetrics
from streams.dispatch.tenantcap import TenantInflight

if TYPE_CHECKING:
    from streams.dispatch.parts import DispatchParts



@dataclass(eq=False, slots=True)
class Ticket:
    """One request's place in line, kept across its retries."""

    model: str
    priority: int
    enqueued: float  # first arrival (clock seconds): keeps its place across retries
    tokens: int
    tried: list[str] = field(default_factory=list)
    since: float = 0.0  # start of the current wait, for the wait metric
    future: asyncio.Future[Grant] | None = None
    late: bool = False  # once woke too late for a reserved slot (the next one is taken anyway)
    tenant: str = DEFAULT_TENANT  # its fair share and max_inflight (fairqueue.py)


@dataclass(eq=False, slots=True)
class Grant:
    """Leave to call one endpoint once."""

    endpoint: EndpointConfig
    permit: Permit
    probe: bool
    at: float = 0.0  # clock time of the reserved slot (0: unlimited): the attempt starts then
    released: bool = False
    tenant: str = DEFAULT_TENANT
    revoked: bool = False  # its slot went to another tenant's request: ask again (slots.py)
    tag: Tag | None = None  # (priority, fair-queue finish tag): orders future slots (slots.py)


def fits(ep: EndpointConfig, tokens: int) -> bool:
    """Could ``ep``'s tpm ever take a request of ~``tokens`` tokens?"""
    return ep.tpm is None or tokens <= ep.tpm


class Admission:
    """The waiting room and the grants: see the module docstring."""

    def __init__(self, settings: Settings, parts: DispatchParts, metrics: DispatchMetrics) -> None:
        self._p = parts
        self._clock = parts.clock
        self._metrics = metrics
        self._max_inflight = settings.limits.max_inflight
        self._endpoints = [e for e in settings.endpoints if e.weight > 0]
        self._sched = parts.scheduler
        self._waiting_models: dict[str, int] = {}
        self._refusals = Refusals(e.name for e in settings.endpoints)  # hints: refused until
        self._acquiring: set[str] = set()  # endpoints with a limiter call under way
        self.inflight = {e.name: 0 for e in settings.endpoints}
        self._inflight_total = 0
        self._by_tenant = TenantInflight(settings.tenants)
        self._slots = SlotBook(self._clock)
        self._sched.service_tag = self._slots.service_tag
        self._pump = Pump(self._sched.__len__, self._pass, self._refusals, parts.cooldowns,
                          self._clock, parts.sleep)
        parts.limiter.on_release(self._released)

    def wake(self) -> None:
        """Something changed (a cooldown ended elsewhere): the pump looks again."""
        self._pump.wake()

    async def pump(self) -> None:
        """Run forever (a background task): grant waiting requests as limits free up."""
        await self._pump.run()

    def cancel_waiting(self) -> None:
        """Cancel every waiting request (at stop): neither answered nor dead-lettered."""
        for ticket in self._sched.drain():
            if ticket.future is not None:
                ticket.future.cancel()

    async def acquire(self, ticket: Ticket, deadline: int | None) -> Grant | None:
        """A grant for the ticket's next attempt; None if the deadline came first."""
        ticket.since = self._clock()
        if not len(self._sched):  # nobody queued: we may not overtake anyone
            grant = await self._try_grant(ticket)
            if grant is not None:
                return grant
        fut: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        ticket.future = fut
        entry = self._sched.add(ticket, ticket.priority, ticket.enqueued * 1000.0, ticket.tenant)
        self._waiting_models[ticket.model] = self._waiting_models.get(ticket.model, 0) + 1
        self._pump.wake()
        try:
            if deadline is None:
                return await fut
            remaining = deadline / 1000.0 - self._clock()
            if remaining <= 0:
                return None
            sleeper = asyncio.ensure_future(self._p.sleep(remaining))
            try:
                await asyncio.wait((fut, sleeper), return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
            return fut.result() if fut.done() else None
        except asyncio.CancelledError:
            # The pump may have granted us just before the cancellation landed.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result(), None)
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

    def release(self, grant: Grant, used_tokens: int | None) -> None:
        """Give the grant's slot back (once); ``used_tokens`` corrects the tpm charge."""
        if grant.released:
            return
        grant.released = True
        self._inflight_total -= 1
        self.inflight[grant.endpoint.name] -= 1
        self._by_tenant.remove(grant.tenant)
        self._p.limiter.release(grant.permit, used_tokens)
        if len(self._sched):
            self._pump.wake()

    def _released(self, name: str, refund: bool) -> None:
        """The limiter took back a permit of ``name``: a cached refusal it may have ended (the
        slot it freed, the tokens it gave back) is asked again at once."""
        if self._refusals.released(name, refund) and len(self._sched):
            self._pump.wake()

    def _ready(self, ep: EndpointConfig, now: float) -> bool:
        """Could ``ep`` take a request now, as far as this worker knows without Redis?"""
        return (
            not self._refusals.refused(ep.name, now)
            and ep.name not in self._acquiring
            and self._p.cooldowns.usable(ep.name, now)
            and self._p.limiter.has_capacity(ep)
        )

    def _eligible(self, ticket: Ticket, now: float) -> set[str] | None:
        """For a retry: the healthy endpoints not tried yet if any, else the healthy ones
        but the one that failed last (None = no restriction)."""
        if not ticket.tried:
            return None
        healthy = {
            e.name
            for e in self._p.balancer.candidates(ticket.model)
            if self._p.cooldowns.state(e.name, now) is EndpointState.HEALTHY
        }
        fresh = healthy.difference(ticket.tried)
        if fresh:
            return fresh
        healthy.discard(ticket.tried[-1])
        return healthy or None

    async def _try_grant(self, ticket: Ticket, tag: Tag | None = None) -> Grant | None:
        now = self._clock()
        if self._inflight_total >= self._max_inflight or self._refusals.everywhere(now):
            return None
        if self._by_tenant.full(ticket.tenant):
            return None
        only = self._eligible(ticket, now)
        rejected: set[str] = set()
        cooldowns, limiter = self._p.cooldowns, self._p.limiter

        def usable(ep: EndpointConfig) -> bool:
            return (
                (only is None or ep.name in only)
                and ep.name not in rejected
                and fits(ep, ticket.tokens)
                and self._ready(ep, now)
            )

        while (ep := self._p.balancer.pick(ticket.model, usable)) is not None:
            probe = cooldowns.needs_probe(ep.name, now)
            if probe and not await cooldowns.try_probe(ep.name):
                rejected.add(ep.name)
                continue
            if limiter.unlimited(ep):
                decision = await limiter.acquire(ep, ticket.tokens)
            else:
                # While one request asks Redis about ``ep``, a burst of new arrivals must not
                # all ask too: they queue and the pump asks for them one at a time.
                self._acquiring.add(ep.name)
                try:
                    decision = await limiter.acquire(ep, ticket.tokens)
                finally:
                    self._acquiring.discard(ep.name)
            now = self._clock()
            if decision.permit is None:
                if probe:
                    cooldowns.abandon_probe(ep.name)
                self._metrics.denied.labels(ep.name, decision.limit).inc()
                self._refusals.note(ep.name, decision.limit, decision.wait, now)
                if self._refusals.everywhere(now):  # rps: binds every endpoint
                    return None
                rejected.add(ep.name)
                continue
            self._inflight_total += 1
            self.inflight[ep.name] += 1
            self._by_tenant.add(ticket.tenant)
            at = 0.0 if limiter.unlimited(ep) else now + decision.wait  # 0: no pacing
            self._metrics.wait_by[ep.name].observe(max(now + decision.wait - ticket.since, 0.0))
            grant = Grant(ep, decision.permit, probe, at, tenant=ticket.tenant, tag=tag)
            self._slots.place(grant)  # may take a slot another tenant holds in excess
            return grant
        return None

    # ---- the pump ----------------------------------------------------------------------------

    def _stuck(self, now: float) -> bool:
        """Nothing waiting can be granted now: no ready endpoint serves a waiting model."""
        if self._inflight_total >= self._max_inflight or self._refusals.everywhere(now):
            return True
        models = self._waiting_models
        return not any(
            self._ready(ep, now) and any(ep.serves(m) for m in models) for ep in self._endpoints
        )

    def _steal(self, ticket: Ticket, tag: Tag) -> Grant | None:
        """The future slot of a grant behind ``ticket`` in fair-queue order, for ``ticket``
        (the fair queue's best) when no slot can be had (``slots.py``)."""
        if ticket.tried or self._by_tenant.full(ticket.tenant):
            return None
        old = self._slots.steal(tag, lambda g: (
            g.endpoint.serves(ticket.model) and fits(g.endpoint, ticket.tokens)))
        if old is None or old.tag is None:
            return None
        self._by_tenant.remove(old.tenant)
        self._by_tenant.add(ticket.tenant)
        self._sched.credit(old.tenant, old.tag[0])  # served in the fair queue, not served
        grant = Grant(old.endpoint, old.permit, False, old.at, tenant=ticket.tenant, tag=tag)
        self._slots.place(grant)
        return grant

    async def _pass(self) -> None:
        """Grant waiting requests best-first until nothing more can be granted."""
        cursor = self._sched.begin_pass()
        try:
            while True:
                stuck = self._stuck(self._clock())
                entry = cursor.next()
                if entry is None:
                    break
                tag = (entry.priority, self._sched.head_tag(entry))
                if stuck:  # only the fair queue's best may take a slot granted behind it
                    fut = entry.item.future
                    grant = None if fut is None or fut.done() else self._steal(entry.item, tag)
                    if grant is None:
                        break
                    cursor.take(entry)
                    fut.set_result(grant)  # type: ignore[union-attr]
                    continue
                ticket = entry.item
                fut = ticket.future
                if fut is None or fut.done():
                    self._sched.discard(entry)
                    continue
                if self._by_tenant.full(ticket.tenant):
                    cursor.skip_tenant(ticket.tenant)
                    continue
                grant = await self._try_grant(ticket, tag)
                if grant is None:
                    cursor.skip(entry)
                    continue
                cursor.take(entry)
                if fut.done():  # the waiter gave up while we were asking Redis
                    self.release(grant, None)
                else:
                    fut.set_result(grant)
        finally:
            cursor.end()
