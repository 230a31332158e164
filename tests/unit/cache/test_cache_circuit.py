"""The cache circuit's gauge, which the CacheCircuitOpen alert reads (docker/prometheus)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from tests.fakes.clock import Clock
from tests.unit.cache.test_cache import comp, make, req


def _open(reg: CollectorRegistry) -> float | None:
    return reg.get_sample_value("llm_streams_cache_circuit_open")


async def test_the_circuit_gauge_is_1_from_an_error_until_a_call_succeeds() -> None:
    clock = Clock(1000.0)
    cache, fake, reg = make(clock=clock, redis_retry_seconds=1.0)
    assert _open(reg) == 0  # exported from the start, so an alert sees the series
    await cache.store(req(), comp())
    assert await cache.lookup(req()) is not None and _open(reg) == 0
    fake.fail = True
    assert await cache.lookup(req()) is None
    assert _open(reg) == 1
    clock.now += 1.5  # the retry is due, Redis still fails: still open
    assert await cache.lookup(req()) is None and _open(reg) == 1
    fake.fail = False
    clock.now += 0.5  # not due yet: the cache is still bypassed
    assert await cache.lookup(req()) is None and _open(reg) == 1
    clock.now += 1.5
    assert await cache.lookup(req()) is not None
    assert _open(reg) == 0
