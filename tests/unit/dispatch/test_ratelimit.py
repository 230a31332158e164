"""Local limiter behaviour (fake clock), token estimate, and Redis fallback/recovery."""

from __future__ import annotations

from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from mockllm.server import max_in_window
from streams.config import EndpointConfig, Settings
from streams.dispatch.ratelimit import RATE_HEADROOM, RESERVE_AHEAD_SECONDS, RateLimiter
from streams.dispatch.tokens import estimate_tokens
from tests.fakes.clock import Clock


def _settings(**limits: Any) -> Settings:
    endpoints = limits.pop("endpoints")
    return Settings(endpoints=endpoints, limits=limits)


def _ep(name: str = "a", **kw: Any) -> EndpointConfig:
    return EndpointConfig(name=name, url=f"http://{name}.test/v1", **kw)


async def _greedy(limiter: RateLimiter, ep: EndpointConfig, clock: Clock, until: float,
                  tokens: int = 1, late: float = 0.0) -> list[float]:
    """Acquire as fast as allowed until ``until``, jumping the clock by each refusal's wait
    (plus ``late``: a slow worker); returns the slots granted (when each may be sent)."""
    slots = []
    while clock.now < until:
        decision = await limiter.acquire(ep, tokens)
        if decision.permit is None:
            assert decision.wait > 0
            clock.now += decision.wait + late
            continue
        assert decision.wait >= 0
        slots.append(clock.now + decision.wait)
        limiter.release(decision.permit)
    return slots



def test_estimate_tokens() -> None:
    msgs = [{"role": "system", "content": "x" * 400}, {"role": "user", "content": "y" * 40}]
    assert estimate_tokens(msgs, {"max_tokens": 50}) == 100 + 10 + 8 + 3 + 50
    parts = [{"role": "user", "content": [{"type": "text", "text": "z" * 80}, {"type": "img"}]}]
    assert estimate_tokens(parts, {"max_completion_tokens": 10, "n": 2}) == 20 + 4 + 3 + 20
    assert estimate_tokens([{"role": "user", "content": None}], {}) == 7 + 256


async def test_rpm_is_smooth_not_a_minute_bucket() -> None:
    clock = Clock(1000.0)
    ep = _ep(rpm=600)
    limiter = RateLimiter(_settings(endpoints=[ep]), None, clock=clock)
    slots = await _greedy(limiter, ep, clock, clock.now + 10)
    assert max_in_window(slots, 1.0) <= 10
    assert len(slots) >= 98  # 98% of 10 s x 10/s, plus the slots reserved ahead
    gaps = {round(b - a, 6) for a, b in zip(slots, slots[1:], strict=False)}
    assert gaps == {round(0.1 / RATE_HEADROOM, 6)}


async def test_late_workers_lose_no_slot() -> None:
    """A worker that asks again up to half the horizon late still gets every slot: the
    schedule never restarts from "now" because of our lateness (it did: 58% served)."""
    clock = Clock(1000.0)
    ep = _ep(rpm=600)
    limiter = RateLimiter(_settings(endpoints=[ep]), None, clock=clock)
    start = clock.now
    ahead = max(RESERVE_AHEAD_SECONDS, 4 * 0.1 / RATE_HEADROOM)
    slots = await _greedy(limiter, ep, clock, start + 30, late=ahead / 2 * 0.9)
    slots = [t for t in slots if t < start + 30]
    assert len(slots) == pytest.approx(30 * 10 * RATE_HEADROOM, abs=1)
    assert max_in_window(slots, 1.0) <= 10


async def test_a_reservation_is_granted_ahead_and_slots_follow_each_other() -> None:
    clock = Clock(1000.0)
    ep = _ep(rpm=600)  # a slot every ~0.102 s; reservations up to ~0.41 s ahead
    limiter = RateLimiter(_settings(endpoints=[ep]), None, clock=clock)
    interval = 0.1 / RATE_HEADROOM
    waits = []
    while (d := await limiter.acquire(ep, 1)).permit is not None:
        waits.append(d.wait)
    assert waits == pytest.approx([i * interval for i in range(5)])
    # refused until the next slot is half the horizon away
    ahead = 4 * interval
    assert d.limit == "rpm" and d.wait == pytest.approx(5 * interval - ahead / 2)
    clock.now += d.wait
    again = await limiter.acquire(ep, 1)
    assert again.permit is not None and again.wait == pytest.approx(ahead / 2)


async def test_an_idle_schedule_starts_from_now() -> None:
    clock = Clock(1000.0)
    ep = _ep(rpm=600)
    limiter = RateLimiter(_settings(endpoints=[ep]), None, clock=clock)
    assert (await limiter.acquire(ep, 1)).wait == 0
    clock.now += 60  # idle: no credit saved up beyond the burst
    first, second = await limiter.acquire(ep, 1), await limiter.acquire(ep, 1)
    assert first.wait == 0 and second.wait == pytest.approx(0.1 / RATE_HEADROOM)


async def test_burst_setting() -> None:
    clock = Clock(1000.0)
    ep = _ep(rpm=600)
    limiter = RateLimiter(_settings(endpoints=[ep], rate_burst=5), None, clock=clock)
    first = [await limiter.acquire(ep, 1) for _ in range(6)]
    assert all(d.permit is not None for d in first)
    # five at once, then the schedule: the sixth is reserved one interval ahead
    assert [d.wait for d in first] == pytest.approx([0] * 5 + [0.1 / RATE_HEADROOM])


async def test_global_rps_binds_every_endpoint() -> None:
    clock = Clock(1000.0)
    a, b = _ep("a"), _ep("b")
    limiter = RateLimiter(
        _settings(endpoints=[a, b], max_requests_per_second=2), None, clock=clock
    )
    assert not limiter.unlimited(a)
    assert (await limiter.acquire(a, 1)).permit is not None
    reserved = await limiter.acquire(b, 1)  # the global schedule: b's slot follows a's
    assert reserved.permit is not None and reserved.wait == pytest.approx(0.5 / RATE_HEADROOM)
    for _ in range(3):
        assert (await limiter.acquire(a, 1)).permit is not None
    refused = await limiter.acquire(b, 1)  # slots reserved 4 intervals (~2 s) ahead: the horizon
    assert refused.permit is None and refused.limit == "rps"


async def test_unlimited_endpoint_is_free() -> None:
    ep = _ep()
    limiter = RateLimiter(_settings(endpoints=[ep]), None)
    assert limiter.unlimited(ep)
    permits = [(await limiter.acquire(ep, 10**6)).permit for _ in range(1000)]
    assert all(p is not None for p in permits) and limiter.inflight(ep) == 1000


async def test_tpm_reserves_the_estimate_and_corrects_it() -> None:
    clock = Clock(1000.0)
    ep = _ep(tpm=60_000)  # ~1000 tokens per second
    limiter = RateLimiter(_settings(endpoints=[ep]), None, clock=clock)
    big = await limiter.acquire(ep, 2000)
    assert big.permit is not None and big.wait == 0
    refused = await limiter.acquire(ep, 10)
    assert refused.permit is None and refused.limit == "tpm"
    # the next slot is ~2.04 s away; asked again when it is half the horizon (0.25 s) away
    assert refused.wait == pytest.approx(2.0 / RATE_HEADROOM - RESERVE_AHEAD_SECONDS / 2)
    limiter.release(big.permit, used_tokens=500)  # the real usage was much smaller: refund
    refused = await limiter.acquire(ep, 10)
    assert refused.permit is None
    assert refused.wait == pytest.approx(0.5 / RATE_HEADROOM - RESERVE_AHEAD_SECONDS / 2)
    clock.now += refused.wait
    granted = await limiter.acquire(ep, 10)
    assert granted.permit is not None
    assert granted.wait == pytest.approx(RESERVE_AHEAD_SECONDS / 2)  # its slot: 0.51 s after the big one


async def test_released_callback_reports_refunds() -> None:
    clock = Clock(1000.0)
    ep = _ep(tpm=60_000)
    seen: list[tuple[str, bool]] = []
    limiter = RateLimiter(_settings(endpoints=[ep]), None, clock=clock,
                          on_release=lambda name, refund: seen.append((name, refund)))
    one = (await limiter.acquire(ep, 100)).permit
    two = (await limiter.acquire(ep, 100)).permit
    assert one is not None and two is not None
    limiter.release(one, used_tokens=40)
    limiter.release(two, used_tokens=300)
    limiter.release(two, used_tokens=300)  # idempotent: reported once
    assert seen == [("a", True), ("a", False)]


async def test_max_concurrency_is_a_slot_count() -> None:
    ep = _ep(max_concurrency=2)
    limiter = RateLimiter(_settings(endpoints=[ep]), None)
    p1 = (await limiter.acquire(ep, 1)).permit
    p2 = (await limiter.acquire(ep, 1)).permit
    assert p1 is not None and p2 is not None
    refused = await limiter.acquire(ep, 1)
    assert refused.permit is None and refused.limit == "concurrency" and refused.wait == 0
    assert not limiter.has_capacity(ep)
    limiter.release(p1)
    limiter.release(p1)  # idempotent
    assert limiter.has_capacity(ep) and limiter.inflight(ep) == 1


class FlakyRedis:
    """Raises ConnectionError while ``down``; otherwise grants everything."""

    def __init__(self) -> None:
        self.down = True
        self.calls = 0

    async def evalsha(self, *args: Any) -> Any:
        self.calls += 1
        if self.down:
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379.")
        return [1, b"0", 0]

    eval = evalsha

    async def zrem(self, *args: Any) -> int:
        return 1


async def test_falls_back_to_local_and_recovers() -> None:
    clock = Clock(1000.0)
    ep = _ep(rpm=60)
    redis = FlakyRedis()
    settings = _settings(endpoints=[ep], local_fallback_fraction=0.5)
    limiter = RateLimiter(settings, redis, clock=clock)
    first = await limiter.acquire(ep, 1)
    assert first.permit is not None and not first.permit.shared
    assert limiter.degraded and redis.calls == 1
    # locally: half the limit (fraction 0.5): one per ~2 s; redis is not retried at once
    reserved = [await limiter.acquire(ep, 1) for _ in range(4)]
    assert [d.wait for d in reserved] == pytest.approx([2.0 / RATE_HEADROOM * i for i in (1, 2, 3, 4)])
    refused = await limiter.acquire(ep, 1)
    assert refused.permit is None and refused.limit == "rpm"
    assert redis.calls == 1
    redis.down = False
    clock.now += 0.6  # past the first retry delay (0.5 s)
    again = await limiter.acquire(ep, 1)
    assert again.permit is not None and again.permit.shared
    assert not limiter.degraded


async def test_fallback_retry_backs_off() -> None:
    clock = Clock(1000.0)
    ep = _ep(rpm=6000)
    redis = FlakyRedis()
    limiter = RateLimiter(_settings(endpoints=[ep]), redis, clock=clock)
    tries = []
    while clock.now < 1040:
        before = redis.calls
        decision = await limiter.acquire(ep, 1)
        if redis.calls != before:
            tries.append(clock.now)
        clock.now += decision.wait or 0.05
    gaps = [round(b - a, 1) for a, b in zip(tries, tries[1:], strict=False)]
    assert gaps[:4] == pytest.approx([0.5, 1.0, 2.0, 4.0], abs=0.05)
    assert max(gaps) <= 10.05


async def test_a_command_error_limits_that_request_locally_without_an_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from redis.exceptions import ResponseError

    class RefusingRedis(FlakyRedis):
        async def evalsha(self, *args: Any) -> Any:
            self.calls += 1
            if self.down:
                raise ResponseError("value is not an integer or out of range")
            return [1, b"0", 0]

    clock = Clock(1000.0)
    ep = _ep(rpm=6000)
    redis = RefusingRedis()
    limiter = RateLimiter(_settings(endpoints=[ep]), redis, clock=clock)
    caplog.set_level("WARNING", logger="streams.ratelimit")
    for _ in range(3):
        decision = await limiter.acquire(ep, 10**30)
        assert decision.permit is not None and not decision.permit.shared
        clock.now += 1
    assert not limiter.degraded and redis.calls == 3  # Redis asked every time: not "down"
    redis.down = False
    shared = await limiter.acquire(ep, 1)
    assert shared.permit is not None and shared.permit.shared and redis.calls == 4
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "refused a command for rate limits" in lines[0]
