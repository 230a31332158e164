"""Retry classification and backoff (full jitter, Retry-After override, caps)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.config import RetryConfig
from streams.dispatch.retry import Backoff, bounded_wait, error_class, hurts_health, is_retryable
from streams.dispatch.upstream import parse_retry_after
from streams.errors import (
    AttemptsExhausted,
    UpstreamBadResponse,
    UpstreamConnectionError,
    UpstreamStatusError,
    UpstreamTimeout,
    ValidationFailed,
)

CFG = RetryConfig(base_delay_ms=200, max_delay_ms=5_000, max_retry_after_ms=60_000)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retryable_statuses(status: int) -> None:
    assert is_retryable(UpstreamStatusError("x", status=status))


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422, 501])
def test_terminal_statuses(status: int) -> None:
    exc = UpstreamStatusError("x", status=status)
    assert not is_retryable(exc)
    assert not hurts_health(exc)  # it answered: the request's fault, not the endpoint's


def test_other_classes() -> None:
    assert is_retryable(UpstreamTimeout("t")) and error_class(UpstreamTimeout("t")) == "timeout"
    assert is_retryable(UpstreamConnectionError("c"))
    assert not is_retryable(UpstreamBadResponse("b")) and hurts_health(UpstreamBadResponse("b"))
    assert not is_retryable(ValidationFailed("v"))
    assert not is_retryable(ValueError("bug"))
    assert error_class(UpstreamStatusError("x", status=429)) == "rate_limited"
    assert error_class(UpstreamStatusError("x", status=503)) == "server_error"
    assert error_class(UpstreamStatusError("x", status=400)) == "client_error"
    exhausted = AttemptsExhausted("gave up")  # no attempt now, but a replay may succeed
    assert not is_retryable(exhausted) and exhausted.retryable


def test_full_jitter_bounds_and_growth() -> None:
    low = Backoff(CFG, rand=lambda: 0.0)
    high = Backoff(CFG, rand=lambda: 0.999999)
    for n in range(1, 30):
        assert low.delay(n) == pytest.approx(0.2)
        assert 0.2 <= high.delay(n) <= 5.0
    assert high.delay(1) == pytest.approx(0.4, rel=1e-3)
    assert high.delay(3) == pytest.approx(1.6, rel=1e-3)
    assert high.delay(10) == pytest.approx(5.0, rel=1e-3)
    assert high.delay(10_000) == pytest.approx(5.0, rel=1e-3)  # no overflow


def test_jitter_uses_the_injected_random_source() -> None:
    values = iter([0.5, 0.25])
    backoff = Backoff(CFG, rand=lambda: next(values))
    assert backoff.delay(2) == pytest.approx(0.2 + 0.5 * (0.8 - 0.2))
    assert backoff.delay(2) == pytest.approx(0.2 + 0.25 * (0.8 - 0.2))


def test_retry_after_overrides_and_is_capped() -> None:
    backoff = Backoff(CFG, rand=lambda: 0.0)
    assert backoff.delay(1, UpstreamStatusError("x", status=429, retry_after=2.0)) == 2.0
    assert backoff.delay(1, UpstreamStatusError("x", status=503, retry_after=600)) == 60.0
    assert backoff.delay(1, UpstreamStatusError("x", status=503, retry_after=0.0)) == 0.0
    assert backoff.delay(1, UpstreamStatusError("x", status=503)) == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"x-ratelimit-reset-requests": "250ms", "x-ratelimit-reset-tokens": "2s"}, 2.0),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # in the past
        ({"Retry-After": "3600"}, 60.0),  # capped by max_retry_after_ms
    ],
)
def test_header_forms_drive_the_delay(headers: dict[str, str], expected: float) -> None:
    exc = UpstreamStatusError("x", status=429, retry_after=parse_retry_after(headers))
    assert Backoff(CFG).delay(1, exc) == pytest.approx(expected)


@pytest.mark.parametrize("asked", [math.nan, math.inf, -math.inf, -5.0, 1e308])
def test_a_hostile_retry_after_never_gives_a_non_finite_or_uncapped_delay(asked: float) -> None:
    backoff = Backoff(CFG, rand=lambda: 0.5)
    exc = UpstreamStatusError("x", status=429, retry_after=asked)
    delay = backoff.delay(1, exc)
    assert math.isfinite(delay) and 0.0 <= delay <= 60.0
    if math.isnan(asked):  # not a number: as if no Retry-After came; the backoff applies
        assert delay == Backoff(CFG, rand=lambda: 0.5).delay(1)


@given(st.one_of(st.none(), st.floats()), st.floats(min_value=0, max_value=1e6))
def test_bounded_wait_is_none_or_within_the_cap(seconds: float | None, cap: float) -> None:
    got = bounded_wait(seconds, cap)
    assert got is None or 0.0 <= got <= cap
    assert (got is None) == (seconds is None or math.isnan(seconds))
