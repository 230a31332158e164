"""Cooldown rules on one worker (no Redis): triggers, extension, the single probe."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import ResponseError

from streams.config import EndpointConfig, RetryConfig
from streams.dispatch.cooldown import Cooldowns, EndpointState
from tests.fakes.clock import Clock


def _cooldowns(clock: Clock, **retry: float) -> Cooldowns:
    eps = [EndpointConfig(name=n, url=f"http://{n}.test/v1") for n in ("a", "b")]
    return Cooldowns(eps, RetryConfig(**retry), None, clock=clock)


def test_n_failures_in_a_row() -> None:
    clock = Clock()
    cd = _cooldowns(clock, cooldown_after_failures=3, cooldown_seconds=5)
    assert not cd.record_failure("a")
    cd.record_success("a")  # breaks the run
    assert not cd.record_failure("a") and not cd.record_failure("a")
    assert cd.state("a") is EndpointState.HEALTHY
    assert cd.record_failure("a")
    assert cd.state("a") is EndpointState.COOLING and not cd.usable("a")
    assert cd.state("b") is EndpointState.HEALTHY
    assert cd.next_change(clock.now) == clock.now + 5


def test_429_cools_at_once_for_its_retry_after_capped() -> None:
    clock = Clock()
    cd = _cooldowns(clock, cooldown_seconds=5, max_retry_after_ms=30_000)
    assert cd.record_failure("a", rate_limited=True, retry_after=2.0)
    assert cd.next_change(clock.now) == clock.now + 2
    assert cd.record_failure("b", rate_limited=True, retry_after=3600)
    assert cd.next_change(clock.now + 10) == clock.now + 30
    clock.now += 2
    assert cd.state("a") is EndpointState.PROBING


def test_refailing_extends_never_shortens() -> None:
    clock = Clock()
    start = clock.now
    cd = _cooldowns(clock, cooldown_seconds=5)
    cd.record_failure("a", rate_limited=True, retry_after=10)
    clock.now += 1
    cd.record_failure("a")  # would end at +6: keeps +10
    assert cd.next_change(clock.now) == start + 10
    clock.now += 1
    cd.record_failure("a", retry_after=20)  # ends at +22
    assert cd.next_change(clock.now) == start + 22
    # a straggler's success does not cut the cooldown short: only the probe heals
    cd.record_success("a")
    assert cd.state("a") is EndpointState.COOLING


async def test_exactly_one_probe_then_healthy_or_cooling_again() -> None:
    clock = Clock()
    cd = _cooldowns(clock, cooldown_seconds=5, cooldown_after_failures=1)
    cd.record_failure("a")
    assert not await cd.try_probe("a")  # still cooling
    clock.now += 5
    assert cd.needs_probe("a") and cd.usable("a")
    assert await cd.try_probe("a")
    assert not cd.usable("a") and not await cd.try_probe("a")  # one probe only
    cd.record_failure("a", probe=True)
    assert cd.state("a") is EndpointState.COOLING
    assert cd.next_change(clock.now) == clock.now + 5
    clock.now += 5
    assert await cd.try_probe("a")
    cd.abandon_probe("a")  # e.g. the probe request was cancelled: someone else may probe
    assert await cd.try_probe("a")
    cd.record_success("a", probe=True)
    assert cd.state("a") is EndpointState.HEALTHY and cd.usable("a")


class _RefusingRedis:
    """Refuses EVAL with a command error (as for an out-of-range argument); MGET works."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def eval(self, *args: Any) -> Any:
        self.calls.append("eval")
        raise ResponseError("value is not an integer or out of range")

    async def delete(self, *keys: Any) -> int:
        self.calls.append("delete")
        return 1

    async def mget(self, keys: list[str]) -> list[Any]:
        self.calls.append("mget")
        return [None] * len(keys)

    async def set(self, *args: Any, **kw: Any) -> Any:
        self.calls.append("set")
        raise ResponseError("invalid expire time in 'set' command")


async def test_a_command_error_fails_that_command_only_and_is_not_an_outage() -> None:
    clock = Clock()
    eps = [EndpointConfig(name=n, url=f"http://{n}.test/v1") for n in ("a", "b")]
    redis = _RefusingRedis()
    cd = Cooldowns(eps, RetryConfig(cooldown_after_failures=1), redis, clock=clock)
    cd.record_failure("a")  # its push (EVAL) is refused
    cd.record_failure("b")
    cd.record_success("b", probe=True)  # its push (DEL) works
    await cd.sync()
    assert not cd.degraded
    assert redis.calls == ["eval", "delete", "mget"]  # b pushed and the group state pulled
    await cd.sync()
    assert redis.calls[3:] == ["eval", "mget"]  # retried next time, not skipped as "down"
    clock.now += 10
    assert await cd.try_probe("a") and not cd.degraded  # probes on its own this time


@pytest.mark.parametrize("asked", [math.nan, math.inf, -math.inf, -1.0, 1e308])
def test_a_hostile_retry_after_cools_for_a_finite_bounded_time(asked: float) -> None:
    clock = Clock()
    cd = _cooldowns(clock, cooldown_seconds=5, max_retry_after_ms=30_000)
    assert cd.record_failure("a", rate_limited=True, retry_after=asked)
    until = cd.next_change(clock.now - 1)
    assert until is not None and math.isfinite(until)
    expected = 5.0 if math.isnan(asked) else min(max(asked, 0.0), 30.0)
    assert until == clock.now + expected
    clock.now += 30
    assert cd.usable("a") and cd.needs_probe("a")  # recovers within its cooldown


@given(st.lists(st.one_of(st.none(), st.floats()), min_size=1, max_size=8))
def test_any_retry_afters_leave_the_endpoint_usable_after_the_longest_cooldown(
    asked: list[float | None],
) -> None:
    clock = Clock()
    cd = _cooldowns(clock, cooldown_seconds=5, max_retry_after_ms=30_000)
    for value in asked:
        cd.record_failure("a", rate_limited=True, retry_after=value)
        clock.now += 0.5
    clock.now += 30
    assert cd.state("a") is EndpointState.PROBING and cd.usable("a")
