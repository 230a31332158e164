"""Calls in flight per tenant in this worker, against each tenant's ``max_inflight``."""

from __future__ import annotations

from collections.abc import Mapping

from streams.config_tenants import TenantConfig, tenant_config


class TenantInflight:
    """Counts of calls in flight per tenant (a tenant is present only while it has some)."""

    def __init__(self, tenants: Mapping[str, TenantConfig]) -> None:
        self._tenants = tenants
        self._count: dict[str, int] = {}

    def full(self, tenant: str) -> bool:
        """The tenant has its ``max_inflight`` calls in flight in this worker."""
        cap = tenant_config(self._tenants, tenant).max_inflight
        return cap is not None and self._count.get(tenant, 0) >= cap

    def add(self, tenant: str) -> None:
        self._count[tenant] = self._count.get(tenant, 0) + 1

    def remove(self, tenant: str) -> None:
        left = self._count[tenant] - 1
        if left:
            self._count[tenant] = left
        else:
            del self._count[tenant]
