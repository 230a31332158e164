"""Tenants in Redis keys and metrics: a safe key segment, a bounded label, the cost counters.

A request may name any tenant, so labels are bounded: the tenants the config names keep
their name (``default`` always does: it is every request without ``tenant``), every other
one is counted as ``other``. Redis keys carry a hash of the name inside a Redis Cluster hash
tag, ``{t:<hash>}``, so every key of one tenant lives in one slot (a Lua script may touch
them together).

Usage::

    labels = TenantLabels(settings.tenants)
    costs = CostMetrics(registry, labels)
    costs.count(req.tenant, model, cost, usage)
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from streams.config_tenants import DEFAULT_TENANT, tenant_name
from streams.pricing import Cost

OTHER = "other"


@functools.lru_cache(maxsize=4096)
def tenant_slot(tenant: str) -> str:
    """``{t:<16 hex>}``: the Redis Cluster hash tag of every key of ``tenant``."""
    digest = hashlib.blake2b(tenant.encode("utf-8"), digest_size=8).hexdigest()
    return f"{{t:{digest}}}"


class TenantLabels:
    """Maps a request's tenant to a bounded label value (see the module docstring)."""

    def __init__(self, named: Iterable[str] = ()) -> None:
        self.named = frozenset({DEFAULT_TENANT, *named})

    def __call__(self, tenant: str | None) -> str:
        name = tenant_name(tenant)
        return name if name in self.named else OTHER

    def values(self) -> list[str]:
        return sorted(self.named) + [OTHER]


class CostMetrics:
    """What answers cost and saved, and the tokens each tenant used."""

    def __init__(self, registry: CollectorRegistry, labels: TenantLabels) -> None:
        self.label = labels
        self.cost = Counter(
            "llm_streams_cost", "Cost of upstream answers (currency of the price table)",
            ["tenant", "model"], registry=registry,
        )
        self.saved = Counter(
            "llm_streams_cost_saved", "Cost saved by cache hits and coalesced answers",
            ["tenant"], registry=registry,
        )
        self.tokens = Counter(
            "llm_streams_tenant_tokens", "Tokens of upstream answers per tenant",
            ["tenant", "kind"], registry=registry,
        )

        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # labels() is slow

    def _child(self, family: Counter, *labels: str) -> Any:
        key = (id(family), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    def count(self, tenant: str | None, model: str, cost: Cost | None, cached: bool,
              usage: Mapping[str, int]) -> None:
        """Count one published answer (``model`` already a bounded label)."""
        label = self.label(tenant)
        if cost is not None:
            if cached:
                self._child(self.saved, label).inc(cost.saved)
            else:
                self._child(self.cost, label, model).inc(cost.total)
        if not cached:
            self._child(self.tokens, label, "prompt").inc(usage["prompt_tokens"])
            self._child(self.tokens, label, "completion").inc(usage["completion_tokens"])
