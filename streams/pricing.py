"""What an answer cost: the one place prices are applied to token counts.

Prices come from ``pricing:`` (per model, optionally per endpoint), per million tokens.
Amounts are rounded to 1e-12 of the currency (a float's relative error, 1e-16, stays far
below the 1e-9 a cost is exact to; Decimal would cost ~10x the time on the hot path). Every
caller (chat responses, and later pipelines' ``_llm.cost``, embeddings, the Batch API with
``batch=True``) goes through ``Pricing.price``.

Usage::

    pricing = Pricing(settings.pricing)
    cost = pricing.price("gpt-4o-mini", "openai", body["usage"])      # Cost | None
    cost.record()   # {"input": ..., "output": ..., "total": ..., "currency": "USD", "saved": 0.0}
    pricing.of_completion(comp)   # the response's ``cost``: total 0 and ``saved`` when cached
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from streams.config_tenants import PriceConfig
from streams.contract import MAX_TOKEN_COUNT, Completion, upstream_usage

_DIGITS = 12  # rounding of every amount (1e-12 of the currency)


@dataclass(frozen=True, slots=True)
class Cost:
    """Amounts in ``currency``: what was paid (``total`` = input + output) and what a cache
    hit or coalesced answer saved (``saved``: what the call would have cost)."""

    input: float
    output: float
    total: float
    currency: str
    saved: float = 0.0

    def record(self) -> dict[str, Any]:
        """The response's ``cost`` object."""
        return {"input": self.input, "output": self.output, "total": self.total,
                "currency": self.currency, "saved": self.saved}

    def as_saved(self) -> Cost:
        """The same call answered without paying: nothing spent, ``total`` saved."""
        return replace(self, input=0.0, output=0.0, total=0.0, saved=self.total)


def _amount(tokens: int, per_mtok: float) -> float:
    return tokens * per_mtok / 1e6


def _cached_tokens(usage: Mapping[str, Any], prompt: int) -> int:
    """OpenAI's ``usage.prompt_tokens_details.cached_tokens``, when a valid count."""
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        return 0
    n = details.get("cached_tokens")
    if type(n) is not int or not 0 <= n <= MAX_TOKEN_COUNT:
        return 0
    return min(n, prompt)


class Pricing:
    """The price table; see the module docstring."""

    def __init__(self, table: Mapping[str, PriceConfig]) -> None:
        self._table = dict(table)

    def has_price(self, model: str) -> bool:
        return model in self._table

    def price(self, model: str, endpoint: str | None, usage: Mapping[str, Any] | None,
              batch: bool = False) -> Cost | None:
        """The cost of ``usage`` (an upstream ``usage`` object; untrusted: invalid counts
        count as 0) on ``model`` at ``endpoint``; None when the model has no price.
        ``batch``: through the provider's Batch API (``batch_discount`` applies)."""
        cfg = self._table.get(model)
        if cfg is None:
            return None
        counts = upstream_usage({"usage": usage}) or {"prompt_tokens": 0, "completion_tokens": 0}
        prompt, completion = counts["prompt_tokens"], counts["completion_tokens"]
        cached = _cached_tokens(usage, prompt) if isinstance(usage, Mapping) else 0
        input_price, output_price, cached_price = self._prices(cfg, endpoint)
        if cached_price is None:
            cached_price = input_price
        inp = _amount(prompt - cached, input_price) + _amount(cached, cached_price)
        out = _amount(completion, output_price)
        if batch:
            inp, out = inp * cfg.batch_discount, out * cfg.batch_discount
        inp, out = round(inp, _DIGITS), round(out, _DIGITS)
        return Cost(inp, out, round(inp + out, _DIGITS), cfg.currency)

    def estimate(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        """The cost of a request before the call (for budgets); 0 without a price."""
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        cost = self.price(model, None, usage)
        return 0.0 if cost is None else cost.total

    def of_completion(self, comp: Completion) -> Cost | None:
        """The cost a response reports: paid, or for a cached/coalesced answer, saved."""
        if not self._table:  # no pricing configured (the default): every cost is None
            return None
        usage = comp.body.get("usage") if isinstance(comp.body, dict) else None
        cost = self.price(comp.model, None if comp.cached else comp.endpoint,
                          usage if isinstance(usage, Mapping) else None)
        if cost is None:
            return None
        return cost.as_saved() if comp.cached else cost

    @staticmethod
    def _prices(cfg: PriceConfig, endpoint: str | None) -> tuple[float, float, float | None]:
        over = cfg.endpoints.get(endpoint) if endpoint is not None else None
        if over is None:
            return cfg.input_per_mtok, cfg.output_per_mtok, cfg.cached_input_per_mtok
        return (
            cfg.input_per_mtok if over.input_per_mtok is None else over.input_per_mtok,
            cfg.output_per_mtok if over.output_per_mtok is None else over.output_per_mtok,
            cfg.cached_input_per_mtok if over.cached_input_per_mtok is None
            else over.cached_input_per_mtok,
        )

