"""Tenant metrics of the dispatcher: budgets remaining, requests waiting on a budget, queue depth.

Labels are bounded (``tenancy.TenantLabels``: the configured tenants, ``default``, ``other``).

Usage::

    metrics = BudgetMetrics(registry, TenantLabels(settings.tenants))
    registry.register(TenantQueueCollector(fair_queue.tenant_depth, labels))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from streams.dispatch.budgets import Reservation
from streams.tenancy import OTHER, TenantLabels


class BudgetMetrics:
    """Budget remaining per tenant and window, requests waiting on a budget."""

    def __init__(self, registry: CollectorRegistry, labels: TenantLabels) -> None:
        self.label = labels
        self.remaining = Gauge(
            "llm_streams_budget_remaining",
            "Budget left in the current window as last seen (tokens, or cost)",
            ["tenant", "window", "kind"], registry=registry,
        )
        self.waiting = Gauge(
            "llm_streams_budget_waiting", "Requests waiting for room in their tenant's budget",
            ["tenant"], registry=registry,
        )
        for tenant in labels.values():
            self.waiting.labels(tenant)

    def seen(self, res: Reservation, used: Sequence[int]) -> None:
        label = self.label(res.tenant)
        if label == OTHER:  # many tenants share it: a remaining amount would mean nothing
            return
        latest: dict[tuple[str, str], tuple[float, float]] = {}
        for c, u in zip(res.charges, used, strict=True):
            left = (c.limit - u) / (1 if c.kind == "tokens" else 1e9)
            key = (c.window, c.kind)
            if key not in latest or c.start < latest[key][0]:
                latest[key] = (c.start, left)
        for (window, kind), (_, left) in latest.items():
            self.remaining.labels(label, window, kind).set(max(left, 0.0))



class TenantQueueCollector(Collector):
    """``llm_streams_tenant_queue_depth{tenant}``: requests waiting in the dispatcher's fair
    queue per tenant, read at scrape time."""

    def __init__(self, depth: Callable[[], dict[str, int]], labels: TenantLabels) -> None:
        self._depth = depth
        self._labels = labels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "llm_streams_tenant_queue_depth",
            "Requests waiting in the dispatcher's fair queue, per tenant",
            labels=["tenant"],
        )
        sums = dict.fromkeys(self._labels.values(), 0)
        for tenant, n in self._depth().items():
            label = self._labels(tenant)
            sums[label] += n
        for label, n in sums.items():
            family.add_metric([label], n)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("llm_streams_tenant_queue_depth", "", labels=["tenant"])
