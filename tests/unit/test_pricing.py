"""Prices applied to usage: exact to 1e-9, cached prompt tokens, endpoint prices, batch, saved."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from streams.config_tenants import PriceConfig
from streams.contract import Completion
from streams.pricing import Pricing

MINI = PriceConfig(input_per_mtok=0.15, output_per_mtok=0.60, cached_input_per_mtok=0.075,
                   endpoints={"azure": {"input_per_mtok": 0.165}})


def _usage(p: int, c: int, cached: int | None = None) -> dict[str, Any]:
    u: dict[str, Any] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    if cached is not None:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    return u


def _exact(p: int, c: int, pin: float, pout: float) -> Decimal:
    return (Decimal(p) * Decimal(str(pin)) + Decimal(c) * Decimal(str(pout))) / Decimal(10**6)


def test_price_of_usage() -> None:
    cost = Pricing({"m": MINI}).price("m", None, _usage(1000, 500))
    assert cost is not None
    assert cost.record() == {"input": 0.00015, "output": 0.0003, "total": 0.00045,
                             "currency": "USD", "saved": 0.0}


def test_cached_prompt_tokens_endpoint_prices_and_batch() -> None:
    pricing = Pricing({"m": MINI})
    cached = pricing.price("m", None, _usage(1000, 0, cached=400))
    assert cached is not None and cached.input == round((600 * 0.15 + 400 * 0.075) / 1e6, 12)
    azure = pricing.price("m", "azure", _usage(1000, 1000))
    assert azure is not None and azure.input == 0.000165 and azure.output == 0.0006
    batch = pricing.price("m", None, _usage(1000, 1000), batch=True)
    assert batch is not None and batch.total == 0.000375  # half of 0.00075


def test_no_price_and_untrusted_usage() -> None:
    pricing = Pricing({"m": MINI})
    assert pricing.price("other", None, _usage(1, 1)) is None
    bad = pricing.price("m", None, {"prompt_tokens": -5, "completion_tokens": "3"})
    assert bad is not None and bad.total == 0.0
    odd = pricing.price("m", None, _usage(10, 0, cached=10**9))  # more cached than prompt
    assert odd is not None and odd.input == round(10 * 0.075 / 1e6, 12)


def test_cached_and_coalesced_answers_report_what_they_saved() -> None:
    pricing = Pricing({"m": MINI})
    body = {"choices": [], "usage": _usage(2000, 1000)}
    paid = pricing.of_completion(Completion("m", body, "a", 1))
    hit = pricing.of_completion(Completion("m", body, None, 0, cached=True))
    assert paid is not None and hit is not None
    assert paid.saved == 0.0 and paid.total == 0.0009
    assert (hit.input, hit.output, hit.total, hit.saved) == (0.0, 0.0, 0.0, paid.total)
    assert pricing.of_completion(Completion("x", body, "a", 1)) is None


@given(p=st.integers(0, 2**40), c=st.integers(0, 2**40),
       pin=st.floats(0, 1000, allow_nan=False), pout=st.floats(0, 1000, allow_nan=False))
def test_cost_is_exact_to_a_billionth(p: int, c: int, pin: float, pout: float) -> None:
    cfg = PriceConfig(input_per_mtok=pin, output_per_mtok=pout)
    cost = Pricing({"m": cfg}).price("m", None, _usage(p, c))
    assert cost is not None
    exact = _exact(p, c, pin, pout)
    # relative for huge amounts (a float holds 16 digits), absolute 1e-9 for real ones
    assert abs(Decimal(cost.total) - exact) <= max(Decimal("1e-9"), exact * Decimal("1e-14"))
