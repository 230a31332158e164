"""Which requests go through a Batch API (the ``batch_api`` config section and request field).

A request qualifies when ``batch_api`` is enabled and a batch-capable endpoint serves its
model, and either it says ``batch_api: true`` or it leaves the choice to the policy
(``null``) and its priority is at least ``min_priority`` and its deadline is absent or at
least ``min_slack_seconds`` away. A request whose deadline is within
``fallback_slack_seconds`` never qualifies (it would fall back at once). A request marked
``batch_api: true`` that no batch-capable endpoint can take goes the normal way, counted
and logged at most once per interval. So does a request of a tenant with budgets: a job's
lines are not reserved against them, and the normal path's reservation is what makes a
budget hold (counted as ``budget``).

Usage::

    policy = BatchPolicy(settings, metrics)
    if policy.wants(req): ...   # park it
    endpoint = policy.endpoint_for(model)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from streams.batchapi.metrics import BatchMetrics
from streams.config import EndpointConfig, Settings
from streams.config_tenants import tenant_config, tenant_name
from streams.contract import Request
from streams.logs import LogThrottle, request_extra

log = logging.getLogger("streams.batchapi")


class BatchPolicy:
    """See the module docstring."""

    def __init__(
        self, settings: Settings, metrics: BatchMetrics, clock: Callable[[], float] = time.time
    ) -> None:
        self._cfg = settings.batch_api
        self._endpoints = [e for e in settings.endpoints if e.batch_api and e.weight > 0]
        self._tenants = settings.tenants
        self._metrics = metrics
        self._clock = clock
        self._unserved = LogThrottle(settings.cache.error_log_interval_seconds, time.monotonic)

    @property
    def enabled(self) -> bool:
        return self._cfg.enabled and bool(self._endpoints)

    def endpoint_for(self, model: str) -> EndpointConfig | None:
        """The batch-capable endpoint for ``model`` (the heaviest; the first among equals)."""
        serving = [e for e in self._endpoints if e.serves(model)]
        return max(serving, key=lambda e: e.weight) if serving else None

    def wants(self, req: Request) -> bool:
        """True when ``req`` is to be parked for a batch job."""
        cfg = self._cfg
        if not cfg.enabled or req.batch_api is False or req.kind == "embedding":
            return False  # embeddings: batched across records already (jobs are chat lines)
        slack = None if req.deadline is None else req.deadline / 1000.0 - self._clock()
        if req.batch_api is None:
            if req.priority < cfg.min_priority:
                return False
            if slack is not None and slack < cfg.min_slack_seconds:
                return False
        elif slack is not None and slack <= cfg.fallback_slack_seconds:
            return False  # too late for a job: it would fall back at once
        assert req.model is not None  # set by parse_request
        if self.endpoint_for(req.model) is None:
            if req.batch_api:
                self._metrics.fallbacks.labels("no_endpoint").inc()
                if count := self._unserved.due():
                    log.warning("batch_api requested but no batch-capable endpoint serves "
                                "model %r: normal path (%d since last report)", req.model,
                                count, extra=request_extra(req.id))
            return False
        if tenant_config(self._tenants, tenant_name(req.tenant)).budgets:
            self._metrics.fallbacks.labels("budget").inc()
            return False
        return True
