"""One call under a grant: the wait for its reserved slot, the call's metrics, the endpoint's
health verdict and the grant's release with the tokens used.

The dispatcher's attempts and the embedding batcher's calls both go through a ``Caller``.

Usage::

    caller = Caller(admission, parts, metrics)
    if await caller.until_slot(grant, ticket):        # False: ask admission again
        body = await caller.call(grant, client.complete(grant.endpoint, model, messages, params))
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from streams.contract import upstream_usage
from streams.dispatch.admission import Admission, Grant, Ticket
from streams.dispatch.cooldown import EndpointState
from streams.dispatch.ratelimit import LATE_SLOT_SECONDS
from streams.dispatch.retry import error_class, hurts_health, is_rate_limited
from streams.dispatch.telemetry import DispatchMetrics
from streams.errors import StreamsError, UpstreamConnectionError, UpstreamError, UpstreamStatusError

if TYPE_CHECKING:
    from streams.dispatch.parts import DispatchParts


def _used_tokens(body: Mapping[str, Any]) -> int | None:
    """Tokens the answer used, for the tpm charge; None when unknown (the estimate stands)."""
    usage = upstream_usage(body)
    if usage is None:
        return None
    return usage["total_tokens"] or (usage["prompt_tokens"] + usage["completion_tokens"]) or None


def _not_processed(exc: StreamsError) -> bool:
    """The endpoint did no work for this attempt, so its tpm charge is given back."""
    if isinstance(exc, UpstreamConnectionError):
        return True
    return isinstance(exc, UpstreamStatusError) and 400 <= (exc.status or 0) < 500


class Caller:
    """Calls under grants (see the module docstring)."""

    def __init__(self, admission: Admission, parts: DispatchParts, metrics: DispatchMetrics) -> None:
        self._admission = admission
        self._p = parts
        self._cooldowns = parts.cooldowns
        self._clock = parts.clock
        self._sleep = parts.sleep
        self._metrics = metrics

    async def until_slot(self, grant: Grant, ticket: Ticket) -> bool:
        """Sleep until the grant's reserved slot (the limiter granted it ahead of time), and
        after a late wake-up until the pacer lets it go (``RateLimiter.pace``). False, with
        the slot given up, if the endpoint began cooling down meanwhile (a 429 told us to), or
        if we woke more than ``LATE_SLOT_SECONDS`` after the slot (once per request: see
        ``ratelimit.LATE_SLOT_SECONDS``)."""
        try:
            if grant.revoked:  # its slot went to another tenant (slots.py): ask again
                return False
            if (delay := grant.at - self._clock()) > 0:
                await self._sleep(delay)
                while (delay := grant.at - self._clock()) > 0:  # given to another tenant
                    await self._sleep(delay)                     # (slots.py): a later one
                if grant.revoked:
                    return False
                name = grant.endpoint.name
                if not grant.probe and self._cooldowns.state(name) is not EndpointState.HEALTHY:
                    self._admission.release(grant, None)
                    return False
            if not ticket.late and self._clock() - grant.at > LATE_SLOT_SECONDS:
                ticket.late = True
                self._admission.release(grant, None)
                return False
            if (delay := self._p.limiter.pace(grant.permit) - self._clock()) > 0:
                await self._sleep(delay)
        except BaseException:
            self._admission.release(grant, None)
            raise
        return True

    async def call(
        self,
        grant: Grant,
        call: Awaitable[dict[str, Any]],
        used_tokens: Callable[[Mapping[str, Any]], int | None] = _used_tokens,
    ) -> dict[str, Any]:
        """One call under ``grant`` (``call``: its coroutine, not started yet): its metrics,
        the endpoint's health verdict, the grant released with the tokens used (also for the
        embedding batcher's calls)."""
        name = grant.endpoint.name
        self._metrics.requests_by[name].inc()
        used: int | None = None
        start = self._clock()
        try:
            body = await call
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
            used = used_tokens(body)
            return body
        finally:
            self._metrics.latency_by[name].observe(max(self._clock() - start, 0.0))
            self._admission.release(grant, used)
