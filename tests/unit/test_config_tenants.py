"""``pricing:`` and ``tenants:`` from outside: valid documents load, anything else is one
ConfigError line naming the key (Hypothesis over the shapes a user may write)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.config import load_settings
from streams.config_tenants import TenantConfig, tenant_config, tenant_name
from streams.errors import ConfigError

WINDOWS = ("minute", "hour", "day", "month")
junk = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.integers(-10, 10),
                 st.floats(allow_nan=True), st.lists(st.integers(), max_size=2))
budget = st.fixed_dictionaries(
    {"window": st.sampled_from(WINDOWS)},
    optional={"tokens": st.integers(1, 10**9), "cost": st.floats(0.001, 1e6)},
).filter(lambda b: "tokens" in b or "cost" in b)
tenant = st.fixed_dictionaries({}, optional={
    "weight": st.floats(0.01, 100), "max_inflight": st.integers(1, 10_000),
    "budgets": st.lists(budget, max_size=4, unique_by=lambda b: b["window"]),
    "on_exhausted": st.sampled_from(["wait", "reject"])})
price = st.fixed_dictionaries(
    {"input_per_mtok": st.floats(0, 1000), "output_per_mtok": st.floats(0, 1000)},
    optional={"cached_input_per_mtok": st.floats(0, 1000), "batch_discount": st.floats(0, 1),
              "currency": st.sampled_from(["USD", "EUR"])})


@given(tenants=st.dictionaries(st.text(min_size=1, max_size=10), tenant, max_size=4),
       pricing=st.dictionaries(st.text(min_size=1, max_size=10), price, max_size=3))
def test_valid_sections_load(tenants: dict[str, Any], pricing: dict[str, Any]) -> None:
    s = load_settings(environ={}, tenants=tenants, pricing=pricing)
    assert set(s.tenants) == set(tenants) and set(s.pricing) == set(pricing)
    for name in tenants:
        assert tenant_config(s.tenants, name) == s.tenants[name]
    assert s.pricing == {} or all(p.batch_discount <= 1 for p in s.pricing.values())


@given(key=st.sampled_from(["weight", "max_inflight", "budgets", "on_exhausted", "bogus"]),
       value=junk)
def test_bad_tenant_values_are_one_line_naming_the_key(key: str, value: Any) -> None:
    try:
        s = load_settings(environ={}, tenants={"t": {key: value}})
    except ConfigError as exc:
        text = str(exc)
        assert "\n" not in text and "tenants" in text
        return
    # what was accepted is a real value, never junk
    got = getattr(s.tenants["t"], key)
    assert key != "bogus"
    if isinstance(value, str) and key in ("weight", "max_inflight"):
        assert got == float(value)  # a number written as a string, as environment variables are
    else:
        assert got == value


@pytest.mark.parametrize("bad", [
    {"t": {"budgets": [{"window": "week", "tokens": 1}]}},
    {"t": {"budgets": [{"window": "day"}]}},
    {"t": {"budgets": [{"window": "day", "tokens": 0}]}},
    {"t": {"budgets": [{"window": "day", "tokens": 5}, {"window": "day", "cost": 1.0}]}},
    {"t": {"weight": 0}},
    {"t": {"on_exhausted": "drop"}},
])
def test_bad_budgets_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="tenants"):
        load_settings(environ={}, tenants=bad)


@pytest.mark.parametrize("bad", [
    {"m": {"input_per_mtok": -1, "output_per_mtok": 1}},
    {"m": {"input_per_mtok": 1}},
    {"m": {"input_per_mtok": 1, "output_per_mtok": 1, "batch_discount": 1.5}},
    {"m": {"input_per_mtok": 1, "output_per_mtok": 1, "currency": "dollars"}},
    {"m": {"input_per_mtok": float("nan"), "output_per_mtok": 1}},
])
def test_bad_prices_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="pricing"):
        load_settings(environ={}, pricing=bad)


def test_default_tenant_applies_to_tenants_not_named() -> None:
    s = load_settings(environ={}, tenants={"default": {"weight": 2}, "vip": {"weight": 5}})
    assert tenant_config(s.tenants, "someone").weight == 2
    assert tenant_config(s.tenants, tenant_name(None)).weight == 2
    assert tenant_config(s.tenants, "vip").weight == 5
    assert tenant_config({}, "x") == TenantConfig()
