"""A redelivered record is never paid twice because a Redis read timed out or failed once.

Under load a starved event loop times out Redis commands that Redis answered in time. Every
read that decides whether the upstream is called (the idempotency store's, the coalescing
lock's) is tried again; only a Redis that never answers lets a request go on unchecked (the
documented outage behaviour), and then it is counted and logged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from streams.cache.responses import ResponseCache
from streams.config import load_settings
from streams.contract import Completion, Request
from streams.intake.processor import Processor
from streams.metrics import PipelineMetrics
from tests.fakes.clock import Clock
from tests.fakes.fake_redis import FakeRedis
from tests.fakes.publisher import FakePublisher
from tests.unit.intake.test_processor import BODY, FakeDispatcher, rec, run

SEEN = {"id": "seen", "input": "answered before the rebalance", "model": "gpt-4o-mini"}
RECORD = b'{"id":"seen","status":"ok","output":"paid once"}'


def make(clock: Clock | None = None, **cache: Any
         ) -> tuple[Processor, FakePublisher, FakeDispatcher, ResponseCache, FakeRedis]:
    s = load_settings(environ={}, redis={"socket_timeout_seconds": 0.05},
                      cache={"redis_backoff_seconds": 0.01, **cache})
    fake = FakeRedis()
    clock = clock or Clock(1000.0)
    c = ResponseCache(s, fake, CollectorRegistry(), clock=clock)  # type: ignore[arg-type]
    pub, disp = FakePublisher(), FakeDispatcher()
    return Processor(s, pub, disp, c, PipelineMetrics(CollectorRegistry())), pub, disp, c, fake


def unchecked(cache: ResponseCache) -> float:
    return cache.metrics.unchecked.collect()[0].samples[0].value


async def test_an_idempotency_read_that_times_out_once_is_tried_again_not_paid_again() -> None:
    proc, pub, disp, cache, fake = make()
    await cache.remember(cache.ref(Request.model_validate(SEEN), "req"), RECORD)
    fake.hang = 1  # the batch's MGET times out, as it does when the event loop lags
    assert await run(proc, [rec(0, SEEN)]) == {0: "replayed"}
    assert disp.calls == []
    assert [d for _, _, d in pub.out] == [{"id": "seen", "status": "ok", "output": "paid once"}]
    assert fake.round_trips["mget"] == 2 and unchecked(cache) == 0


async def test_a_redis_that_never_answers_is_the_outage_path_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    proc, pub, disp, cache, fake = make(redis_attempts=3)
    caplog.set_level(logging.WARNING, logger="streams.cache")
    fake.fail = True
    assert await run(proc, [rec(0, SEEN), rec(1, {"id": "new", "input": "x"})]) == {0: "ok", 1: "ok"}
    assert sorted(disp.calls) == ["new", "seen"]  # answered, as the README promises for outages
    assert fake.round_trips["mget"] == 3  # the batch's read, tried three times
    assert unchecked(cache) == 2
    (line,) = [r.getMessage() for r in caplog.records if "idempotency store" in r.getMessage()]
    assert "after 3 tries" in line


async def test_a_record_in_flight_elsewhere_is_waited_for_after_a_timed_out_read() -> None:
    # A leaving worker still calls the upstream for a record the rebalance redelivered here.
    # The batch's read timed out once (a lagging loop) and opened the circuit: the lock must
    # still be tried (the read's retry answered, so Redis is in use again), or this worker
    # calls the upstream a second time for the same record.
    proc, pub, disp, cache, fake = make(redis_retry_seconds=60.0)
    store = cache.redis_store
    key = cache.key(Request.model_validate(SEEN))
    fake._set(store.lkey(key), b"the-leaving-worker", px=10_000)

    async def leaving_worker_answers() -> None:
        await asyncio.sleep(0.2)
        value = store.encode(BODY)
        assert value is not None
        fake._set(store.ckey(key), value, ex=60)
        del fake.data[store.lkey(key).encode()]

    answer = asyncio.ensure_future(leaving_worker_answers())
    fake.hang = 1
    done = await asyncio.wait_for(run(proc, [rec(0, SEEN)]), 5.0)
    await answer
    assert done == {0: "cached"} and disp.calls == []
    assert not store.guard.degraded


def proc_comp() -> Completion:
    return Completion(model="m", body=BODY, endpoint="a", attempts=1)


async def test_an_answer_computed_without_a_lock_still_reaches_redis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The lock attempt timed out (and opened the breaker): the lock may be held elsewhere, so
    # the worker waits as long as a lock could live; Redis still away then, it computes without
    # a lock. Its answer must still be stored, or another worker holding a redelivery of the
    # same record calls the upstream too.
    clock = Clock(1000.0)
    proc, pub, disp, cache, fake = make(clock, redis_retry_seconds=60.0, coalesce_lock_seconds=5.0)

    async def ticking() -> None:
        while True:
            await asyncio.sleep(0.01)
            clock.now += 0.5

    ticker = asyncio.ensure_future(ticking())
    store = cache.redis_store
    prefetch = cache.prefetch

    async def then_hang(reqs: list[Request], topics: list[str]) -> Any:
        got = await prefetch(reqs, topics)
        fake.hang = 1  # the next round trip, the lock attempt, never answers
        return got

    monkeypatch.setattr(cache, "prefetch", then_hang)
    try:
        assert await run(proc, [rec(0, {"id": "new", "input": "fresh prompt"})]) == {0: "ok"}
    finally:
        ticker.cancel()
    assert cache.metrics.errors.labels("lock")._value.get() == 1  # the attempt timed out
    assert cache.metrics.fallbacks.labels("unavailable")._value.get() == 1  # waited it out
    req = Request.model_validate({"id": "new", "input": "fresh prompt", "model": "gpt-4o-mini"})
    assert not any(k.startswith(store.lkey("").encode()) for k in fake.data)  # no lock taken
    assert fake._get(store.ckey(cache.key(req))) is not None
    assert fake._get(cache.ref(req, "req").key) is not None  # and remembered
