"""The cache circuit's gauge, which the CacheCircuitOpen alert reads (docker/prometheus)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from tests.fakes.clock import Clock
from tests.unit.cache.test_cache import comp, looked, make, req


def _open(reg: CollectorRegistry) -> float | None:
    return reg.get_sample_value("llm_streams_cache_circuit_open")



async def test_the_circuit_gauge_is_1_from_an_error_until_a_call_succeeds() -> None:
    clock = Clock(1000.0)
    cache, fake, reg = make(clock=clock, redis_retry_seconds=1.0)
    assert _open(reg) == 0  # exported from the start, so an alert sees the series
    await cache.store(req(), comp())
    assert await looked(cache, req()) is not None and _open(reg) == 0
    fake.fail = True
    assert await looked(cache, req()) is None
    assert _open(reg) == 1
    clock.now += 10  # the retry is due, Redis still fails: still open
    await cache.store(req(), comp())
    assert fake.batches() == 2 and _open(reg) == 1
    fake.fail = False
    await cache.store(req(), comp())  # not due yet: the cache write is skipped, still open
    assert fake.batches() == 2 and _open(reg) == 1
    clock.now += 10
    await cache.store(req(), comp())  # due, and Redis answers: closed
    assert fake.batches() == 3 and _open(reg) == 0


async def test_a_prefetch_that_succeeds_closes_the_circuit_at_once() -> None:
    # The batch path's read decides payment: it is tried while the circuit is open, and its
    # answer ends the outage for the cache writes too.
    clock = Clock(1000.0)
    cache, fake, reg = make(clock=clock, redis_retry_seconds=60.0)
    await cache.store(req(), comp())
    fake.fail = True
    await cache.store(req("other"), comp())
    assert _open(reg) == 1
    fake.fail = False
    assert await looked(cache, req()) is not None and _open(reg) == 0
    await cache.store(req("other"), comp())
    assert fake.batches() == 3
