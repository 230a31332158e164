"""Dispatcher on virtual time with a fake upstream: selection, limits, retries, cooldowns."""

from __future__ import annotations

import asyncio
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from streams.config import EndpointConfig, Settings
from streams.contract import Completion, Request
from streams.dispatch.calls import _used_tokens
from streams.dispatch.claim import CLAIM
from streams.dispatch.dispatcher import Dispatcher
from streams.dispatch.parts import build_dispatcher
from streams.errors import (
    AttemptsExhausted,
    ClaimLost,
    DeadlineExpired,
    DispatchFailed,
    NoEndpoint,
    StreamsError,
    UpstreamConnectionError,
    UpstreamStatusError,
)
from tests.fakes.vtime import VirtualClock, run

Failure = Callable[[float], StreamsError | None]


class FakeUpstream:
    """Records every call (virtual time, endpoint, prompt); fails as told per endpoint."""

    def __init__(self, clock: VirtualClock, latency: float = 0.05) -> None:
        self.clock = clock
        self.latency: dict[str, float] = defaultdict(lambda: latency)
        self.fail: dict[str, Failure] = {}
        self.calls: list[tuple[float, str, str]] = []
        self.active: Counter[str] = Counter()
        self.max_active: Counter[str] = Counter()

    async def complete(
        self,
        endpoint: EndpointConfig,
        model: str,
        messages: list[dict[str, Any]],
        params: Mapping[str, Any],
    ) -> dict[str, Any]:
        now = self.clock.elapsed()
        name = endpoint.name
        self.calls.append((now, name, str(messages[-1]["content"])))
        self.active[name] += 1
        self.max_active[name] = max(self.max_active[name], self.active[name])
        try:
            await asyncio.sleep(self.latency[name])
            fail = self.fail.get(name)
            exc = fail(now) if fail is not None else None
            if exc is not None:
                raise exc
            return {
                "choices": [{"message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
            }
        finally:
            self.active[name] -= 1

    def to(self, name: str) -> list[float]:
        return [t for t, n, _ in self.calls if n == name]


def _ep(name: str, weight: float = 1, **kw: Any) -> dict[str, Any]:
    return {"name": name, "url": f"http://{name}.test/v1", "weight": weight, **kw}


def _make(
    clock: VirtualClock,
    endpoints: list[dict[str, Any]],
    *,
    latency: float = 0.05,
    redis: Any = None,
    **sections: dict[str, Any],
) -> tuple[Dispatcher, FakeUpstream, CollectorRegistry]:
    settings = Settings(endpoints=endpoints, **sections)
    upstream = FakeUpstream(clock, latency)
    registry = CollectorRegistry()
    dispatcher = build_dispatcher(
        settings, upstream, redis, registry, clock=clock, sleep=asyncio.sleep,
        random=lambda: 0.5,
    )
    return dispatcher, upstream, registry


def _req(i: int | str, **kw: Any) -> Request:
    return Request(id=f"r{i}", input=f"r{i}", model="m", **kw)


def _status(status: int, retry_after: float | None = None) -> Failure:
    return lambda t: UpstreamStatusError(
        f"HTTP {status}", endpoint="x", status=status, retry_after=retry_after
    )


async def _arrivals(
    dispatcher: Dispatcher, reqs: list[Request], every: float
) -> list[Completion | BaseException]:
    """Start one dispatch per request, ``every`` seconds apart; gather outcomes."""
    tasks = []
    for r in reqs:
        tasks.append(asyncio.create_task(dispatcher.dispatch(r)))
        await asyncio.sleep(every)
    return list(await asyncio.gather(*tasks, return_exceptions=True))


def test_weights_3_1_0_over_10000() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, [_ep("a", 3), _ep("b", 1), _ep("c", 0)], latency=0.01)
        async with d:
            for batch in range(20):
                reqs = [_req(batch * 500 + i) for i in range(500)]
                await asyncio.gather(*(d.dispatch(r) for r in reqs))
        counts = Counter(n for _, n, _ in up.calls)
        assert sum(counts.values()) == 10_000
        assert abs(counts["a"] / 10_000 - 0.75) <= 0.02
        assert abs(counts["b"] / 10_000 - 0.25) <= 0.02
        assert counts["c"] == 0

    run(main)


def test_400_is_terminal_after_exactly_one_attempt() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, [_ep("a"), _ep("b")])
        up.fail = {"a": _status(400), "b": _status(400)}
        async with d:
            with pytest.raises(DispatchFailed) as info:
                await d.dispatch(_req(1))
        failed = info.value
        assert failed.attempts == 1 and len(failed.endpoints) == 1 and len(up.calls) == 1
        assert isinstance(failed.error, UpstreamStatusError)
        assert failed.error.status == 400 and failed.error.dlq_type == "upstream"

    run(main)


def test_500_always_uses_exactly_max_attempts_on_alternating_endpoints() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, [_ep("a"), _ep("b")], retry={"max_attempts": 4})
        up.fail = {"a": _status(500), "b": _status(500)}
        async with d:
            with pytest.raises(DispatchFailed) as info:
                await d.dispatch(_req(1))
        failed = info.value
        assert failed.attempts == 4 and len(up.calls) == 4
        assert failed.endpoints == [n for _, n, _ in up.calls]
        assert failed.endpoints in (["a", "b", "a", "b"], ["b", "a", "b", "a"])
        assert isinstance(failed.error, AttemptsExhausted)
        assert failed.error.dlq_type == "exhausted" and failed.error.status == 500
        assert isinstance(failed.error.last, UpstreamStatusError)
        # backoff between attempts: base 200 ms, full jitter (random = 0.5)
        times = [t for t, _, _ in up.calls]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert all(g >= 0.05 + 0.2 for g in gaps)

    run(main)


def test_retry_goes_to_a_different_healthy_endpoint() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, [_ep("a"), _ep("b"), _ep("c")],
                         retry={"cooldown_after_failures": 100})
        up.fail = {"a": _status(503)}
        async with d:
            results = await _arrivals(d, [_req(i) for i in range(60)], 0.01)
        assert all(isinstance(r, Completion) for r in results)
        retried = [r for r in results if isinstance(r, Completion) and r.attempts > 1]
        assert retried and all(r.endpoints[0] == "a" and r.endpoints[1] != "a" for r in retried)
        assert all(len(r.endpoints) == 2 for r in retried)

    run(main)


def test_429_retry_after_cools_the_endpoint_and_traffic_flows_elsewhere() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, [_ep("a"), _ep("b")])
        up.fail = {"a": _status(429, retry_after=2)}
        async with d:
            results = await _arrivals(d, [_req(i) for i in range(300)], 0.02)
        assert all(isinstance(r, Completion) and r.endpoint == "b" for r in results)
        to_a = up.to("a")
        first_answer = to_a[0] + 0.05  # the first 429 arrives after the call's latency
        # calls already on the wire aside, "a" gets nothing for 2 s after the 429 ...
        assert [t for t in to_a if first_answer <= t < first_answer + 2.0] == []
        # ... then one probe per cooldown: the probe fails and cools it down again
        later = [t for t in to_a if t >= first_answer]
        assert later and all(b - a >= 2.0 for a, b in zip(later, later[1:], strict=False))
        during = [n for t, n, _ in up.calls if first_answer <= t < first_answer + 2.0]
        assert len(during) >= 90 and set(during) == {"b"}

    run(main)


def test_endpoint_refusing_connections_is_probed_once_per_cooldown() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(
            clock, [_ep("dead"), _ep("live")],
            retry={"cooldown_seconds": 1.0, "cooldown_after_failures": 1},
        )
        up.fail = {"dead": lambda t: UpstreamConnectionError("connection failed")}
        up.latency["dead"] = 0.001
        async with d:
            results = await _arrivals(d, [_req(i) for i in range(500)], 0.01)
        assert all(isinstance(r, Completion) and r.endpoint == "live" for r in results)
        to_dead = up.to("dead")
        cooled_at = to_dead[0] + 0.001
        probes = [t for t in to_dead if t > cooled_at]
        assert 3 <= len(probes) <= 5  # a 5 s run, 1 s cooldowns
        assert all(b - a >= 1.0 for a, b in zip(probes, probes[1:], strict=False))
        assert d.snapshot().states["dead"].value in ("cooling", "probing")

    run(main)


def test_probe_success_makes_the_endpoint_healthy_again() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(
            clock, [_ep("a"), _ep("b")],
            retry={"cooldown_seconds": 1.0, "cooldown_after_failures": 2},
        )
        up.fail = {"a": lambda t: UpstreamConnectionError("down") if t < 0.5 else None}
        async with d:
            await _arrivals(d, [_req(i) for i in range(300)], 0.01)
        assert d.snapshot().states["a"].value == "healthy"
        late = Counter(n for t, n, _ in up.calls if t > 2.0)
        assert abs(late["a"] - late["b"]) <= 2

    run(main)


def test_priority_0_waits_far_less_than_priority_9_under_a_global_limit() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(
            clock, [_ep("a"), _ep("b")],
            limits={"max_requests_per_second": 20, "priority_aging_ms": 60_000},
        )
        reqs = [_req(i, priority=0 if i % 2 else 9) for i in range(150)]
        arrival = {r.id: clock.elapsed() + i / 30 for i, r in enumerate(reqs)}
        async with d:
            results = await _arrivals(d, reqs, 1 / 30)  # 30/s against 20/s
        assert all(isinstance(r, Completion) for r in results)
        waits: dict[int, list[float]] = {0: [], 9: []}
        for t, _, rid in up.calls:
            waits[0 if int(rid[1:]) % 2 else 9].append(t - arrival[rid])
        p0, p9 = statistics.median(waits[0]), statistics.median(waits[9])
        assert p0 <= p9 / 5, (p0, p9)
        # the limit held: never more than 20 in any second
        times = sorted(t for t, _, _ in up.calls)
        assert max(sum(1 for u in times if t <= u < t + 1) for t in times) <= 20

    run(main)


def test_aging_bounds_how_long_a_low_priority_request_waits() -> None:
    def low_wait(aging_ms: int) -> float:
        async def main(clock: VirtualClock) -> float:
            d, up, _ = _make(
                clock, [_ep("a")],
                limits={"max_requests_per_second": 10, "priority_aging_ms": aging_ms},
            )
            async with d:
                stream = asyncio.create_task(
                    _arrivals(d, [_req(i, priority=0) for i in range(60)], 1 / 15)
                )
                # a queue has formed: 15/s arrive, 10/s pass (the next ~0.4 s are reserved)
                await asyncio.sleep(1.5)
                assert d.snapshot().waiting > 0
                await d.dispatch(_req("low", priority=9))
                await stream
            return next(t for t, _, rid in up.calls if rid == "rlow") - 1.5

        return run(main)

    # overtaken only by what arrived within 9 x 200 ms, and the slots reserved before it came
    assert low_wait(200) < 4.0
    assert low_wait(0) > 4.4  # strict priority: it waits for the whole stream (60 at 10/s)


def test_deadline_passed_means_expired_without_calling_upstream() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, [_ep("a", rpm=60)], retry={"base_delay_ms": 1000})
        async with d:
            with pytest.raises(DispatchFailed) as info:
                await d.dispatch(_req(1, deadline=int(clock() * 1000) - 1))
            assert isinstance(info.value.error, DeadlineExpired) and info.value.attempts == 0
            assert info.value.error.dlq_type == "expired" and up.calls == []

            # passes while waiting for the limit: rpm 60 lets one through per ~second
            first = asyncio.create_task(d.dispatch(_req(2)))
            await asyncio.sleep(0.01)
            with pytest.raises(DispatchFailed) as info:
                await d.dispatch(_req(3, deadline=int(clock() * 1000) + 300))
            assert isinstance(info.value.error, DeadlineExpired)
            await first
            assert [rid for _, _, rid in up.calls] == ["r2"]
            assert d.snapshot().waiting == 0

            # passes during the backoff after a failed attempt
            up.fail = {"a": _status(503)}
            await asyncio.sleep(2)
            with pytest.raises(DispatchFailed) as info:
                await d.dispatch(_req(4, deadline=int(clock() * 1000) + 500))
            assert isinstance(info.value.error, DeadlineExpired)
            assert info.value.attempts == 1 and info.value.endpoints == ["a"]

    run(main)


def test_no_endpoint_serves_the_model() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, [_ep("a", models=["other"]), _ep("z", 0)])
        async with d:
            with pytest.raises(DispatchFailed) as info:
                await d.dispatch(_req(1))
        assert isinstance(info.value.error, NoEndpoint) and info.value.attempts == 0
        assert up.calls == []

    run(main)


def test_max_concurrency_and_max_inflight_hold() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(
            clock, [_ep("a", max_concurrency=2), _ep("b")], latency=1.0,
            limits={"max_inflight": 5},
        )
        async with d:
            results = await asyncio.gather(*(d.dispatch(_req(i)) for i in range(40)))
        assert all(isinstance(r, Completion) for r in results)
        assert up.max_active["a"] <= 2 and up.max_active["a"] + up.max_active["b"] <= 5
        assert clock.elapsed() >= 40 / 5 * 1.0

    run(main)


def test_cancellation_releases_slots() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, registry = _make(clock, [_ep("a", max_concurrency=1)], latency=10.0)
        async with d:
            t1 = asyncio.create_task(d.dispatch(_req(1)))
            await asyncio.sleep(0.1)
            t2 = asyncio.create_task(d.dispatch(_req(2)))
            t3 = asyncio.create_task(d.dispatch(_req(3)))
            await asyncio.sleep(0.1)
            assert d.snapshot().waiting == 2
            t3.cancel()  # cancelled while queued
            t1.cancel()  # cancelled while its call is in flight
            await asyncio.sleep(0.1)
            assert d.snapshot().waiting == 0
            assert [rid for _, _, rid in up.calls] == ["r1", "r2"]  # r2 got r1's slot
            result = await t2
            assert result.endpoint == "a"
            assert d.parts.limiter.inflight(d._settings.endpoints[0]) == 0
            inflight = registry.get_sample_value("llm_streams_endpoint_inflight", {"endpoint": "a"})
            assert inflight == 0
            assert t1.cancelled() and t3.cancelled()

    run(main)


def test_metrics_go_to_the_given_registry() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, registry = _make(clock, [_ep("a"), _ep("b")], retry={"max_attempts": 2})
        up.fail = {"b": _status(503)}
        async with d:
            await asyncio.gather(*(d.dispatch(_req(i)) for i in range(10)))

        def value(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, labels)

        assert value("llm_streams_endpoint_requests_total", endpoint="a") == 10
        assert value("llm_streams_endpoint_errors_total", endpoint="b", error="server_error") == 5
        assert value("llm_streams_retries_total", endpoint="b", reason="server_error") == 5
        assert value("llm_streams_endpoint_latency_seconds_count", endpoint="a") == 10
        assert value("llm_streams_limiter_wait_seconds_count", endpoint="a") == 10
        assert value("llm_streams_dispatch_total", outcome="ok") == 10
        assert value("llm_streams_dispatcher_queue_depth", priority="5") == 0
        assert value("llm_streams_endpoint_state", endpoint="a", state="healthy") == 1
        assert value("llm_streams_limiter_fallback") == 0
        global_value = REGISTRY.get_sample_value(
            "llm_streams_endpoint_requests_total", {"endpoint": "a"}
        )
        assert global_value is None

    run(main)


class CountingRedis:
    """Answers what the cooldown sync asks (nothing stored); counts limiter scripts."""

    def __init__(self) -> None:
        self.scripts = 0

    async def evalsha(self, *args: Any) -> Any:
        self.scripts += 1
        return [1, b"0", 0]

    async def eval(self, *args: Any) -> Any:
        return b"0"

    async def mget(self, keys: list[str]) -> list[None]:
        return [None] * len(keys)

    async def delete(self, *keys: str) -> int:
        return 0


def test_fast_path_does_not_touch_redis_without_rate_limits() -> None:
    async def main(clock: VirtualClock) -> None:
        redis = CountingRedis()
        d, up, _ = _make(clock, [_ep("a"), _ep("b", rpm=6000)], redis=redis)
        async with d:
            await asyncio.gather(*(d.dispatch(_req(i)) for i in range(200)))
        assert Counter(n for _, n, _ in up.calls) == {"a": 100, "b": 100}
        assert redis.scripts == 100  # only for "b", the endpoint with an rpm limit

    run(main)


@pytest.mark.parametrize("asked", [float("nan"), float("inf"), -1.0])
def test_a_hostile_retry_after_cools_within_bounds_and_the_endpoint_recovers(
    asked: float,
) -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, [_ep("a")], retry={"cooldown_seconds": 5,
                                                    "max_retry_after_ms": 10_000})
        up.fail = {"a": lambda t: UpstreamStatusError(
            "HTTP 429", endpoint="a", status=429, retry_after=asked) if t < 0.01 else None}
        async with d:
            comp = await asyncio.wait_for(d.dispatch(_req(1)), 60)
            assert d.snapshot().states["a"].value == "healthy"
        assert comp.attempts == 2
        ends = clock.elapsed()
        assert ends <= 10.5  # at most max_retry_after (inf), else cooldown_seconds (NaN) or 0

    run(main)


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": -10, "completion_tokens": 3},
    {"total_tokens": -4},
    {"total_tokens": True},
    {"total_tokens": 2.5, "prompt_tokens": 1},
    {"total_tokens": "9"},
    {"total_tokens": 2**70},
    "many",
])
def test_invalid_usage_is_unknown_to_the_limiter(usage: object) -> None:
    assert _used_tokens({"choices": [], "usage": usage}) is None


def test_valid_usage_is_charged() -> None:
    assert _used_tokens({"usage": {"total_tokens": 12}}) == 12
    assert _used_tokens({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}) == 7
    assert _used_tokens({"usage": {"total_tokens": 0}}) is None
    assert _used_tokens({}) is None


def test_model_names_invented_by_requests_add_no_per_model_state() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, [_ep("a"), _ep("b", models=["x"])])
        async with d:
            before = len(d.parts.balancer._models)
            for i in range(2_000):
                await d.dispatch(Request(id=f"r{i}", input="hi", model=f"invented-{i}"))
            assert len(d.parts.balancer._models) == before == 1
            assert d._admission._waiting_models == {}
        assert {n for _, n, _ in up.calls} == {"a"}

    run(main)


def test_a_dispatch_whose_claim_was_lost_while_waiting_makes_no_call() -> None:
    # Scale 1-3-1 under load: a worker took a request's coalescing lock, then waited seconds
    # for an in-flight slot; its lock expired meanwhile (a lagging event loop), another worker
    # took it, called and published, and the first worker's call came after that answer. The
    # dispatcher looks at the claim once it holds a grant, before waiting for its slot.
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, [_ep("a")], latency=1.0, limits={"max_inflight": 1})
        ours = {"r1": True, "r2": False}  # r2's lock went to another worker while it waited
        looks: list[str] = []

        async def claimed(r: Request) -> Completion:
            async def claim() -> bool:
                looks.append(r.id)
                return ours[r.id]

            CLAIM.set(claim)  # this task's context only
            return await d.dispatch(r)

        async with d:
            first = asyncio.create_task(claimed(_req(1)))
            await asyncio.sleep(0.1)
            second = asyncio.create_task(claimed(_req(2)))  # waits for r1's slot
            assert (await first).attempts == 1
            with pytest.raises(ClaimLost):
                await second
            assert [p for _, _, p in up.calls] == ["r1"] and looks == ["r1", "r2"]
            assert d.parts.limiter.inflight(d._settings.endpoints[0]) == 0  # grant given back
            assert (await d.dispatch(_req(3))).attempts == 1  # no claim: no look

    run(main)
