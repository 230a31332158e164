"""Cooldowns shared through the real Redis by two workers: visible, extended, one probe."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from streams.config import EndpointConfig, RetryConfig
from streams.dispatch.cooldown import Cooldowns, EndpointState
from tests.fakes.clock import Clock

pytestmark = pytest.mark.integration



@pytest.fixture
def pair(redis_clients: list[Any]) -> list[Any]:
    """Two workers' connections."""
    return redis_clients[:2]


def _workers(clients: list[Any], clock: Clock) -> list[Cooldowns]:
    eps = [EndpointConfig(name="a", url="http://a.test/v1", timeout_seconds=2)]
    cfg = RetryConfig(cooldown_seconds=5, cooldown_after_failures=1)
    return [Cooldowns(eps, cfg, c, key_prefix="test-cd", clock=clock) for c in clients]


async def test_cooldown_is_shared_and_probed_once(pair: list[Any]) -> None:
    clock = Clock()
    w1, w2 = _workers(pair, clock)
    w1.record_failure("a", rate_limited=True, retry_after=2)
    await w1.sync()
    assert await w2.sync() is True
    assert w2.state("a") is EndpointState.COOLING and not w2.usable("a")

    # re-failing elsewhere with a shorter period does not shorten it; a longer one extends
    clock.now += 1
    w2.record_failure("a")  # 1 + 5 s: later than 2 s, so it extends
    await w2.sync()
    await w1.sync()
    assert w1.next_change(clock.now) == pytest.approx(clock.now + 5, abs=0.01)
    w1.record_failure("a", retry_after=0.5)
    await w1.sync()
    assert w1.next_change(clock.now) == pytest.approx(clock.now + 5, abs=0.01)

    clock.now += 5
    assert w1.needs_probe("a") and w2.needs_probe("a")
    assert await w1.try_probe("a") is True
    assert await w2.try_probe("a") is False  # SET NX: one probe across workers
    assert not w2.usable("a")
    w1.record_success("a", probe=True)
    await w1.sync()
    await w2.sync()
    assert w2.state("a") is EndpointState.HEALTHY and w2.usable("a")


async def test_cooldown_falls_back_to_local_state(unreachable_redis: aioredis.Redis) -> None:
    clock = Clock()
    (w,) = _workers([unreachable_redis], clock)
    w.record_failure("a")
    assert await w.sync() is False and w.degraded
    assert w.state("a") is EndpointState.COOLING
    clock.now += 5
    assert await w.try_probe("a") is True  # probes on its own while Redis is away


@pytest.mark.parametrize("stored", [b"nan", b"-nan", b"inf", b"-inf", b"garbage", b"",
                                    b"1e300", b"99999999999999999999999"])
async def test_an_implausible_stored_deadline_is_ignored_and_overwritten(
    pair: list[Any], stored: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # what another worker (an older version, a stranger) may have left in Redis
    clock = Clock()
    w1, w2 = _workers(pair, clock)
    key = "{test-cd}:cd:a:until"
    await pair[0].set(key, stored)
    await w1.sync()  # never raises, never trusts it
    assert w1.state("a") is EndpointState.HEALTHY and w1.usable("a")
    assert w1.next_change(clock.now) is None
    # the next real cooldown replaces the bad value for everyone
    w2.record_failure("a", rate_limited=True, retry_after=2)
    await w2.sync()
    assert float(await pair[0].get(key)) == pytest.approx((clock.now + 2) * 1000)
    await w1.sync()
    assert w1.next_change(clock.now) == pytest.approx(clock.now + 2, abs=0.01)
    clock.now += 2
    assert w1.usable("a")
    assert not [r for r in caplog.records if r.exc_info], "no traceback"
    assert sum("implausible" in r.getMessage() for r in caplog.records) <= 2  # once per worker


async def test_a_probe_lock_holding_binary_is_someone_else_s(pair: list[Any]) -> None:
    clock = Clock()
    w1, _ = _workers(pair, clock)
    w1.record_failure("a", rate_limited=True, retry_after=1)
    await w1.sync()
    await pair[0].set("{test-cd}:cd:a:probe", b"\xff\xfe\x00")
    await w1.sync()  # raised UnicodeDecodeError before
    clock.now += 1
    assert w1.state("a") is EndpointState.PROBING and not w1.usable("a")  # another's probe


async def test_nan_retry_after_is_never_pushed_and_sync_keeps_working(
    pair: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    w1, w2 = _workers(pair, clock)
    w1.record_failure("a", rate_limited=True, retry_after=float("nan"))
    await w1.sync()  # raised ValueError (round(nan)) before
    await w2.sync()
    assert w2.next_change(clock.now) == pytest.approx(clock.now + 5, abs=0.01)  # cooldown_seconds
    clock.now += 5
    assert w1.usable("a") and w2.usable("a")
    assert not [r for r in caplog.records if r.exc_info]
