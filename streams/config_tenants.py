"""The ``pricing:`` and ``tenants:`` sections of the settings (validated; see ``config.py``).

Prices are per million tokens; budgets are per calendar window (UTC). The tenant named
``default`` is reserved: its settings apply to every tenant not named (each such tenant gets
its own copy of the budgets, keyed by its name), and a request without ``tenant`` is the
tenant ``default`` itself.

Usage::

    settings.pricing["gpt-4o-mini"].input_per_mtok
    tenant_config(settings.tenants, "team-a").budgets
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_TENANT = "default"
Window = Literal["minute", "hour", "day", "month"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PriceOverride(_Section):
    """An endpoint's own prices for a model (unset keys keep the model's)."""

    input_per_mtok: float | None = Field(None, ge=0, le=1e6)
    output_per_mtok: float | None = Field(None, ge=0, le=1e6)
    cached_input_per_mtok: float | None = Field(None, ge=0, le=1e6)


class PriceConfig(_Section):
    """One model's prices per million tokens; ``endpoints`` overrides them per endpoint."""

    input_per_mtok: float = Field(ge=0, le=1e6)
    output_per_mtok: float = Field(ge=0, le=1e6)
    # Prompt tokens the provider served from its prompt cache (usage.prompt_tokens_details.
    # cached_tokens); unset: charged as input.
    cached_input_per_mtok: float | None = Field(None, ge=0, le=1e6)
    # Share of the price charged through the provider's Batch API (0.5: half price).
    batch_discount: float = Field(0.5, ge=0, le=1)
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$")
    endpoints: dict[str, PriceOverride] = Field(default_factory=dict)


class BudgetConfig(_Section):
    """A cap on one calendar window (UTC): tokens, cost (in the prices' currency) or both."""

    window: Window
    tokens: int | None = Field(None, ge=1, le=2**53 - 1)
    cost: float | None = Field(None, gt=0, le=1e9)

    @model_validator(mode="after")
    def _something_capped(self) -> BudgetConfig:
        if self.tokens is None and self.cost is None:
            raise ValueError("a budget needs tokens, cost or both")
        return self


class TenantConfig(_Section):
    """One tenant's share of dispatch capacity, its cap on calls in flight, its budgets."""

    weight: float = Field(1.0, gt=0, le=1e6)
    max_inflight: int | None = Field(None, ge=1)
    budgets: list[BudgetConfig] = Field(default_factory=list)
    on_exhausted: Literal["wait", "reject"] = "wait"

    @model_validator(mode="after")
    def _one_budget_per_window(self) -> TenantConfig:
        windows = [b.window for b in self.budgets]
        if len(set(windows)) != len(windows):
            raise ValueError("at most one budget per window")
        return self


_PLAIN = TenantConfig()


def tenant_name(tenant: str | None) -> str:
    """The tenant a request belongs to: its ``tenant``, or ``default`` without one."""
    return tenant or DEFAULT_TENANT


def tenant_config(tenants: Mapping[str, TenantConfig], name: str) -> TenantConfig:
    """The settings of tenant ``name``: its own, else those of ``default``, else the defaults."""
    found = tenants.get(name)
    if found is not None:
        return found
    return tenants.get(DEFAULT_TENANT, _PLAIN)
